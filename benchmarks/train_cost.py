"""Training cost of NeuroAda against other ways to tune the same layers, one process per variant.

    python benchmarks/train_cost.py [--k 1 20] [--steps 5] [--rounds 1] [--threads 2] [--mmap-threshold BYTES]
                                    [--device cpu|cuda]

Embedded SmolLM2-135M, float32, batch 4 x 256 tokens, all seven Llama projections targeted.
Variants: floor (the frozen base's forward+backward, activation gradients only), ours
(`neuroada_kernels.sparse_linear`: on the CPU the frozen GEMM with the deltas merged in place),
ours_bf16_inputs (the same, keeping the layer inputs for grad_values in bfloat16), reference
(the NeuroAda authors' formulation: a dense W + scatter_add rebuilt every forward), mask (dense
W trainable, gradient masked to the k positions, AdamW over W), lora (PEFT LoRA r=8; needs the
`bench` extra). Prints median s/step (min-max) and peak memory: RSS on the CPU, the device's
allocations on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, set_threads, summarize, timed, write_json  # noqa: E402

VARIANTS = ["floor", "ours", "ours_bf16_inputs", "reference", "mask", "lora"]
SPARSE = ("ours", "ours_bf16_inputs", "reference", "mask")  # the variants that take --k
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ScatterAddLinear(nn.Module):
    """The reference implementation's formulation: W' = W + scatter(theta) rebuilt per forward."""

    def __init__(self, linear: nn.Linear, indices: torch.Tensor):
        super().__init__()
        self.weight = linear.weight
        d_out, d_in = linear.weight.shape
        rows = torch.arange(d_out, device=indices.device)[:, None] * d_in
        self.register_buffer("flat_pos", (indices + rows).reshape(-1))
        self.theta = nn.Parameter(torch.zeros(indices.numel()))

    def forward(self, x):
        w = self.weight.flatten().scatter_add(0, self.flat_pos, self.theta).view_as(self.weight)
        return F.linear(x, w)


def child(variant: str, k: int, steps: int, device: str) -> dict:
    from neuroada import NeuroAdaConfig, attach
    from neuroada.base_model import load_base_model
    from neuroada.fingerprint import linear_layers
    from neuroada.model import _set_module, trainable_parameters
    from neuroada.selection import select_topk

    model = load_base_model(device=device)
    model.train()
    targets = {n: m for n, m in linear_layers(model).items() if n.rsplit(".", 1)[-1] in TARGETS}
    params: list[torch.Tensor] = []
    if variant in ("ours", "ours_bf16_inputs"):
        attach(model, NeuroAdaConfig(k=k, saved_inputs="bfloat16" if variant == "ours_bf16_inputs" else "float32"))
        params = trainable_parameters(model)
    elif variant == "reference":
        for name, m in targets.items():
            layer = ScatterAddLinear(m, select_topk(m.weight, k))
            _set_module(model, name, layer)
            params.append(layer.theta)
    elif variant == "mask":
        for m in targets.values():
            mask = torch.zeros_like(m.weight).scatter_(1, select_topk(m.weight, k), 1.0)
            m.weight.requires_grad_(True)
            m.weight.register_hook(lambda g, mask=mask: g * mask)
            params.append(m.weight)
    elif variant == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), lora_dropout=0.0))
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0) if params else None

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=g).to(device)
    embed = model.get_input_embeddings()

    def step():
        if variant == "floor":
            # Gradients flow to every activation (as for any adapter), but to no weight.
            inputs = embed(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=inputs, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    cuda = torch.device(device).type == "cuda"
    samples = timed(step, repeats=steps, warmup=1, sync=cuda)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {
        "variant": variant,
        "k": k if variant in SPARSE else None,
        "trainable": sum(p.numel() for p in params)
        if variant != "mask"
        else sum(int(m.weight.numel()) for m in targets.values()),
        "effective_trainable": sum(p.numel() for p in params)
        if variant != "mask"
        else k * sum(m.weight.shape[0] for m in targets.values()),
        "step_s": summarize(samples),
        "samples": samples,
        "peak_rss_gb": rss_gb,
        # on a GPU the memory that counts is the device's: what the caching allocator handed out
        "peak_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else rss_gb,
    }


def _pool(results: list[dict]) -> dict:
    """One variant's rounds: step samples pooled, peak memory the median of the rounds' peaks."""
    samples = [t for r in results for t in r["samples"]]
    peaks = [r["peak_gb"] for r in results]
    return {
        **results[0],
        "step_s": summarize(samples),
        "samples": samples,
        "peak_gb": statistics.median(peaks),
        "peak_gb_rounds": peaks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (float32; memory is then the device's peak)")
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("train_cost.json"))
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        help="run the variants with glibc's MALLOC_MMAP_THRESHOLD_ fixed at this many bytes: freed "
        "activations go back to the system, so peak RSS shows live memory rather than what the "
        "allocator kept (steps get slower: every large tensor is fresh pages)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved passes over the variants, pooled")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.k[0], args.steps, args.device)))
        return

    # With --rounds N every (variant, k) runs once per round, the rounds one after another, so a
    # slow spell of the machine lands on all variants alike; a variant's samples are pooled.
    cases = [(v, k) for v in args.variants for k in (args.k if v in SPARSE else [args.k[0]])]
    pooled: dict[tuple[str, int], list[dict]] = {case: [] for case in cases}
    for round_ in range(args.rounds):
        for variant, k in cases:
            cmd = [sys.executable, __file__, "--child", variant, "--k", str(k), "--steps", str(args.steps)]
            cmd += ["--threads", str(args.threads), "--device", args.device]
            env = dict(os.environ)
            if args.mmap_threshold is not None:
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(f"{variant} k={k} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            pooled[(variant, k)].append(json.loads(lines[-1][7:]))
            median = pooled[(variant, k)][-1]["step_s"]["median"]
            print(f"  round {round_ + 1}: {variant} k={k}: {median:.2f} s/step", flush=True)
    runs = [_pool(results) for results in pooled.values() if results]

    floor = next((r for r in runs if r["variant"] == "floor"), None)
    rows = []
    for r in runs:
        s = r["step_s"]
        ratio = f"{s['median'] / floor['step_s']['median']:.2f}x" if floor else "-"
        mem = f"{r['peak_gb'] / floor['peak_gb']:.2f}x" if floor else "-"
        rows.append(
            [
                r["variant"],
                r["k"] or "-",
                f"{r['effective_trainable']:,}",
                f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})",
                ratio,
                f"{r['peak_gb']:.2f}",
                mem,
            ]
        )
    steps = f"{args.steps} timed steps x {args.rounds} rounds"
    print(f"\nmachine: {machine()}; {args.device}, SmolLM2-135M fp32, batch 4 x 256 tokens, {steps}\n")
    memory = "peak device GB" if args.device.startswith("cuda") else "peak RSS GB"
    print_table(["variant", "k", "trainable", "s/step median (min-max)", "vs floor", memory, "vs floor"], rows)
    config = {"batch": 4, "seq_len": 256, "steps": args.steps, "rounds": args.rounds, "threads": args.threads}
    config["device"] = args.device
    write_json(args.out, {"config": {**config, "mmap_threshold": args.mmap_threshold}, "runs": runs})


if __name__ == "__main__":
    main()
