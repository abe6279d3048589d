"""Batched generation with our own KV-cache decode loop, open to requests joining and leaving.

Continuous batching: requests join a running batch between decode steps (their prefill is one
forward call, left-padded, its KV cache appended to the batch's) and leave it as soon as they
finish. Each request samples with its own parameters and generator.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from server import kv_cache

if TYPE_CHECKING:
    from server.registry import ResidentAdapter


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
    deadline_status: int = 504  # 408 when the client's own timeout_s set the deadline
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    resident: ResidentAdapter | None = None  # the adapter version it runs with, fixed when it joins a batch

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


def _forward_options(model: nn.Module) -> tuple[str, dict]:
    """The cache's keyword in this transformers version (`past_key_values` became `cache`), and
    logits for the last position only where the model offers it (a prefill then skips the
    lm_head over every prompt position)."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), (
        {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    )


class RunningBatch:
    """The requests decoding together, and their KV cache; requests join and leave between steps.

    `join` prefills newcomers (as their own forward call) and appends their rows to the cache;
    `step` feeds every row its last sampled token. Rows that finish (eos, stop string, length,
    cancelled) leave at once and their cache rows with them. `before_forward` is told the
    requests of each forward call, in row order (the engine binds their adapters there).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        pad_id: int,
        before_forward: Callable[[list[GenerationRequest]], None] = lambda requests: None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.before_forward = before_forward
        self.device = next(model.parameters()).device
        self.cache_keyword, self.forward_options = _forward_options(model)
        self.rows: list[_RowState] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)  # [rows, cache length]
        self.next_pos = torch.zeros(0, dtype=torch.long, device=self.device)  # [rows]
        self.pending: list[int] = []  # each row's last sampled token, fed by the next step

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def requests(self) -> list[GenerationRequest]:
        return [row.request for row in self.rows]

    @torch.inference_mode()
    def join(self, requests: list[GenerationRequest]) -> None:
        """Prefill `requests`, sample their first tokens and add them to the batch."""
        rows = [_RowState(r, self.tokenizer, self.eos_ids) for r in requests]
        T = max(len(r.prompt_ids) for r in requests)
        input_ids = torch.full((len(requests), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(requests), T, dtype=torch.long)
        for i, r in enumerate(requests):
            input_ids[i, T - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, T - len(r.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(requests, input_ids, mask, position_ids, cache)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            self.mask = kv_cache.join_(self.cache, self.mask, cache, mask)
        self.rows += rows
        self.next_pos = torch.cat([self.next_pos, position_ids[:, -1] + 1])
        self.pending += self._sample(rows, logits)
        self._drop_finished()

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        tokens = torch.tensor(self.pending, device=self.device)[:, None]
        logits = self._forward(self.requests, tokens, self.mask, self.next_pos[:, None], self.cache)
        self.next_pos = self.next_pos + 1
        self.pending = self._sample(self.rows, logits)
        self._drop_finished()

    def fail(self, event: Failed) -> None:
        """End every row with `event` (the batch raised) and empty the batch."""
        for row in self.rows:
            row.request.on_event(event)
        self._empty()

    def _empty(self) -> None:
        self.rows, self.pending, self.cache = [], [], None
        self.mask, self.next_pos = self.mask[:0, :0], self.next_pos[:0]

    def _forward(self, requests, input_ids, mask, position_ids, cache) -> torch.Tensor:  # [B, V] float32
        self.before_forward(requests)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_keyword: cache},
            **self.forward_options,
        )
        return out.logits[:, -1, :].float()

    def _sample(self, rows: list[_RowState], logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(-1).tolist()  # one device sync for every greedy row
        tokens = []
        for slot, row in enumerate(rows):
            params = row.request.params
            token = greedy[slot] if params.temperature == 0 else sample_next(logits[slot].cpu(), params, row.generator)
            row.push(token)
            tokens.append(token)
        return tokens

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        for row in self.rows:
            if row.finish_reason is not None:
                row.finish()
        if not keep:
            self._empty()
            return
        self.rows = [self.rows[i] for i in keep]
        self.pending = [self.pending[i] for i in keep]
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.mask = kv_cache.trim_(self.cache, self.mask)
