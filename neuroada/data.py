"""Instruction data in the LLM-Adapters JSON format, and its tokenization for training.

A data file is a JSON list of {instruction, input, output[, answer]}. Training sees
`prompt(example) + output + eos`, with the loss on the response tokens only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
IGNORE_INDEX = -100


def load_examples(path: str | Path) -> list[dict]:
    examples = json.loads(Path(path).read_text())
    if not isinstance(examples, list) or not all(isinstance(e, dict) and "instruction" in e for e in examples):
        raise ValueError(f"{path}: expected a JSON list of objects with 'instruction' (LLM-Adapters format)")
    return examples


def file_sha256(path: str | Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_prompt(example: dict) -> str:
    instruction = example["instruction"].strip()
    if example.get("input", "").strip():
        return _PROMPT_WITH_INPUT.format(instruction=instruction, input=example["input"].strip())
    return _PROMPT.format(instruction=instruction)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens


def tokenize_example(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TokenizedExample:
    prompt_ids = tokenizer(build_prompt(example), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return TokenizedExample(input_ids, labels)


def collate(batch: list[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, all [B, T]."""
    T = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(len(batch), T, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
