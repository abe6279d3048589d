"""Hugging Face's forward over a batch: a dynamic KV cache, rows left-padded to a common length.

Every row's last token sits in the cache's last column and the attention mask marks each row's
padding; keys are stored after rotary embedding with explicit position ids, so padding columns
can be added or cut on the left without changing any row's attention (`neuroada_server.kv_cache`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from neuroada_server import kv_cache
from neuroada_server.forward.prefilled import Prefilled, PromptLogits


@dataclass
class _Newcomers:
    cache: DynamicCache
    mask: torch.Tensor  # [n, T]
    next_pos: torch.Tensor  # [n]


def _forward_options(model: nn.Module) -> tuple[str, dict]:
    """The cache's keyword in this transformers version (`past_key_values` became `cache`), and
    logits for the last position only where the model offers it (a prefill then skips the
    lm_head over every prompt position)."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), (
        {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    )


class HFForward:
    def __init__(self, model: nn.Module, pad_id: int):
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.cache_keyword, self.forward_options = _forward_options(model)
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [B, cache length]
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [B]

    def prefill(
        self, prompts: list[list[int]], prefix_keys: list | None = None, every_position: list[bool] | None = None
    ) -> Prefilled:
        """Every prompt computed whole: no prefix cache on this forward (`prefix_keys` is not read)."""
        T = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), T, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, T - len(prompt) :] = torch.tensor(prompt)
            mask[i, T - len(prompt) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # [n, T]
        cache = DynamicCache()
        every_position = every_position or [False] * len(prompts)
        # [n, T, V] where a prompt wants every position's logits, else [n, 1, V]
        logits = self._forward(input_ids, mask, position_ids, cache, every_position=any(every_position))
        prompt_logits = [
            PromptLogits(logits[i, T - len(prompt) : T - 1], torch.Tensor.float) if every else None
            for i, (prompt, every) in enumerate(zip(prompts, every_position))
        ]
        newcomers = _Newcomers(cache, mask, position_ids[:, -1] + 1)
        return Prefilled(logits[:, -1].float(), [0] * len(prompts), newcomers, prompt_logits)

    def join(self, newcomers: _Newcomers) -> None:
        if self.cache is None:
            self.cache, self.mask = newcomers.cache, newcomers.mask
        else:
            self.mask = kv_cache.join_(self.cache, self.mask, newcomers.cache, newcomers.mask)
        self.next_pos = torch.cat([self.next_pos, newcomers.next_pos])

    def decode(self, tokens: list[int]) -> torch.Tensor:
        mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)  # [B, L + 1]
        input_ids = torch.tensor(tokens, device=self.device)[:, None]  # [B, 1]
        before = kv_cache.snapshot(self.cache)
        try:
            logits = self._forward(input_ids, mask, self.next_pos[:, None], self.cache)[:, -1].float()
        except BaseException:
            kv_cache.set_layers_(self.cache, before)
            raise
        self.mask, self.next_pos = mask, self.next_pos + 1
        return logits

    def keep(self, rows: list[int]) -> None:
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, device=self.device)
        kv_cache.select_(self.cache, index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.mask = kv_cache.trim_(self.cache, self.mask)

    def split(self, half: int) -> HFForward:
        other = HFForward(self.model, self.pad_id)
        first = torch.arange(half, device=self.device)
        second = torch.arange(half, len(self.next_pos), device=self.device)
        other.cache = kv_cache.select(self.cache, second)
        other.mask, other.next_pos = self.mask[second], self.next_pos[second]
        self.cache = kv_cache.select(self.cache, first)
        self.mask, self.next_pos = self.mask[first], self.next_pos[first]
        return other

    def merge(self, other: HFForward) -> None:
        if other.cache is None:
            return
        self.join(_Newcomers(other.cache, other.mask, other.next_pos))
        other.clear()

    def clear(self) -> None:
        self.cache = None
        self.mask, self.next_pos = self.mask[:0, :0], self.next_pos[:0]

    def _forward(self, input_ids, mask, position_ids, cache, every_position: bool = False) -> torch.Tensor:
        """Logits [B, T, V] after every position, or [B, 1, V] after the last only where the model
        offers that and `every_position` is off; in the model's dtype."""
        options = {} if every_position else self.forward_options
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_keyword: cache},
            **options,
        )
        return out.logits
