"""The model's forward calls for a running batch, and the KV cache of its rows.

`RunningBatch` (`neuroada_server.generation`) keeps the rows' requests, sampling and stop handling; a
`BatchForward` keeps their cache and runs the model over them. Two implementations, one picker:

- `LlamaForward` (`neuroada_server.forward.llama`): our own decoder over a Llama-shaped model's modules
  (llama, mistral, qwen2, qwen3), with a slot KV cache that rows join and leave without
  concatenation, a decode step with little besides the linears' weight reads, and a prefix
  cache (`neuroada_server.forward.prefix_cache`) that spares a prompt the blocks an earlier one computed;
- `HFForward` (`neuroada_server.forward.hf`): Hugging Face's forward with its dynamic cache, left-padded;
  every family in `neuroada.config.DEFAULT_TARGETS` runs on it.

Both call the model's linear modules themselves, so the merged path (weights switched in place)
and the mixed path (target linears' forwards replaced, `neuroada_server.mixed`) work the same on both.
`DecodeGraphs` (`neuroada_server.forward.graphs`) compiles our decoder's step per batch-size bucket where
the server is asked to (`--compile-decode`).
"""

from __future__ import annotations

import logging
from typing import Literal, Protocol

import torch
from torch import nn

from neuroada_server.forward.hf import HFForward
from neuroada_server.forward.llama import LlamaForward, llama_unsupported
from neuroada_server.forward.prefilled import Prefilled
from neuroada_server.forward.prefix_cache import PrefixCache, PrefixKey

log = logging.getLogger(__name__)

Runner = Literal["auto", "hf"]


class BatchForward(Protocol):
    """The forward calls of one batch's rows, in row order, and their KV cache."""

    def prefill(
        self,
        prompts: list[list[int]],
        prefix_keys: list[PrefixKey | None] | None = None,
        every_position: list[bool] | None = None,
    ) -> Prefilled:
        """Logits [n, V] (float32) after each prompt's last token, how many of each prompt's tokens
        came from the prefix cache (under its key in `prefix_keys`; None: not cached), the
        newcomers' cache, to `join` once they are accepted (until then the batch is unchanged), and
        for the prompts `every_position` marks, the logits after each position (such a prompt reads
        only cached blocks that kept their hidden states)."""

    def join(self, newcomers: object) -> None:
        """Append the rows `prefill` computed."""

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed each row its next token; logits [B, V] float32. Atomic: if it raises, nothing changed."""

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (ascending), dropping the others' cache."""

    def split(self, half: int) -> BatchForward:
        """Rows [half:] move into a forward of their own (to step apart, then `merge` back)."""

    def merge(self, other: BatchForward) -> None:
        """Take back the rows of a forward made by `split`, after ours."""

    def clear(self) -> None:
        """No rows; their cache is freed."""


def batch_forward(
    model: nn.Module, pad_id: int, runner: Runner = "auto", prefix_cache: PrefixCache | None = None
) -> BatchForward:
    """Our decoder where the model's family has it and `runner` is auto (with `prefix_cache`, if
    given); Hugging Face's otherwise."""
    if runner == "auto":
        reason = llama_unsupported(model)
        if reason is None:
            return LlamaForward(model, prefix_cache=prefix_cache)
        log.debug("running Hugging Face's forward: %s", reason)
    return HFForward(model, pad_id)
