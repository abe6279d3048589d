"""A prefill's products on oneDNN against torch's `F.linear` (MKL's sgemm): speed, and greedy outputs.

    python benchmarks/prefill.py [--shapes 1x38 4x38 16x38 1x512 4x512] [--rounds 5]
                                 [--limit 100] [--max-new-tokens 128] [--threads 2]

Past a decode step's rows, `kernels.linear` computes the float32 CPU products of a prefill with
oneDNN's GEMM (`use_prefill_gemm`); before, they went to `F.linear`. On the embedded SmolLM2-135M
(fp32, laid out as the server lays it out), each GEMM in turn, round after round:
- linears: one layer's products (q/k/v as one, o, gate, up, down) at the rows of each shape, GFLOP/s;
- prefill: `LlamaForward.prefill` of P prompts of T tokens (`--shapes PxT`; the prompt of
  `serve_load.py`, tiled or cut to T), milliseconds, median over rounds.
Then greedy fidelity, as `bf16_weights.py` measures it: the first `--limit` examples of the shared
dev sets answered through the engine's running batch with each GEMM; per set, how many
generations are identical and how many leading tokens they share (sums in another order may part
two generations at a near tie). Writes JSON beside this file. Reads `../shared/data`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bf16_weights import CASES, DATA, generate, serving_model, shared_prefix  # noqa: E402
from common import machine, print_table, set_threads, write_json  # noqa: E402
from serve_load import PROMPT  # noqa: E402

from kernels import linear, use_decode_linears  # noqa: E402
from kernels.decode_linear import ONEDNN_AVAILABLE, use_prefill_gemm  # noqa: E402
from neuroada.base_model import load_base_model, load_tokenizer  # noqa: E402
from neuroada.data import build_prompt  # noqa: E402
from server.engine import place_for_serving_  # noqa: E402
from server.forward.llama import LlamaForward  # noqa: E402

GEMMS = ("torch", "onednn")


def layer_weights(model) -> dict[str, torch.Tensor]:
    """The first layer's weights as the prefill multiplies them (q, k and v as one matrix)."""
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    return {
        "qkv": torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
        "o": attn.o_proj.weight.detach(),
        "gate": mlp.gate_proj.weight.detach(),
        "up": mlp.up_proj.weight.detach(),
        "down": mlp.down_proj.weight.detach(),
    }


def gemm_seconds(x: torch.Tensor, weight: torch.Tensor, repeats: int = 5) -> float:
    linear(x, weight)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        linear(x, weight)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def prompt_of(tokens: list[int], length: int) -> list[int]:
    return (tokens * (-(-length // len(tokens))))[:length]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1x38", "4x38", "16x38", "1x512", "4x512"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("prefill.json"))
    args = parser.parse_args()
    if not ONEDNN_AVAILABLE:
        sys.exit("this torch build has no oneDNN linear: nothing to compare")
    set_threads(args.threads)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes]

    model, tokenizer = load_base_model(), load_tokenizer()
    place_for_serving_(model, torch.device("cpu"))
    use_decode_linears(model)
    weights = layer_weights(model)
    prompt = tokenizer(PROMPT).input_ids
    gemm_times = {(g, rows, name): [] for g in GEMMS for rows in {p * t for p, t in shapes} for name in weights}
    prefill_times = {(g, shape): [] for g in GEMMS for shape in shapes}
    with torch.inference_mode():
        for round_ in range(args.rounds):
            for gemm in GEMMS:
                use_prefill_gemm(gemm)
                for rows in sorted({p * t for p, t in shapes}):
                    for name, w in weights.items():
                        gemm_times[gemm, rows, name].append(gemm_seconds(torch.randn(rows, w.shape[1]), w))
                for prompts, tokens in shapes:
                    forward = LlamaForward(model)
                    started = time.perf_counter()
                    forward.prefill([prompt_of(prompt, tokens)] * prompts)
                    prefill_times[gemm, (prompts, tokens)].append(time.perf_counter() - started)
            print(f"  round {round_} done", flush=True)

    gemm_rows = []
    for rows in sorted({p * t for p, t in shapes}):
        for name, w in weights.items():
            flops = 2 * rows * w.numel()
            seconds = {g: statistics.median(gemm_times[g, rows, name]) for g in GEMMS}
            gemm_rows.append(
                {"rows": rows, "weight": name, "shape": list(w.shape)}
                | {f"gflops_{g}": flops / seconds[g] / 1e9 for g in GEMMS}
            )
    prefill_rows = []
    for prompts, tokens in shapes:
        ms = {g: statistics.median(prefill_times[g, (prompts, tokens)]) * 1e3 for g in GEMMS}
        prefill_rows.append({"prompts": prompts, "tokens": tokens} | {f"ms_{g}": ms[g] for g in GEMMS})

    fidelity_rows = []
    for set_name, adapter in CASES:
        examples = json.loads((DATA / f"{set_name}.json").read_text())[: args.limit]
        prompts = [build_prompt(e) for e in examples]
        model = serving_model(torch.float32, adapter)
        outputs = {}
        for gemm in GEMMS:
            use_prefill_gemm(gemm)
            outputs[gemm] = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
        old, new = outputs["torch"], outputs["onednn"]
        fidelity_rows.append(
            {
                "set": set_name,
                "adapter": adapter,
                "examples": len(examples),
                "identical": sum(a == b for a, b in zip(old, new)),
                "mean_shared_prefix_tokens": sum(shared_prefix(a, b) for a, b in zip(old, new)) / len(examples),
                "mean_tokens": sum(map(len, old)) / len(examples),
            }
        )
        print(fidelity_rows[-1], flush=True)
    use_prefill_gemm("onednn")

    print(f"\nmachine: {machine()}; SmolLM2-135M fp32, medians of {args.rounds} rounds\n")
    print_table(
        ["rows", "weight", "GFLOP/s F.linear", "GFLOP/s oneDNN", "oneDNN / F.linear"],
        [
            [
                r["rows"],
                r["weight"],
                f"{r['gflops_torch']:.0f}",
                f"{r['gflops_onednn']:.0f}",
                f"{r['gflops_onednn'] / r['gflops_torch']:.2f}x",
            ]
            for r in gemm_rows
        ],
    )
    print()
    print_table(
        ["prompts x tokens", "prefill ms F.linear", "prefill ms oneDNN", "speed-up"],
        [
            [
                f"{r['prompts']} x {r['tokens']}",
                f"{r['ms_torch']:.0f}",
                f"{r['ms_onednn']:.0f}",
                f"{r['ms_torch'] / r['ms_onednn']:.2f}x",
            ]
            for r in prefill_rows
        ],
    )
    print()
    print_table(
        ["set", "adapter", "identical", "shared prefix"],
        [
            [
                r["set"],
                r["adapter"] or "-",
                f"{r['identical']}/{r['examples']}",
                f"{r['mean_shared_prefix_tokens']:.1f} of {r['mean_tokens']:.1f}",
            ]
            for r in fidelity_rows
        ],
    )
    config = vars(args) | {"out": str(args.out)}
    write_json(args.out, {"config": config, "gemm": gemm_rows, "prefill": prefill_rows, "fidelity": fidelity_rows})


if __name__ == "__main__":
    main()
