"""What a `BatchForward.prefill` returns: the newcomers' next-token logits, their cache, and (for
the prompts that ask) the logits after every prompt position."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class PromptLogits:
    """The logits after each of a prompt's positions but its last (those predicting its tokens 1..S-1),
    a slice of positions at a time: all at once would be [S - 1, V] floats."""

    def __init__(self, states: torch.Tensor, to_logits: Callable[[torch.Tensor], torch.Tensor]):
        self.states = states  # [S - 1, *]: what `to_logits` turns into those positions' float32 logits
        self.to_logits = to_logits

    def __len__(self) -> int:
        return self.states.shape[0]

    def __getitem__(self, positions: slice) -> torch.Tensor:  # [len(positions), V] float32
        return self.to_logits(self.states[positions])


class Prefilled(NamedTuple):
    logits: torch.Tensor  # [n, V] float32, after each prompt's last token
    cached: list[int]  # per prompt, its tokens whose keys and values came from the prefix cache
    newcomers: object  # their cache, to `join` once they are accepted: until then the batch is unchanged
    prompt_logits: list[PromptLogits | None]  # per prompt: where `every_position` asked, else None
