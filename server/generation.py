"""Batched generation with our own KV-cache decode loop.

Prefill runs the whole batch at once with left padding; decode then feeds one token per running
request per step. Requests that finish (eos, stop string, length, cancelled) leave the batch and
their rows leave the KV cache. Each request samples with its own parameters and generator.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    first_token_at: float | None


@dataclass(frozen=True)
class Failed:
    status: int
    message: str


Event = TextDelta | Finished | Failed


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None  # None = the base model
    params: SamplingParams
    on_event: Callable[[Event], None]  # called from the worker thread
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


class _RowState:
    """Incremental detokenization and stop handling for one request."""

    def __init__(self, request: GenerationRequest, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]):
        self.request = request
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.ids: list[int] = []  # generated tokens, eos excluded
        self.num_tokens = 0  # generated tokens, eos included
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.holdback = max((len(s) for s in request.params.stop), default=1) - 1
        self.generator = None
        if request.params.seed is not None:
            self.generator = torch.Generator().manual_seed(request.params.seed)

    def push(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.num_tokens += 1
        if token in self.eos_ids and not self.request.params.ignore_eos:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            for stop in self.request.params.stop:
                at = self.text.find(stop)
                if at >= 0:
                    self.text = self.text[:at]
                    self.finish_reason = "stop"
            if self.finish_reason is None and len(self.ids) >= self.request.params.max_new_tokens:
                self.finish_reason = "length"
        if self.finish_reason is None and self.request.cancelled.is_set():
            self.finish_reason = "cancelled"
        self._emit()

    def _emit(self) -> None:
        if self.finish_reason is None:
            # Hold back a possibly incomplete UTF-8 character and a possible stop-string prefix.
            safe = len(self.text.rstrip("\ufffd")) - self.holdback
        else:
            safe = len(self.text)
        if safe > self.emitted:
            self.request.on_event(TextDelta(self.text[self.emitted : safe]))
            self.emitted = safe

    def finish(self) -> None:
        self.request.on_event(
            Finished(
                text=self.text,
                finish_reason=self.finish_reason or "length",
                prompt_tokens=len(self.request.prompt_ids),
                completion_tokens=self.num_tokens,
                first_token_at=self.first_token_at,
            )
        )


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V] (float32) under temperature / top-k / top-p."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _cache_keyword(model: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache`; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate_batch(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: list[GenerationRequest],
    eos_ids: set[int],
    pad_id: int,
) -> None:
    """Run `requests` to completion, sending each its events. Raises on model errors."""
    device = next(model.parameters()).device
    rows = [_RowState(r, tokenizer, eos_ids) for r in requests]
    T = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((len(requests), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(requests), T, dtype=torch.long)
    for i, r in enumerate(requests):
        input_ids[i, T - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        attention_mask[i, T - len(r.prompt_ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    cache = DynamicCache()
    cache_kw = {_cache_keyword(model): cache}
    logits = (
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **cache_kw,
        )
        .logits[:, -1, :]
        .float()
    )
    next_pos = position_ids[:, -1] + 1  # [B]
    running = list(range(len(rows)))  # rows still generating, in cache order
    while running:
        tokens = []
        greedy = logits.argmax(-1).tolist()  # one device sync for every greedy row
        for slot, i in enumerate(running):
            params = rows[i].request.params
            token = (
                greedy[slot] if params.temperature == 0 else sample_next(logits[slot].cpu(), params, rows[i].generator)
            )
            rows[i].push(token)
            tokens.append(token)
        keep = [slot for slot, i in enumerate(running) if rows[i].finish_reason is None]
        for slot, i in enumerate(running):
            if rows[i].finish_reason is not None:
                rows[i].finish()
        if not keep:
            break
        if len(keep) < len(running):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention_mask, next_pos = attention_mask[index], next_pos[index]
            tokens = [tokens[s] for s in keep]
            running = [running[s] for s in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(running), 1)], dim=1)
        logits = (
            model(
                input_ids=torch.tensor(tokens, device=device)[:, None],
                attention_mask=attention_mask,
                position_ids=next_pos[:, None],
                use_cache=True,
                **cache_kw,
            )
            .logits[:, -1, :]
            .float()
        )
        next_pos = next_pos + 1
