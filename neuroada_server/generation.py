"""Batched generation with our own KV-cache decode loop, open to requests joining and leaving.

Continuous batching: requests join a running batch between decode steps (their prefill is one
forward call, its KV cache added to the batch's) and leave it as soon as they finish. Each
request samples with its own parameters and generator. The forward calls and the cache are a
`BatchForward`'s (`neuroada_server.forward`): our Llama-shaped decoder, or Hugging Face's forward.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from neuroada_server.batch_adapters import BatchAdapters, NoAdapters
from neuroada_server.forward import BatchForward, PrefixKey, Runner, batch_forward
from neuroada_server.forward.prefilled import PromptLogits
from neuroada_server.structured import Constraint, Grammar

if TYPE_CHECKING:
    from neuroada_server.resident import ResidentAdapter

log = logging.getLogger(__name__)
NO_ADAPTERS = NoAdapters()


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    logprobs: int | None = None  # None: none; n: each token's log-probability and the n most likely
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (vLLM's name)
    # OpenAI's logits adjustments before sampling: a bias per token; a penalty per generated token,
    # frequency_penalty times its count so far plus presence_penalty once it has appeared.
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's: a token of the prompt or generated so far has its logit divided by repetition_penalty
    # where positive, multiplied where negative (CTRL's, as Hugging Face's and vLLM's); min_p drops
    # tokens less likely than min_p times the most likely one (after temperature).
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0  # until this many are generated: end-of-sequence and stop tokens masked, stop strings unchecked
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the text (kept in it, unless special), as eos does
    grammar: Grammar | None = None  # the structure the text must follow (`Grammars.compile`), if any

    @property
    def adjusts_logits(self) -> bool:
        """Whether sampling sees other logits than the model's, whatever has been generated."""
        return (
            bool(self.logit_bias)
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (its logits before temperature, top-k and top-p,
    as vLLM reports by default), and the most likely tokens there, most likely first."""

    token: int
    logprob: float | None  # None: a prompt's first token, which nothing before it predicts
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob) of the n most likely


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens generated since the previous delta, when asked for


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens' log-probabilities (`SamplingParams.prompt_logprobs`), sent before any text."""

    logprobs: tuple[TokenLogprob, ...]  # one per prompt token, the first's logprob None


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    first_token_at: float | None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    logprobs: tuple[TokenLogprob, ...] | None = None  # every generated token's (eos included), when asked for
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # as sent in `PromptLogprobs`, when asked for


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    code: str | None = None  # machine-readable cause, passed to the client as error.code


Event = PromptLogprobs | TextDelta | Finished | Failed


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
    adapter_tier: str | None = None  # where its adapter was when it was queued: resident, host or disk

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline


def prefix_key(request: GenerationRequest) -> PrefixKey | None:
    """What the request's prompt's keys and values depend on besides its tokens: the adapter
    version it runs with (None: not to be cached, an adapter without a fixed version)."""
    if request.adapter is None:
        return ("base",)
    if request.resident is None:
        return None
    return ("adapter", request.adapter, request.resident.version)


class _RowState:
    """Incremental detokenization and stop handling for one request."""

    def __init__(self, request: GenerationRequest, tokenizer: PreTrainedTokenizerBase, eos_ids: set[int]):
        self.request = request
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.ids: list[int] = []  # generated tokens, eos excluded
        # Every generated token's, eos included (as vLLM and OpenAI list it: lm-eval's loglikelihood
        # drops the last entry as the generated token's), when the request asks for them.
        self.logprobs: list[TokenLogprob] = []
        self.logprobs_sent = 0  # of them, in text deltas so far
        self.num_tokens = 0  # generated tokens, eos included
        self.counts: dict[int, int] = {}  # how often each token was generated (for the penalties)
        self.seen: torch.Tensor | None = None  # [V] bool: the prompt's and generated tokens (repetition_penalty)
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None  # stop | length | cancelled | failed
        self.failure: Failed | None = None  # why this row failed, alone (finish_reason "failed")
        self.first_token_at: float | None = None
        self.cached_tokens = 0  # of the prompt, from the prefix cache
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # when the request asks for them
        self.stable = 0  # text[:stable] can no longer change: stop strings were searched up to here
        self.holdback = max((len(s) for s in request.params.stop), default=1) - 1
        self.generator = None
        if request.params.seed is not None:
            self.generator = torch.Generator().manual_seed(request.params.seed)
        self.constraint = Constraint(request.params.grammar) if request.params.grammar is not None else None

    def score_prompt(self, logits: PromptLogits) -> None:
        """The prompt's tokens' log-probabilities, from the logits after each of its positions; sent at once."""
        self.prompt_logprobs = scored_prompt(self.request.prompt_ids, logits, self.request.params.prompt_logprobs)
        self.request.on_event(PromptLogprobs(self.prompt_logprobs))

    def push(self, token: int, logprob: TokenLogprob | None = None) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.num_tokens += 1
        self.counts[token] = self.counts.get(token, 0) + 1
        if self.seen is not None:
            self.seen[token] = True
        if logprob is not None:
            self.logprobs.append(logprob)
        params = self.request.params
        if token in self.eos_ids and not params.ignore_eos:
            self.finish_reason = "stop"
        else:
            self.ids.append(token)
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if token in params.stop_token_ids:
                self.finish_reason = "stop"
            # Stop strings count from min_tokens on (vLLM's); a stop token cannot come sooner (masked).
            for stop in params.stop if self.num_tokens >= params.min_tokens else ():
                # Only the text that is new since the last token can hold a new match: searching
                # from the start every token would cost the worker time quadratic in the length.
                at = self.text.find(stop, max(0, self.stable - len(stop) + 1))
                if at >= 0:
                    self.text = self.text[:at]
                    self.finish_reason = "stop"
            self.stable = len(self.text.rstrip("\ufffd"))
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
            logprobs = tuple(self.logprobs[self.logprobs_sent :])
            self.request.on_event(TextDelta(self.text[self.emitted : safe], logprobs))
            self.emitted, self.logprobs_sent = safe, len(self.logprobs)

    @property
    def adjusts_logits(self) -> bool:
        """Whether this step's sampling sees other logits than the model's (`adjusted`)."""
        return self.request.params.adjusts_logits or self.num_tokens < self.request.params.min_tokens

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] with the request's logit bias and penalties applied (a copy), as sampling sees them."""
        params = self.request.params
        logits = logits.float().clone()
        if params.repetition_penalty != 1:
            if self.seen is None:  # the prompt's tokens and those generated so far, kept up to date in `push`
                self.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                self.seen[torch.tensor(self.request.prompt_ids + list(self.counts), device=logits.device)] = True
            penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if self.num_tokens < params.min_tokens:
            ends = ([] if params.ignore_eos else list(self.eos_ids)) + list(params.stop_token_ids)
            logits[ends] = float("-inf")
        if params.logit_bias:
            tokens, biases = zip(*params.logit_bias)
            logits[list(tokens)] += torch.tensor(biases, device=logits.device)
        if self.counts and (params.presence_penalty or params.frequency_penalty):
            tokens, counts = zip(*self.counts.items())
            counts = torch.tensor(counts, dtype=logits.dtype, device=logits.device)
            logits[list(tokens)] -= params.frequency_penalty * counts + params.presence_penalty
        return logits

    def fail(self, error: Exception) -> None:
        """This row alone failed (its sampling, its logits, its stop strings or detokenisation)."""
        code = error.code if isinstance(error, RowError) else None
        self.failure = Failed(500, f"generation failed: {type(error).__name__}: {error}", code)
        self.finish_reason = "failed"

    def finish(self) -> None:
        if self.failure is not None:
            self.request.on_event(self.failure)
            return
        self.request.on_event(
            Finished(
                text=self.text,
                finish_reason=self.finish_reason or "length",
                prompt_tokens=len(self.request.prompt_ids),
                completion_tokens=self.num_tokens,
                first_token_at=self.first_token_at,
                cached_tokens=self.cached_tokens,
                logprobs=tuple(self.logprobs) if self.request.params.logprobs is not None else None,
                prompt_logprobs=self.prompt_logprobs,
            )
        )


class RowError(RuntimeError):
    """A fault of one row's own making, found while sampling it."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [V] (float32) under temperature / min-p / top-k / top-p."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    try:
        return int(torch.multinomial(probs, 1, generator=generator))
    except RuntimeError as e:  # it checks its input: NaN or infinite probabilities (a logit overflowed)
        raise RowError(f"sampling at temperature {params.temperature} failed: {e}", "non_finite") from None


class _Logprobs:
    """The log-probabilities of one step's rows that ask for them, computed once for all of them."""

    def __init__(self, rows: list[_RowState], logits: torch.Tensor):  # logits [B, V]
        # batch row -> (its row in the tensors below, how many most likely tokens it lists)
        self.wanted = {}
        for slot, row in enumerate(rows):
            if row.request.params.logprobs is not None:
                self.wanted[slot] = (len(self.wanted), row.request.params.logprobs)
        if not self.wanted:
            return
        self.logprobs = logits[list(self.wanted)].float().log_softmax(-1).cpu()  # [W, V]
        top = self.logprobs.topk(max(n for _, n in self.wanted.values()))  # values and indices [W, most]
        self.top_ids, self.top_logprobs = top.indices.tolist(), top.values.tolist()

    def of(self, slot: int, token: int) -> TokenLogprob | None:
        if slot not in self.wanted:
            return None
        i, n = self.wanted[slot]
        top = tuple(zip(self.top_ids[i][:n], self.top_logprobs[i][:n]))
        return TokenLogprob(token, float(self.logprobs[i, token]), top)


PROMPT_CHUNK = 128  # prompt positions whose logits are held at once ([PROMPT_CHUNK, V] floats)


def scored_prompt(prompt: list[int], logits: PromptLogits, most_likely: int) -> tuple[TokenLogprob, ...]:
    """Each prompt token's log-probability given the tokens before it, and the `most_likely` tokens
    there (the first token's: None, nothing predicts it)."""
    scored = [TokenLogprob(prompt[0], None)]
    for start in range(0, len(logits), PROMPT_CHUNK):
        chunk = logits[start : start + PROMPT_CHUNK]  # [c, V]
        if not chunk.sum(-1).isfinite().all():  # as `_sample` checks the last position's
            raise RowError("the model's logits for this prompt are not finite (NaN or infinity)", "non_finite")
        logprobs = chunk.log_softmax(-1).cpu()  # [c, V]
        tokens = prompt[start + 1 : start + 1 + logprobs.shape[0]]  # [c]: the next token after each position
        chosen = logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()  # [c]
        top = logprobs.topk(most_likely)  # values and indices [c, most_likely]
        for token, logprob, ids, values in zip(tokens, chosen, top.indices.tolist(), top.values.tolist()):
            scored.append(TokenLogprob(token, logprob, tuple(zip(ids, values))))
    return tuple(scored)


class RunningBatch:
    """The requests decoding together, and their KV cache; requests join and leave between steps.

    `join` prefills newcomers (as their own forward call) and appends their rows to the cache;
    `step` feeds every row its last sampled token. Rows that finish (eos, stop string, length,
    cancelled, failed) leave at once and their cache rows with them. Both take the step's
    `BatchAdapters` and bind each forward call's rows to it just before the call.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        pad_id: int,
        runner: Runner = "auto",
        forward: BatchForward | None = None,  # the rows' cache and forward calls (default: a new one)
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.forward: BatchForward = forward or batch_forward(model, pad_id, runner)
        self.rows: list[_RowState] = []
        self.pending: list[int] = []  # each row's last sampled token, fed by the next step

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def requests(self) -> list[GenerationRequest]:
        return [row.request for row in self.rows]

    @torch.inference_mode()
    def join(self, requests: list[GenerationRequest], adapters: BatchAdapters = NO_ADAPTERS) -> None:
        """Prefill `requests`, sample their first tokens and add them to the batch.

        Atomic: if the prefill raises, the batch is as it was (the newcomers' cache is their own
        until it is joined); a newcomer whose sampling fails leaves alone, with its error.
        """
        rows = [_RowState(r, self.tokenizer, self.eos_ids) for r in requests]
        adapters.bind(requests)
        every_position = [r.params.prompt_logprobs is not None for r in requests]
        prefilled = self.forward.prefill(
            [r.prompt_ids for r in requests],
            list(map(prefix_key, requests)),
            every_position if any(every_position) else None,
        )
        for row, tokens, logits in zip(rows, prefilled.cached, prefilled.prompt_logits):
            row.cached_tokens = tokens
            if logits is not None:
                try:
                    row.score_prompt(logits)
                except Exception as e:
                    row.fail(e)
        pending = self._sample(rows, prefilled.logits)
        self.forward.join(prefilled.newcomers)
        self.rows += rows
        self.pending += pending
        self._drop_finished()

    @torch.inference_mode()
    def step(self, adapters: BatchAdapters = NO_ADAPTERS) -> None:
        """One decode step for every row. Atomic: if the forward raises, the batch is as it was."""
        adapters.bind(self.requests)
        logits = self.forward.decode(self.pending)
        self.pending = self._sample(self.rows, logits)
        self._drop_finished()

    def split(self) -> RunningBatch:
        """Move the second half of the rows into a batch of their own (to find a failing row)."""
        half = len(self.rows) // 2
        other = RunningBatch(self.model, self.tokenizer, self.eos_ids, self.pad_id, forward=self.forward.split(half))
        other.rows, other.pending = self.rows[half:], self.pending[half:]
        self.rows, self.pending = self.rows[:half], self.pending[:half]
        return other

    def merge(self, other: RunningBatch) -> None:
        """Take back the rows of a batch made by `split` (after each half stepped on its own)."""
        self.forward.merge(other.forward)
        self.rows += other.rows
        self.pending += other.pending
        other.rows, other.pending = [], []

    def fail(self, event: Failed) -> None:
        """End every row with `event` (the batch raised) and empty the batch."""
        for row in self.rows:
            row.request.on_event(event)
        self.rows, self.pending = [], []
        self.forward.clear()

    def _sample(self, rows: list[_RowState], logits: torch.Tensor) -> list[int]:
        """Each row's next token; a row whose logits or sampling fail is marked failed, alone."""
        # A row's sum is finite exactly when all its logits are (they are far too small to overflow it).
        finite = logits.sum(-1).isfinite().tolist()  # [B]
        # One device sync for every greedy row; max's indices are argmax's (the first maximum), at a
        # third of its cost on the CPU.
        greedy = logits.max(-1).indices.tolist()
        logprobs = _Logprobs(rows, logits)
        tokens = []
        for slot, row in enumerate(rows):
            params = row.request.params
            token = self.pad_id
            if row.finish_reason is not None:  # failed scoring its prompt: it leaves without a token
                tokens.append(token)
                continue
            try:
                if not finite[slot]:
                    raise RowError("the model's logits for this request are not finite (NaN or infinity)", "non_finite")
                # Bias, penalties and a grammar change what is sampled; the logprobs stay the model's
                # own (vLLM's default).
                adjusts = row.adjusts_logits
                row_logits = row.adjusted(logits[slot]) if adjusts else logits[slot]
                constraint = row.constraint
                if constraint is not None and params.temperature != 0 and (params.top_k or params.top_p < 1):
                    row_logits = constraint.masked(row_logits)  # top-k and top-p choose among allowed tokens
                if params.temperature == 0 and not adjusts:
                    token = greedy[slot]
                else:
                    token = self._choose(row_logits, params, row.generator)
                if constraint is not None and not constraint.accept(token):
                    # The grammar's mask is computed only when the token chosen without it is
                    # refused; the choice is then the same as with the mask from the start: greedy,
                    # the best allowed token is also the best of all when allowed; sampled, drawing
                    # again from the masked distribution after a refused draw is rejection sampling.
                    token = self._choose(constraint.masked(row_logits), params, row.generator)
                    if not constraint.accept(token):
                        raise RowError(
                            "no token can continue the text inside its structure (one no text satisfies?)", "grammar"
                        )
                row.push(token, logprobs.of(slot, token))
            except Exception as e:
                row.fail(e)
            tokens.append(token)
        return tokens

    @staticmethod
    def _choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
        """A token from one row's logits [V]: the greedy one, or one sampled under the row's params."""
        if params.temperature == 0:
            return int(logits.argmax())
        return sample_next(logits.cpu(), params, generator)

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        for row in self.rows:
            if row.finish_reason is not None:
                try:
                    row.finish()
                except Exception:  # its listener is gone (e.g. the event loop closed): it leaves anyway
                    log.exception("a finished request's final event could not be delivered")
        if keep:
            self.forward.keep(keep)
        else:
            self.forward.clear()
        self.rows = [self.rows[i] for i in keep]
        self.pending = [self.pending[i] for i in keep]
