"""Scoring a generation against an LLM-Adapters answer, as the shared data's README does:
arithmetic answers by the last number in the generation, multiple choice by the first answer
token it names. (`neuroada eval`, in `neuroada_server.cli`, generates the answers with the serving engine.)
"""

from __future__ import annotations

import re

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
