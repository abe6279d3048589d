"""Decode throughput: the base alone, a NeuroAda adapter applied, mixed-adapter batches, PEFT LoRA.

    python benchmarks/decode.py [--batch 1 8] [--mixed-batch 8 32] [--mixed-k 1 4 20]
                                [--adapters 1 4 8] [--new-tokens 64] [--repeats 3] [--threads 2]
                                [--loop-only]

Exactly `--new-tokens` greedy tokens on the embedded SmolLM2-135M, prefill included.
- generate() section: an applied NeuroAda adapter lives inside the weights, so it must cost
  nothing per token; LoRA unmerged adds its factors to every projection; PEFT's mixed batches
  (`adapter_names`) split each batch by adapter.
- server-loop section: the server's own decode loop (`RunningBatch`) on the base alone and on
  the mixed path, rows spread over 1, 4 or 8 adapters (all magnitude-selected, so they share
  one index set, as adapters trained on one base with one k do).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, set_threads, summarize, timed, write_json  # noqa: E402
from switch import TARGETS, random_adapter  # noqa: E402

PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def run(model, tokenizer, batch: int, new_tokens: int, repeats: int, **generate_kwargs) -> dict:
    device = next(model.parameters()).device
    ids = tokenizer([PROMPT] * batch, return_tensors="pt").input_ids.to(device)

    @torch.inference_mode()
    def go():
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            **generate_kwargs,
        )

    samples = timed(go, repeats=repeats, warmup=1, sync=device.type == "cuda")
    return {"seconds": summarize(samples), "tokens_per_s": batch * new_tokens / summarize(samples)["median"]}


class RowDeltas:
    """`BatchAdapters` that always take the mixed path: each row's delta beside the weights."""

    applied_name = None

    def __init__(self, mixed):
        self.mixed = mixed

    def plan(self, requests) -> None:
        pass

    def bind(self, rows) -> None:
        self.mixed.bind([r.resident for r in rows])

    def reset(self) -> None:
        self.mixed.unbind()


def loop_runner(model, tokenizer, batch: int, new_tokens: int, residents: list, mixed):
    """One run of the server's decode loop; rows use residents[i % len(residents)] (None: the base alone)."""
    from neuroada_server.batch_adapters import NoAdapters
    from neuroada_server.generation import GenerationRequest, RunningBatch, SamplingParams

    ids = tokenizer(PROMPT).input_ids
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    adapters = RowDeltas(mixed) if residents[0] is not None else NoAdapters()

    def go():
        requests = [GenerationRequest(ids, None, params, lambda event: None) for _ in range(batch)]
        for i, r in enumerate(requests):
            r.resident = residents[i % len(residents)]
        running = RunningBatch(model, tokenizer, {tokenizer.eos_token_id}, tokenizer.pad_token_id)
        running.join(requests, adapters)
        while running:
            running.step(adapters)
        adapters.reset()

    return go


def mixed_rows(model, tokenizer, base, packed, args) -> list[dict]:
    """The loop rows of one batch size are timed in rounds, each round running every variant
    once (base included), so a machine that speeds up or slows down over minutes moves all of
    them alike; medians over the rounds."""
    from neuroada.format import adapter_to_bytes
    from neuroada_server.mixed import MixedAdapters
    from neuroada_server.resident import AdapterLoader

    loader = AdapterLoader(packed, base, fidelity_threshold=0.0)
    mixed = MixedAdapters(model, next(model.parameters()).device)
    sync = next(model.parameters()).device.type == "cuda"
    residents = {
        k: [
            loader.prepare(f"k{k}-{i}", adapter_to_bytes(random_adapter(model, base, k, seed=i)))
            for i in range(max(args.adapters))
        ]
        for k in args.mixed_k
    }
    rows = []
    for batch in args.mixed_batch:
        variants = {"loop: base": loop_runner(model, tokenizer, batch, args.new_tokens, [None], mixed)}
        for k in args.mixed_k:
            for n in args.adapters:
                variants[f"loop: mixed k={k}, {n} adapters"] = loop_runner(
                    model, tokenizer, batch, args.new_tokens, residents[k][:n], mixed
                )
        samples = {name: [] for name in variants}
        for name, go in variants.items():
            timed(go, repeats=0, warmup=1, sync=sync)
        for _ in range(args.repeats):
            for name, go in variants.items():
                samples[name] += timed(go, repeats=1, warmup=0, sync=sync)
        for name, times in samples.items():
            tps = batch * args.new_tokens / summarize(times)["median"]
            rows.append({"variant": name, "batch": batch, "seconds": summarize(times), "tokens_per_s": tps})
            print(name, batch, f"{tps:.1f} tok/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--mixed-batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--mixed-k", type=int, nargs="+", default=[1, 4, 20])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--loop-only", action="store_true", help="only the server-loop section")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("decode.json"))
    args = parser.parse_args()
    set_threads(args.threads)

    from neuroada.base_model import load_base_model, load_tokenizer
    from neuroada.fingerprint import BaseModelSpec
    from neuroada.inplace import PackedWeights

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = load_tokenizer()
    model = load_base_model(dtype=dtype, device=device)
    base = BaseModelSpec.from_model(model, "embedded")
    adapter = random_adapter(model, base, args.k, seed=1)
    packed = PackedWeights(model)
    delta = packed.pack(adapter)
    rows = []
    for batch in [] if args.loop_only else args.batch:
        rows.append({"variant": "base", "batch": batch, **run(model, tokenizer, batch, args.new_tokens, args.repeats)})
        saved = packed.apply_(delta)
        rows.append(
            {
                "variant": f"neuroada k={args.k} applied",
                "batch": batch,
                **run(model, tokenizer, batch, args.new_tokens, args.repeats),
            }
        )
        packed.restore_(delta, saved)
    rows += mixed_rows(model, tokenizer, base, packed, args)

    if not (args.no_lora or args.loop_only):
        from peft import LoraConfig, get_peft_model

        lora_base = load_base_model(dtype=dtype, device=device)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), init_lora_weights=False)
        peft_model = get_peft_model(lora_base, config, adapter_name="a0")
        for i in range(1, 4):
            peft_model.add_adapter(f"a{i}", config)
        peft_model.set_adapter("a0")
        peft_model.eval()
        for i in range(4, max(args.adapters)):
            peft_model.add_adapter(f"a{i}", config)
        peft_model.set_adapter("a0")
        for batch in args.batch:
            rows.append(
                {
                    "variant": "lora r=8 unmerged",
                    "batch": batch,
                    **run(peft_model, tokenizer, batch, args.new_tokens, args.repeats),
                }
            )
        for batch in sorted(set(args.batch) | set(args.mixed_batch)):
            for n in (a for a in args.adapters if a > 1):
                names = [f"a{i % n}" for i in range(batch)]
                rows.append(
                    {
                        "variant": f"lora r=8 mixed, {n} adapters",
                        "batch": batch,
                        **run(peft_model, tokenizer, batch, args.new_tokens, args.repeats, adapter_names=names),
                    }
                )
        for batch in (b for b in args.mixed_batch if b not in args.batch):  # generate()'s base at this batch
            rows.append(
                {"variant": "base", "batch": batch, **run(model, tokenizer, batch, args.new_tokens, args.repeats)}
            )

    base_tps = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "base"}
    loop_tps = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "loop: base"}
    print(
        f"\nmachine: {machine()}; SmolLM2-135M {str(dtype).removeprefix('torch.')}, "
        f"{args.new_tokens} new tokens, greedy\n"
    )
    print("vs base: generate() rows against generate()'s base; loop rows against the loop's base\n")
    print_table(
        ["variant", "batch", "tokens/s", "vs base", "s median (min-max)"],
        [
            [
                r["variant"],
                r["batch"],
                f"{r['tokens_per_s']:.1f}",
                f"{r['tokens_per_s'] / (loop_tps if r['variant'].startswith('loop') else base_tps)[r['batch']]:.2f}x",
                f"{r['seconds']['median']:.2f} ({r['seconds']['min']:.2f}-{r['seconds']['max']:.2f})",
            ]
            for r in rows
        ],
    )
    write_json(args.out, {"config": vars(args) | {"out": str(args.out)}, "rows": rows})


if __name__ == "__main__":
    main()
