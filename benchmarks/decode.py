"""Decode throughput: the base alone, the base with a NeuroAda adapter applied, PEFT LoRA.

    python benchmarks/decode.py [--batch 1 8] [--new-tokens 64] [--repeats 3] [--threads 2]

Greedy generate() with exactly `--new-tokens` tokens on the embedded SmolLM2-135M. An applied
NeuroAda adapter lives inside the weights, so it must cost nothing per token; LoRA unmerged
adds its factors to every projection, and PEFT's mixed batches (`adapter_names`) split each
batch by adapter.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--no-lora", action="store_true")
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
    for batch in args.batch:
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

    if not args.no_lora:
        from peft import LoraConfig, get_peft_model

        lora_base = load_base_model(dtype=dtype, device=device)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS), init_lora_weights=False)
        peft_model = get_peft_model(lora_base, config, adapter_name="a0")
        for i in range(1, 4):
            peft_model.add_adapter(f"a{i}", config)
        peft_model.set_adapter("a0")
        peft_model.eval()
        for batch in args.batch:
            rows.append(
                {
                    "variant": "lora r=8 unmerged",
                    "batch": batch,
                    **run(peft_model, tokenizer, batch, args.new_tokens, args.repeats),
                }
            )
            names = [f"a{i % 4}" for i in range(batch)]
            rows.append(
                {
                    "variant": "lora r=8 mixed, 4 adapters",
                    "batch": batch,
                    **run(peft_model, tokenizer, batch, args.new_tokens, args.repeats, adapter_names=names),
                }
            )

    base_tps = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "base"}
    print(
        f"\nmachine: {machine()}; SmolLM2-135M {str(dtype).removeprefix('torch.')}, "
        f"{args.new_tokens} new tokens, greedy\n"
    )
    print_table(
        ["variant", "batch", "tokens/s", "vs base", "s median (min-max)"],
        [
            [
                r["variant"],
                r["batch"],
                f"{r['tokens_per_s']:.1f}",
                f"{r['tokens_per_s'] / base_tps[r['batch']]:.2f}x",
                f"{r['seconds']['median']:.2f} ({r['seconds']['min']:.2f}-{r['seconds']['max']:.2f})",
            ]
            for r in rows
        ],
    )
    write_json(args.out, {"config": vars(args) | {"out": str(args.out)}, "rows": rows})


if __name__ == "__main__":
    main()
