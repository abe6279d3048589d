"""The engine's decode step: our decoder against Hugging Face's forward, and the memory floor.

    python benchmarks/decode_step.py [--batch 1 4 16] [--steps 40] [--rounds 3] [--threads 2] [--mixed-k 1]
        [--engines ours "ours mixed 8" ...]

On the embedded SmolLM2-135M (fp32), a `RunningBatch` of B requests decodes `--steps` tokens
(ignore_eos) and each step is timed, and the prefill of its prompts; four engines take turns,
round after round:
- hf+F.linear: Hugging Face's forward with torch's own linear (the engine before our decoder);
- hf: Hugging Face's forward, linears on `neuroada_kernels.decode_linear`;
- ours: `neuroada_server.forward.llama` with `neuroada_kernels.decode_linear`, every layer of a step in one C++ call
  (`neuroada_kernels.decode_layers`);
- ours by layer: the same, its Python loop calling the kernels layer by layer;
- ours mixed 8 (and by layer): the mixed path, each row with one of 8 adapters in turn (random
  deltas on magnitude-selected k = 1 indices, one index set, as `serve_load.py` makes them;
  `--mixed-k 20`: the shipped adapters' k);
- ours bf16w: the same over the model with its linear weights in bf16 (`--weight-dtype bfloat16`:
  float32 activations, the kernel widening the weights as it reads them).
The floor is what a step must read, the weights once, over the copy bandwidth measured here
(read + write bytes of a 256 MiB copy per second), as issue 15 defines it: the fp32 weights' bytes,
and for bf16w also its own (half). A second table times the linears alone: one pass over every
linear weight of the model (each read from memory, not cache) at 1, 4, 8 and 16 rows,
`neuroada_kernels.decode_linear` (fp32 and bf16 weights) against `F.linear`. Prints the median step time
per engine and batch, and writes JSON beside this file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, print_table, set_threads, write_json  # noqa: E402
from switch import random_adapter  # noqa: E402

from neuroada.base_model import load_base_model, load_tokenizer  # noqa: E402
from neuroada.fingerprint import BaseModelSpec  # noqa: E402
from neuroada_kernels import DecodeLinear, linear, use_decode_linears  # noqa: E402
from neuroada_server.batch_adapters import SparseDeltaAdapters  # noqa: E402
from neuroada_server.engine import place_for_serving_, round_linear_weights_  # noqa: E402
from neuroada_server.generation import NO_ADAPTERS, GenerationRequest, RunningBatch, SamplingParams  # noqa: E402
from neuroada_server.metrics import ServerMetrics  # noqa: E402
from neuroada_server.mixed import MixedAdapters  # noqa: E402
from neuroada_server.resident import AdapterLoader  # noqa: E402

ENGINES = ("hf+F.linear", "hf", "ours", "ours by layer", "ours mixed 8", "ours mixed 8 by layer", "ours bf16w")
MIXED_ADAPTERS = 8


def use_torch_linears(model: nn.Module) -> None:
    for module in model.modules():
        if type(module) is DecodeLinear:
            module.__class__ = nn.Linear


def step_times(
    model, tokenizer, runner: str, batch_size: int, steps: int, layers_at_once: bool = True, mixed=None
) -> tuple[float, list[float]]:
    """Seconds of the prompts' prefill, and of each decode step. `mixed`: (adapters, residents), each
    row served by the next resident in turn."""
    batch = RunningBatch(model, tokenizer, {tokenizer.eos_token_id}, tokenizer.pad_token_id, runner)
    if not layers_at_once:
        batch.forward.layers_at_once = False
    adapters, residents = mixed or (NO_ADAPTERS, [None])
    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    prompts = [tokenizer(f"Write a short story about robot number {i}.").input_ids for i in range(batch_size)]
    requests = []
    for i, prompt in enumerate(prompts):
        resident = residents[i % len(residents)]
        requests.append(GenerationRequest(prompt, resident and resident.name, params, lambda event: None))
        requests[-1].resident = resident
    started = time.perf_counter()
    adapters.plan(requests)
    batch.join(requests, adapters)
    prefill = time.perf_counter() - started
    times = []
    while batch:
        started = time.perf_counter()
        adapters.plan(batch.requests)
        batch.step(adapters)
        times.append(time.perf_counter() - started)
    adapters.reset()
    return prefill, times


def mixed_adapters(model, packed, k: int = 1) -> tuple[SparseDeltaAdapters, list]:
    """The server's adapter layer over `model`, and MIXED_ADAPTERS adapters of top-k deltas resident in it."""
    base = BaseModelSpec.from_model(model, "SmolLM2-135M-Instruct")
    loader = AdapterLoader(packed, base, fidelity_threshold=0.9)
    residents = [
        loader.place(f"task{i:02d}", random_adapter(model, base, k=k, seed=100 + i)) for i in range(MIXED_ADAPTERS)
    ]
    return SparseDeltaAdapters(packed, MixedAdapters(model, torch.device("cpu")), ServerMetrics()), residents


LINEAR_ROWS = (1, 4, 8, 16)


def linears_pass(weights: list[torch.Tensor], rows: int, fn) -> float:
    """Seconds for one product of `rows` token rows with every weight in turn."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    started = time.perf_counter()
    for w in weights:
        fn(inputs[w.shape[1]], w)
    return time.perf_counter() - started


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct linear weights (a tied lm_head is the embedding, counted once)."""
    found = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(w.numel() * w.element_size() for w in found.values())


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes read plus written per second by a large copy (bytes/s)."""
    src = torch.ones(megabytes << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixed-k", type=int, default=1, help="the mixed engines' adapters: k deltas per neuron")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("decode_step.json"))
    args = parser.parse_args()
    set_threads(args.threads)

    # Both laid out as the server does: packed linear weights, on huge pages.
    model, tokenizer = load_base_model(), load_tokenizer()
    packed = place_for_serving_(model, torch.device("cpu"))
    mixed = mixed_adapters(model, packed, args.mixed_k)
    bf16w = load_base_model()
    round_linear_weights_(bf16w, torch.bfloat16)
    place_for_serving_(bf16w, torch.device("cpu"))
    weight_bytes = linear_bytes(model)
    samples = {(e, b): [] for e in args.engines for b in args.batch}
    prefills = {(e, b): [] for e in args.engines for b in args.batch}
    weights = {
        "decode_linear": [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)],
        "decode_linear bf16": [m.weight.detach() for m in bf16w.modules() if isinstance(m, nn.Linear)],
    }
    weights["F.linear"] = weights["decode_linear"]
    linear_fns = {"decode_linear": linear, "decode_linear bf16": linear, "F.linear": F.linear}
    linear_samples = {(name, rows): [] for name in linear_fns for rows in LINEAR_ROWS}
    bandwidths = []
    for round_ in range(args.rounds):
        bandwidths.append(copy_bandwidth())
        with torch.inference_mode():
            for rows in LINEAR_ROWS:
                for name, fn in linear_fns.items():
                    linear_samples[name, rows] += [linears_pass(weights[name], rows, fn) for _ in range(3)]
        for b in args.batch:
            for engine in args.engines:
                if engine == "hf+F.linear":
                    use_torch_linears(model)
                else:
                    use_decode_linears(model)
                runner = "hf" if engine.startswith("hf") else "auto"
                prefill, times = step_times(
                    bf16w if engine == "ours bf16w" else model,
                    tokenizer,
                    runner,
                    b,
                    args.steps,
                    layers_at_once=not engine.endswith("by layer"),
                    mixed=mixed if "mixed" in engine else None,
                )
                prefills[engine, b].append(prefill)
                samples[engine, b] += times
                print(f"  round {round_}, batch {b}, {engine}: {statistics.median(samples[engine, b]) * 1e3:.1f} ms")

    bandwidth = statistics.median(bandwidths)
    floor = weight_bytes / bandwidth
    rows = [
        {
            "engine": e,
            "batch": b,
            "step_ms": statistics.median(samples[e, b]) * 1e3,
            "tokens_per_s": b / statistics.median(samples[e, b]),
            "vs_floor": statistics.median(samples[e, b]) / floor,
            "vs_own_floor": statistics.median(samples[e, b])
            / (linear_bytes(bf16w if e == "ours bf16w" else model) / bandwidth),
            "prefill_ms": statistics.median(prefills[e, b]) * 1e3,
            "steps": len(samples[e, b]),
        }
        for (e, b) in samples
    ]
    print(
        f"\nmachine: {machine()}; SmolLM2-135M fp32, {weight_bytes / 1e6:.0f} MB of linear weights per step; "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> floor {floor * 1e3:.1f} ms\n"
    )
    print_table(
        ["engine", "batch", "step ms", "tok/s", "x floor", "x own floor", "prefill ms"],
        [
            [
                r["engine"],
                r["batch"],
                f"{r['step_ms']:.1f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['vs_floor']:.2f}",
                f"{r['vs_own_floor']:.2f}",
                f"{r['prefill_ms']:.0f}",
            ]
            for r in rows
        ],
    )
    linear_rows = [
        {
            "kernel": name,
            "rows": r,
            "ms": statistics.median(linear_samples[name, r]) * 1e3,
            "gb_per_s": sum(w.numel() * w.element_size() for w in weights[name])
            / statistics.median(linear_samples[name, r])
            / 1e9,
        }
        for (name, r) in linear_samples
    ]
    print()
    print_table(
        ["linears", "rows", "ms a pass", "GB/s"],
        [[r["kernel"], r["rows"], f"{r['ms']:.1f}", f"{r['gb_per_s']:.1f}"] for r in linear_rows],
    )
    write_json(
        args.out,
        {
            "config": vars(args) | {"out": str(args.out)},
            "weight_bytes": weight_bytes,
            "copy_bytes_per_s": bandwidth,
            "rows": rows,
            "linears": linear_rows,
        },
    )


if __name__ == "__main__":
    main()
