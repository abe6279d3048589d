"""Fidelity of `--weight-dtype bfloat16`: the engine's greedy outputs with bf16 linear weights against fp32.

    python benchmarks/bf16_weights.py [--limit 100] [--max-new-tokens 128] [--threads 2]

On the embedded SmolLM2-135M, our decoder (`neuroada_server.forward.llama`, through `RunningBatch`) answers
the first `--limit` examples of shared dev sets greedily twice: over the fp32 weights, and over
the same weights rounded to bf16 (activations and arithmetic float32, as the server runs them).
A shipped adapter is merged into each the way the server merges it (exactly into fp32; into bf16
with one rounding). Per set: how many generations are identical, the mean number of leading
tokens they share, and each side's accuracy by `neuroada eval`'s scoring. Writes JSON beside this
file. Reads `../shared/data` (the evaluation data), like `neuroada eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, print_table, set_threads, write_json  # noqa: E402

from neuroada.base_model import load_base_model, load_tokenizer  # noqa: E402
from neuroada.data import build_prompt  # noqa: E402
from neuroada.evaluate import is_correct  # noqa: E402
from neuroada.format import read_adapter  # noqa: E402
from neuroada.inplace import apply_adapter_  # noqa: E402
from neuroada_kernels import use_decode_linears  # noqa: E402
from neuroada_server.engine import round_linear_weights_  # noqa: E402
from neuroada_server.generation import Finished, GenerationRequest, RunningBatch, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# (set, adapter file or None): arithmetic with and without its adapter, ARC with its adapter
CASES = [("addsub_test", None), ("addsub_test", "gsm8k"), ("arc_easy_test", "commonsense")]


def serving_model(weight_dtype: torch.dtype, adapter: str | None):
    model = load_base_model()
    if weight_dtype != torch.float32:
        round_linear_weights_(model, weight_dtype)
    if adapter is not None:
        apply_adapter_(model, read_adapter(ROOT / "adapters" / f"{adapter}.safetensors"))
    use_decode_linears(model)
    return model


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy token ids per prompt through the engine's running batch, `batch_size` rows at a time."""
    eos = {tokenizer.eos_token_id}
    params = SamplingParams(max_new_tokens=max_new_tokens)
    outputs: list[list[int]] = []
    for lo in range(0, len(prompts), batch_size):
        finished: dict[int, Finished] = {}
        batch = RunningBatch(model, tokenizer, eos, tokenizer.pad_token_id)
        requests = [
            GenerationRequest(
                tokenizer(p, add_special_tokens=False).input_ids,
                None,
                params,
                lambda event, i=i: finished.__setitem__(i, event) if isinstance(event, Finished) else None,
            )
            for i, p in enumerate(prompts[lo : lo + batch_size])
        ]
        with torch.inference_mode():
            batch.join(requests)
            while batch:
                batch.step()
        outputs += [tokenizer(finished[i].text, add_special_tokens=False).input_ids for i in range(len(requests))]
    return outputs


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """How two runs' generations of the same prompts agree: identical ones, mean shared leading tokens."""
    return {
        "identical": sum(x == y for x, y in zip(a, b)),
        "mean_shared_prefix_tokens": sum(shared_prefix(x, y) for x, y in zip(a, b)) / len(a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("bf16_weights.json"))
    args = parser.parse_args()
    set_threads(args.threads)
    tokenizer = load_tokenizer()

    rows = []
    for name, adapter in CASES:
        examples = json.loads((DATA / f"{name}.json").read_text())[: args.limit]
        prompts = [build_prompt(e) for e in examples]
        texts, seconds = {}, {}
        for label, dtype in (("fp32", torch.float32), ("bf16 weights", torch.bfloat16)):
            model = serving_model(dtype, adapter)
            started = time.perf_counter()
            texts[label] = generate(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
            seconds[label] = time.perf_counter() - started
            del model
        fp32, bf16 = texts["fp32"], texts["bf16 weights"]
        correct = {
            label: sum(is_correct(tokenizer.decode(ids), str(e["answer"])) for ids, e in zip(out, examples))
            for label, out in texts.items()
        }
        row = {
            "set": name,
            "adapter": adapter,
            "examples": len(examples),
            **agreement(fp32, bf16),
            "mean_tokens_fp32": sum(map(len, fp32)) / len(examples),
            "correct_fp32": correct["fp32"],
            "correct_bf16": correct["bf16 weights"],
            "seconds_fp32": seconds["fp32"],
            "seconds_bf16": seconds["bf16 weights"],
        }
        rows.append(row)
        print(row, flush=True)

    print(f"\nmachine: {machine()}; SmolLM2-135M, greedy, up to {args.max_new_tokens} new tokens\n")
    print_table(
        ["set", "adapter", "identical", "shared prefix", "correct fp32", "correct bf16w", "s fp32", "s bf16w"],
        [
            [
                r["set"],
                r["adapter"] or "-",
                f"{r['identical']}/{r['examples']}",
                f"{r['mean_shared_prefix_tokens']:.1f} of {r['mean_tokens_fp32']:.1f}",
                r["correct_fp32"],
                r["correct_bf16"],
                f"{r['seconds_fp32']:.0f}",
                f"{r['seconds_bf16']:.0f}",
            ]
            for r in rows
        ],
    )
    write_json(args.out, {"config": vars(args) | {"out": str(args.out)}, "rows": rows})


if __name__ == "__main__":
    main()
