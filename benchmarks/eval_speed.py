"""`neuroada eval` (the serving engine in-process) against Hugging Face `generate` in padded batches.

    python benchmarks/eval_speed.py [--limit 64] [--rounds 2]

The peer is what `neuroada eval` did before it ran on the engine, and what lm-eval-harness's HF
backend does: the adapter merged into the model, prompts sorted by length, `generate` greedily on
batches of 16, left padding, every batch running until its longest answer ends. Ours is the
command as a user runs it. Both in their own process, the model load included, on the same
examples, adapter and max new tokens, interleaved in rounds; then how many answers agree and each
side's accuracy. Cases: the first `--limit` AddSub examples with the gsm8k adapter (256 new tokens,
`neuroada eval`'s default for open answers) and ARC-Easy with the commonsense adapter (32, its
default for choice answers). Reads `../shared/data`; writes JSON beside this file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, print_table, write_json  # noqa: E402

from neuroada.base_model import load_base_model, load_tokenizer  # noqa: E402
from neuroada.data import build_prompt, load_examples  # noqa: E402
from neuroada.evaluate import is_correct  # noqa: E402
from neuroada.format import read_adapter  # noqa: E402
from neuroada.inplace import apply_adapter_  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CASES = [("addsub_test", "gsm8k", 256), ("arc_easy_test", "commonsense", 32)]  # set, adapter, max new tokens
BATCH = 16


@torch.inference_mode()
def hf_generate_side(data: Path, adapter: Path, limit: int, max_new_tokens: int, out: Path) -> None:
    """The peer, in this (child) process: per-example JSONL like `neuroada eval --out`."""
    model, tokenizer = load_base_model(), load_tokenizer()
    apply_adapter_(model, read_adapter(adapter))
    tokenizer.padding_side = "left"
    examples = load_examples(data)[:limit]
    prompts = [build_prompt(e) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # less padding per batch
    texts: dict[int, str] = {}
    for lo in range(0, len(order), BATCH):
        chunk = order[lo : lo + BATCH]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for i, row in zip(chunk, ids[:, enc["input_ids"].shape[1] :]):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    records = [
        {"index": i, "answer": e["answer"], "generation": texts[i], "correct": is_correct(texts[i], str(e["answer"]))}
        for i, e in enumerate(examples)
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))


def run_side(side: str, data: Path, adapter: Path, limit: int, max_new_tokens: int, out: Path) -> float:
    """Wall seconds of one side in a fresh process, its answers in `out`."""
    common = ["--data", str(data), "--adapter", str(adapter), "--max-new-tokens", str(max_new_tokens)]
    if side == "neuroada eval":
        command = [sys.executable, "-m", "neuroada.cli", "eval", *common, "--limit", str(limit)]
        command += ["--batch-size", str(BATCH), "--out", str(out)]
    else:
        command = [sys.executable, __file__, "--hf-side", *common, "--limit", str(limit), "--out", str(out)]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--hf-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--max-new-tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_side:
        hf_generate_side(args.data, args.adapter, args.limit, args.max_new_tokens, args.out)
        return

    sides = ["neuroada eval", "HF generate"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, adapter, max_new_tokens in CASES:
            data, adapter_path = DATA / f"{name}.json", ROOT / "adapters" / f"{adapter}.safetensors"
            seconds: dict[str, list[float]] = {side: [] for side in sides}
            answers: dict[str, list[dict]] = {}
            for r in range(args.rounds):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    out = Path(tmp) / f"{name}-{side.replace(' ', '_')}.jsonl"
                    seconds[side].append(run_side(side, data, adapter_path, args.limit, max_new_tokens, out))
                    answers[side] = [json.loads(line) for line in out.read_text().splitlines()]
                    print(f"{name} round {r}: {side} {seconds[side][-1]:.1f} s", flush=True)
            ours, peer = (answers[s] for s in sides)
            results.append(
                {
                    "set": name,
                    "adapter": adapter,
                    "examples": len(ours),
                    "max_new_tokens": max_new_tokens,
                    "seconds": seconds,
                    "correct": {s: sum(r["correct"] for r in answers[s]) for s in sides},
                    "same_generation": sum(a["generation"] == b["generation"] for a, b in zip(ours, peer)),
                    "same_verdict": sum(a["correct"] == b["correct"] for a, b in zip(ours, peer)),
                }
            )
    rows = [
        [
            f"{r['set']} ({r['examples']}, {r['max_new_tokens']} tokens)",
            f"{min(r['seconds']['neuroada eval']):.1f}",
            f"{min(r['seconds']['HF generate']):.1f}",
            f"{min(r['seconds']['HF generate']) / min(r['seconds']['neuroada eval']):.2f}x",
            f"{r['correct']['neuroada eval']} / {r['correct']['HF generate']}",
            f"{r['same_generation']} / {r['same_verdict']}",
        ]
        for r in results
    ]
    print_table(
        ["set", "neuroada eval s", "HF generate s", "speed-up", "right (ours / HF)", "same text / same verdict"],
        rows,
    )
    write_json(
        Path(__file__).with_suffix(".json"),
        {"machine": machine(), "batch": BATCH, "rounds": args.rounds, "results": results},
    )


if __name__ == "__main__":
    main()
