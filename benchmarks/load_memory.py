"""Memory of packing the linear weights into one buffer at load, on the embedded model (as
loaded, float32, and converted to bfloat16) and on a synthetic ~1B bf16 Llama built in memory.

    python benchmarks/load_memory.py [--device cpu|cuda] [--skip-1b]

Each model runs in its own process (clean memory accounting). On the CPU it prints the RSS
after loading, the peak RSS while packing (VmHWM, reset just before), the RSS after packing,
and the linear weights' bytes L. Once packing is done the linear weights are exactly the
buffer, so `1 + (peak - after) / L` is the linear weights' memory at the packing's peak over L
(the target is <= 1.1); `after - loaded` is what packing added (an mmap'd checkpoint's weights
were file pages, mostly not resident; converted or built weights were already resident). On
CUDA it loads on the CPU and packs into the device, and reports the device's peak allocation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

OUT = Path(__file__).with_name("load_memory.json")
MB = 1 << 20


def _status() -> dict[str, int]:
    fields = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    return {
        line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(fields)
    }


def _synthetic_llama_1b():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # TinyLlama-1.1B's shape
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model.requires_grad_(False)


def measure(model_name: str, device: str) -> dict:
    import torch

    from neuroada.base_model import load_base_model
    from neuroada.fingerprint import untied_linear_layers
    from neuroada.inplace import PackedWeights

    before_load = _status()["VmRSS"]
    started = time.perf_counter()
    if model_name == "llama-1b-bf16":
        model = _synthetic_llama_1b()
    else:  # the embedded checkpoint is float32: bfloat16 weights are converted copies, heap memory
        model = load_base_model(None, dtype=torch.bfloat16 if model_name.endswith("bf16") else torch.float32)
    load_s = time.perf_counter() - started
    linear = sum(m.weight.numel() * m.weight.element_size() for m in untied_linear_layers(model).values())
    loaded = _status()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    packed = PackedWeights(model, device=device)
    model.to(device)
    pack_s = time.perf_counter() - started
    after = _status()
    result = {
        "model": model_name,
        "dtype": str(packed.dtype).removeprefix("torch."),
        "device": device,
        "linear_bytes": linear,
        "rss_before_load": before_load,
        "rss_loaded": loaded["VmRSS"],
        "rss_file_loaded": loaded["RssFile"],
        "rss_peak_packing": after["VmHWM"],
        "rss_packed": after["VmRSS"],
        "rss_file_packed": after["RssFile"],
        "load_s": round(load_s, 2),
        "pack_s": round(pack_s, 2),
    }
    if device == "cuda":
        result["device_peak_bytes"] = torch.cuda.max_memory_allocated()
        result["device_peak_over_linear"] = round(torch.cuda.max_memory_allocated() / linear, 3)
    else:
        result["peak_over_linear"] = round(1 + (after["VmHWM"] - after["VmRSS"]) / linear, 3)
        result["added_by_packing"] = after["VmRSS"] - loaded["VmRSS"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-1b", action="store_true", help="the embedded model only")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.device)))
        return
    rows, results = [], []
    for name in ["embedded-smollm2-135m", "embedded-smollm2-135m-bf16"] + ([] if args.skip_1b else ["llama-1b-bf16"]):
        done = subprocess.run(
            [sys.executable, __file__, "--child", name, "--device", args.device],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        peak = r.get("peak_over_linear", r.get("device_peak_over_linear"))
        rows.append(
            [
                r["model"],
                r["dtype"],
                f"{r['linear_bytes'] / MB:.0f}",
                f"{r['rss_loaded'] / MB:.0f}",
                f"{r['rss_peak_packing'] / MB:.0f}",
                f"{r['rss_packed'] / MB:.0f}",
                f"{r.get('added_by_packing', 0) / MB:.0f}",
                peak,
                r["pack_s"],
            ]
        )
    print_table(
        ["model", "dtype", "L MiB", "RSS loaded", "RSS peak packing", "RSS packed", "added", "peak / L", "pack s"],
        rows,
    )
    write_json(OUT, {"device": args.device, "results": results})


if __name__ == "__main__":
    main()
