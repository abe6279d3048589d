"""A prefill's products on oneDNN against torch's `F.linear` (MKL's sgemm): speed, greedy outputs, serving.

    python benchmarks/prefill.py [--shapes 1x38 4x38 16x38 1x512 4x512] [--rounds 5]
                                 [--limit 100] [--max-new-tokens 128] [--serve-rounds 4] [--threads 2]

Past a decode step's rows, `neuroada_kernels.linear` computes the float32 CPU products of a prefill with
oneDNN's GEMM (`use_prefill_gemm`), or on an Intel CPU with `F.linear` (MKL's sgemm): whichever this
script found faster on each vendor's CPU. On the embedded SmolLM2-135M
(fp32, laid out as the server lays it out), each GEMM in turn, round after round:
- linears: one layer's products (q/k/v as one, o, gate, up, down) at the rows of each shape, GFLOP/s;
- prefill: `LlamaForward.prefill` of P prompts of T tokens (`--shapes PxT`; the prompt of
  `serve_load.py`, tiled or cut to T), milliseconds, median over rounds.
Then greedy fidelity, as `bf16_weights.py` measures it: the first `--limit` examples of the shared
dev sets answered through the engine's running batch with each GEMM; per set, how many
generations are identical and how many leading tokens they share (sums in another order may part
two generations at a near tie). Last, serving: two `neuroada serve` processes on loopback, one as
shipped and one whose `sitecustomize` (a temporary folder first on its PYTHONPATH) switches it to
`F.linear`, driven in turn, the order alternating by round, as `vs_llama_cpp.py` drives a server: 16
closed-loop clients, 48 streamed requests of 32 tokens on the base and on 8 and 32 adapters (the
prefix cache off: every request's prefill is computed);
output tokens/s and time to first token. Writes JSON beside this file. Reads `../shared/data`.
`--limit 0` and `--serve-rounds 0` leave out those parts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bf16_weights import CASES, DATA, agreement, generate, serving_model  # noqa: E402
from common import machine, print_table, set_threads, write_json  # noqa: E402
from serve_load import PROMPT, make_store, scenario, start_server, summary  # noqa: E402

from neuroada.base_model import load_base_model, load_tokenizer  # noqa: E402
from neuroada.data import build_prompt  # noqa: E402
from neuroada_kernels import linear, use_decode_linears  # noqa: E402
from neuroada_kernels.decode_linear import ONEDNN_AVAILABLE, use_prefill_gemm  # noqa: E402
from neuroada_server.engine import place_for_serving_  # noqa: E402
from neuroada_server.forward.llama import LlamaForward  # noqa: E402

GEMMS = ("torch", "onednn")
ROOT = Path(__file__).resolve().parents[1]


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


def speed(shapes: list[tuple[int, int]], rounds: int) -> tuple[list[dict], list[dict]]:
    """Rows of the linears' GFLOP/s and of the prefills' milliseconds, per GEMM."""
    model, tokenizer = load_base_model(), load_tokenizer()
    place_for_serving_(model, torch.device("cpu"))
    use_decode_linears(model)
    weights = layer_weights(model)
    prompt = tokenizer(PROMPT).input_ids
    row_counts = sorted({p * t for p, t in shapes})
    gemm_times = {(g, rows, name): [] for g in GEMMS for rows in row_counts for name in weights}
    prefill_times = {(g, shape): [] for g in GEMMS for shape in shapes}
    with torch.inference_mode():
        for round_ in range(rounds):
            for gemm in GEMMS:
                use_prefill_gemm(gemm)
                for rows in row_counts:
                    for name, w in weights.items():
                        gemm_times[gemm, rows, name].append(gemm_seconds(torch.randn(rows, w.shape[1]), w))
                for prompts, tokens in shapes:
                    forward = LlamaForward(model)
                    started = time.perf_counter()
                    forward.prefill([prompt_of(prompt, tokens)] * prompts)
                    prefill_times[gemm, (prompts, tokens)].append(time.perf_counter() - started)
            print(f"  speed, round {round_} done", flush=True)
    use_prefill_gemm("onednn")
    gemm_rows = [
        {"rows": rows, "weight": name, "shape": list(w.shape)}
        | {f"gflops_{g}": 2 * rows * w.numel() / statistics.median(gemm_times[g, rows, name]) / 1e9 for g in GEMMS}
        for rows in row_counts
        for name, w in weights.items()
    ]
    prefill_rows = [
        {"prompts": p, "tokens": t} | {f"ms_{g}": statistics.median(prefill_times[g, (p, t)]) * 1e3 for g in GEMMS}
        for p, t in shapes
    ]
    return gemm_rows, prefill_rows


def fidelity(limit: int, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Per dev set (and adapter): the greedy generations of each GEMM compared."""
    tokenizer, rows = load_tokenizer(), []
    for set_name, adapter in CASES:
        examples = json.loads((DATA / f"{set_name}.json").read_text())[:limit]
        prompts = [build_prompt(e) for e in examples]
        model = serving_model(torch.float32, adapter)
        outputs = {}
        for gemm in GEMMS:
            use_prefill_gemm(gemm)
            outputs[gemm] = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        use_prefill_gemm("onednn")
        old, new = outputs["torch"], outputs["onednn"]
        rows.append(
            {
                "set": set_name,
                "adapter": adapter,
                "examples": len(examples),
                **agreement(old, new),
                "mean_tokens": sum(map(len, old)) / len(examples),
            }
        )
        print(f"  fidelity: {rows[-1]}", flush=True)
    return rows


SERVE_ADAPTERS = (0, 8, 32)
SERVE_CLIENTS, SERVE_REQUESTS, SERVE_TOKENS = 16, 48, 32


def serving(rounds: int, threads: int) -> list[dict]:
    """A row per GEMM and adapter count: the two servers' passes, summed as `serve_load.py` sums them."""
    with tempfile.TemporaryDirectory(prefix="neuroada-prefill-") as tmp:
        folder = Path(tmp)
        make_store(folder / "store", max(SERVE_ADAPTERS))
        site = folder / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            'from neuroada_kernels.decode_linear import use_prefill_gemm\n\nuse_prefill_gemm("torch")\n'
        )
        servers = {}
        try:
            store, path = folder / "store", {"PYTHONPATH": f"{site}:{ROOT}"}
            servers["onednn"] = start_server("neuroada", store, threads, SERVE_CLIENTS, prefix_cache=False)
            servers["torch"] = start_server("neuroada", store, threads, SERVE_CLIENTS, path, prefix_cache=False)
            names = {n: [f"task{i:02d}" for i in range(n)] for n in SERVE_ADAPTERS}
            for _, url in servers.values():  # warm-up, unrecorded
                asyncio.run(scenario(url, names[8], "uniform", 4, 8, 8, seed=0))
            passes = {(g, n): [] for g in GEMMS for n in SERVE_ADAPTERS}
            for round_ in range(rounds):
                order = list(servers.items()) if round_ % 2 == 0 else list(reversed(servers.items()))
                for n in SERVE_ADAPTERS:
                    for gemm, (_, url) in order:
                        one = asyncio.run(
                            scenario(url, names[n], "uniform", SERVE_CLIENTS, SERVE_REQUESTS, SERVE_TOKENS, seed=round_)
                        )
                        passes[gemm, n].append(one)
                        row = summary([one], names[n], "uniform", SERVE_CLIENTS, SERVE_TOKENS)
                        print(
                            f"  serving, round {round_}, {n} adapters, {gemm}: {row['tokens_per_s']:.1f} tok/s, "
                            f"TTFT p50 {row['ttft_p50']:.2f} s",
                            flush=True,
                        )
        finally:
            for proc, _ in servers.values():
                proc.kill()
                proc.wait()
    return [{"gemm": g, **summary(passes[g, n], names[n], "uniform", SERVE_CLIENTS, SERVE_TOKENS)} for g, n in passes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1x38", "4x38", "16x38", "1x512", "4x512"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--serve-rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("prefill.json"))
    args = parser.parse_args()
    if not ONEDNN_AVAILABLE:
        sys.exit("this torch build has no oneDNN linear: nothing to compare")
    set_threads(args.threads)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes]

    gemm_rows, prefill_rows = speed(shapes, args.rounds)
    fidelity_rows = fidelity(args.limit, args.max_new_tokens, args.batch_size) if args.limit else []
    serving_rows = serving(args.serve_rounds, args.threads) if args.serve_rounds else []

    print(f"\nmachine: {machine()}; SmolLM2-135M fp32, medians of {args.rounds} rounds\n")
    print_table(
        ["rows", "weight", "GFLOP/s F.linear", "GFLOP/s oneDNN", "oneDNN / F.linear"],
        [
            [r["rows"], r["weight"], f"{r['gflops_torch']:.0f}", f"{r['gflops_onednn']:.0f}",
             f"{r['gflops_onednn'] / r['gflops_torch']:.2f}x"]
            for r in gemm_rows
        ],
    )  # fmt: skip
    print()
    print_table(
        ["prompts x tokens", "prefill ms F.linear", "prefill ms oneDNN", "speed-up"],
        [
            [f"{r['prompts']} x {r['tokens']}", f"{r['ms_torch']:.0f}", f"{r['ms_onednn']:.0f}",
             f"{r['ms_torch'] / r['ms_onednn']:.2f}x"]
            for r in prefill_rows
        ],
    )  # fmt: skip
    if fidelity_rows:
        print()
        print_table(
            ["set", "adapter", "identical", "shared prefix"],
            [
                [r["set"], r["adapter"] or "-", f"{r['identical']}/{r['examples']}",
                 f"{r['mean_shared_prefix_tokens']:.1f} of {r['mean_tokens']:.1f}"]
                for r in fidelity_rows
            ],
        )  # fmt: skip
    if serving_rows:
        print(f"\nserving: {SERVE_CLIENTS} clients, {SERVE_REQUESTS} requests x {SERVE_TOKENS} tokens, "
              f"{args.serve_rounds} rounds\n")  # fmt: skip
        print_table(
            ["prefill GEMM", "adapters", "out tok/s", "TTFT p50/p99 s", "e2e p50/p99 s"],
            [
                [r["gemm"], r["adapters"] or "base", f"{r['tokens_per_s']:.1f}",
                 f"{r['ttft_p50']:.2f}/{r['ttft_p99']:.2f}", f"{r['e2e_p50']:.2f}/{r['e2e_p99']:.2f}"]
                for r in serving_rows
            ],
        )  # fmt: skip
    config = vars(args) | {"out": str(args.out)}
    write_json(
        args.out,
        {
            "config": config,
            "gemm": gemm_rows,
            "prefill": prefill_rows,
            "fidelity": fidelity_rows,
            "serving": serving_rows,
        },
    )


if __name__ == "__main__":
    main()
