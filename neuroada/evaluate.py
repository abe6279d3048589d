"""Accuracy of a model (with or without an adapter) on an LLM-Adapters data file.

Greedy generation in batches, then the scoring of the shared data's README: arithmetic answers
by the last number in the generation, multiple choice by the first answer token it names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from neuroada.data import build_prompt

_CHOICE = re.compile(r"answer\d|solution\d|option\d|ending\d|true|false", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def is_choice_answer(answer: str) -> bool:
    return _CHOICE.fullmatch(answer.strip()) is not None


def extract_choice(text: str) -> str | None:
    match = _CHOICE.search(text)
    return match.group(0).lower() if match else None


def extract_number(text: str) -> float | None:
    numbers = _NUMBER.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def is_correct(generation: str, answer: str) -> bool:
    if is_choice_answer(answer):
        return extract_choice(generation) == answer.strip().lower()
    predicted = extract_number(generation)
    try:
        gold = float(answer.replace(",", ""))
    except ValueError:
        return False
    return predicted is not None and abs(predicted - gold) < 1e-4


@torch.inference_mode()
def generate_greedy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    # Longest prompts first keeps padding (and wasted compute) low within each batch.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: dict[int, str] = {}
    for lo in range(0, len(order), batch_size):
        chunk = order[lo : lo + batch_size]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for i, row in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True)
    return [texts[i] for i in range(len(prompts))]


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    correct: int
    total: int


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    max_new_tokens: int = 256,
    batch_size: int = 16,
    out_jsonl: Path | None = None,
) -> EvalResult:
    prompts = [build_prompt(e) for e in examples]
    generations = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    records = [
        {"index": i, "answer": e["answer"], "generation": g, "correct": is_correct(g, str(e["answer"]))}
        for i, (e, g) in enumerate(zip(examples, generations))
    ]
    if out_jsonl is not None:
        out_jsonl.parent.mkdir(parents=True, exist_ok=True)
        out_jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    correct = sum(r["correct"] for r in records)
    return EvalResult(accuracy=correct / max(1, len(records)), correct=correct, total=len(records))
