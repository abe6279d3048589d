"""From an HTTP handler to the engine's worker and back: checks, queueing, events, cancellation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from neuroada_server.engine import Engine
from neuroada_server.errors import ApiError, error_body
from neuroada_server.generation import (
    Event,
    Failed,
    Finished,
    GenerationRequest,
    PromptLogprobs,
    SamplingParams,
    TextDelta,
)
from neuroada_server.scheduler import QueueFull, ShuttingDown
from neuroada_server.structured import Structure, StructureError
from neuroada_server.worker import UnknownAdapter

if TYPE_CHECKING:
    from neuroada_server.schemas import ChatMessage

MAX_STOP_STRINGS = 8
Rendered = PromptLogprobs | TextDelta | Finished  # the events a stream renders (a failure has one shape)


class Submitted:
    """The queued requests of one HTTP request (OpenAI's `n`: one per choice, else one) and the
    asyncio queue their events arrive on, each as (choice index, event)."""

    def __init__(self, requests: list[GenerationRequest], events: asyncio.Queue):
        self.requests = requests
        self.events = events

    def cancel(self) -> None:
        for request in self.requests:
            request.cancelled.set()

    @property
    def headers(self) -> dict[str, str]:
        """The adapter's tier when the request was queued: resident (a hit), host or disk (it waited for a load)."""
        tier = self.requests[0].adapter_tier
        return {"X-Adapter-Tier": tier} if tier else {}

    def streaming_response(
        self,
        render: Callable[[int, Rendered], dict],
        first: list[dict] = (),
        last: Callable[[list[Finished]], dict] | None = None,
    ) -> StreamingResponse:
        return StreamingResponse(self.sse(render, first, last), media_type="text/event-stream", headers=self.headers)

    async def stream(self, http: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """(choice, event) until every choice's final event, or the first failure (the other
        choices are then cancelled: a request fails whole). With `http`, a client that hangs up
        ends the stream at once and cancels the generations (they leave the batch at the next step)."""
        hangup = asyncio.ensure_future(_client_gone(http)) if http is not None else None
        running = len(self.requests)
        try:
            while running:
                item = await self._next(hangup)
                if item is None:
                    return
                _, event = item
                if isinstance(event, Failed):
                    running = 0
                elif isinstance(event, Finished):
                    running -= 1
                yield item
        finally:
            if hangup is not None:
                hangup.cancel()
            self.cancel()  # those still running (a hang-up, a failed sibling); a no-op for the finished

    async def _next(self, hangup: asyncio.Future | None) -> tuple[int, Event] | None:
        """The next (choice, event), or None if the client hung up first."""
        if hangup is None or not self.events.empty():
            return await self.events.get()
        get = asyncio.ensure_future(self.events.get())
        await asyncio.wait({get, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        get.cancel()
        return None

    async def sse(
        self,
        render: Callable[[int, Rendered], dict],
        first: list[dict] = (),
        last: Callable[[list[Finished]], dict] | None = None,
    ) -> AsyncIterator[str]:
        """Server-sent events: a `data:` line per chunk of `first`, then per event (errors in the shared
        JSON shape), then `last` of every choice's final event once all finished, then [DONE]."""
        try:
            for payload in first:
                yield f"data: {json.dumps(payload)}\n\n"
            done: dict[int, Finished] = {}
            async for choice, event in self.stream():
                if isinstance(event, Failed):
                    payload = error_body(event.status, event.message, event.code)
                else:
                    payload = render(choice, event)
                    if isinstance(event, Finished):
                        done[choice] = event
                yield f"data: {json.dumps(payload)}\n\n"
            if last is not None and len(done) == len(self.requests):
                yield f"data: {json.dumps(last([done[i] for i in range(len(done))]))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # a client that went away stops its generation (a no-op once finished)

    async def results(self, http: Request | None = None) -> list[Finished]:
        """Every choice's final event, in choice order (raises ApiError for the first that failed)."""
        done: dict[int, Finished] = {}
        async for choice, event in self.stream(http):
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message, event.code)
            if isinstance(event, Finished):
                done[choice] = event
        if len(done) < len(self.requests):
            raise ApiError(499, "the client closed the connection")
        return [done[i] for i in range(len(self.requests))]


async def _client_gone(http: Request) -> None:
    """Returns when the client closes the connection. The body has been read by now, so the
    server's next ASGI message for this request is the disconnect."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def tokenize(engine: Engine, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of a prompt, computed off the event loop; a prompt too long to fit
    max_prompt_tokens whatever it says is refused (413) before any tokenizing."""
    check_prompt_chars(engine, len(text))
    return await run_in_threadpool(lambda: engine.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def adapter_for(engine: Engine, model: str) -> str | None:
    """The adapter a request's `model` names (None: the base model); 404 where it names neither."""
    if model == engine.model_name:
        return None
    if not engine.catalog.servable(model):
        raise ApiError(
            404,
            f"model {model!r} not found: use the base model {engine.model_name!r} or an adapter name",
            "model_not_found",
        )
    return model


async def render_chat(
    engine: Engine, messages: list[ChatMessage], tools: list[dict] | None = None, add_generation_prompt: bool = True
) -> list[int]:
    """The token ids of a conversation as the tokenizer's chat template renders it, computed off
    the event loop (422 where the template cannot render it)."""
    # An assistant's tool calls stand without content: templates get "" there, not None.
    rendered = [m.model_dump(exclude_none=True) | {"content": m.content or ""} for m in messages]
    calls = [call.function.arguments for m in messages for call in m.tool_calls or ()]
    check_prompt_chars(engine, sum(len(m["content"]) for m in rendered) + sum(map(len, calls)))
    try:
        ids = await run_in_threadpool(
            engine.tokenizer.apply_chat_template,
            rendered,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=False,
        )
    except Exception as e:  # a tokenizer without a chat template, or messages it refuses
        raise ApiError(422, f"messages: the tokenizer's chat template cannot render them: {e}") from None
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def check_token_ids(engine: Engine, ids: list[int], field: str = "prompt") -> list[int]:
    """Token ids a request gives (a prompt's, logit_bias's): each must be a row of the model's
    embedding (422 naming the field otherwise)."""
    vocab = engine.model.get_input_embeddings().num_embeddings
    if ids and max(ids) >= vocab:
        raise ApiError(
            422, f"{field}: token id {max(ids)} is out of range: the model has {vocab} tokens (ids 0-{vocab - 1})"
        )
    return ids


def check_prompt_chars(engine: Engine, num_chars: int) -> None:
    """No token is longer than the tokenizer's longest vocabulary entry: more characters than
    max_prompt_tokens of those cannot fit."""
    limit = engine.settings.max_prompt_tokens * engine.max_token_chars
    if num_chars > limit:
        raise ApiError(
            413,
            f"prompt has {num_chars} characters, more than max_prompt_tokens ({engine.settings.max_prompt_tokens}) "
            f"tokens of at most {engine.max_token_chars} characters each can hold",
        )


async def with_structure(engine: Engine, params: SamplingParams, structure: Structure | None) -> SamplingParams:
    """`params` holding the text to `structure`, compiled off the event loop (422 with the reason if
    it does not compile)."""
    if structure is None:
        return params
    if params.ignore_eos or params.min_tokens:
        field = "ignore_eos" if params.ignore_eos else "min_tokens"
        raise ApiError(422, f"{field}: a structured output ends where its structure does, not with it")
    try:
        with engine.metrics.structure_compile_seconds.time():
            grammar = await run_in_threadpool(engine.grammars.compile, structure)
    except StructureError as e:
        raise ApiError(422, f"structured output ({structure.kind}): {e}", "invalid_structure") from None
    engine.metrics.structured_requests.labels(kind=structure.kind).inc()
    return replace(params, grammar=grammar)


def submit(
    engine: Engine,
    prompts: list[list[int]],
    adapter: str | None,
    params: SamplingParams,
    timeout_s: float | None = None,
    n: int = 1,
) -> Submitted:
    """Check a request against the server's limits and queue it, as `n` generations of each prompt
    (OpenAI's `n`; with a seed, choice i of a prompt samples with seed + i), all or none (raises
    ApiError). Choice i of prompt p is the job's choice p * n + i."""
    settings = engine.settings
    if adapter is not None and not engine.catalog.servable(adapter):
        _unknown_adapter(engine, adapter)
    for prompt_ids in prompts:
        _check_prompt(engine, prompt_ids, params)
    check_token_ids(engine, [token for token, _ in params.logit_bias], "logit_bias")
    check_token_ids(engine, list(params.stop_token_ids), "stop_token_ids")
    if params.min_tokens > params.max_new_tokens:
        raise ApiError(
            422, f"min_tokens {params.min_tokens} exceeds the {params.max_new_tokens} tokens the request may generate"
        )
    if len(params.stop) > MAX_STOP_STRINGS or any(len(s) > 64 for s in params.stop):
        raise ApiError(422, f"at most {MAX_STOP_STRINGS} stop strings of at most 64 characters each")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    deadline = time.monotonic() + min(settings.request_timeout_s, timeout_s or settings.request_timeout_s)
    requests = [
        GenerationRequest(
            prompt_ids=prompt_ids,
            adapter=adapter,
            params=params if params.seed is None else replace(params, seed=params.seed + choice % n),
            on_event=lambda event, choice=choice: loop.call_soon_threadsafe(events.put_nowait, (choice, event)),
            deadline=deadline,
            # A deadline the client chose and missed is the client's (408), the server's own is 504.
            deadline_status=408 if timeout_s is not None and timeout_s < settings.request_timeout_s else 504,
        )
        for choice, prompt_ids in enumerate(p for p in prompts for _ in range(n))
    ]
    try:
        engine.submit(*requests)  # all or none
    except UnknownAdapter:  # deleted since the check above
        _unknown_adapter(engine, adapter)
    except ShuttingDown as e:
        raise ApiError(503, str(e), "shutting_down") from None
    except QueueFull as e:
        engine.metrics.requests.labels(adapter=adapter or "base", status="429").inc()
        raise ApiError(429, f"server overloaded: {e}; retry later", headers={"Retry-After": "1"}) from None
    return Submitted(requests, events)


def _check_prompt(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
    settings = engine.settings
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise ApiError(
            413, f"prompt has {len(prompt_ids)} tokens; the limit (max_prompt_tokens) is {settings.max_prompt_tokens}"
        )
    if not prompt_ids:
        raise ApiError(422, "prompt is empty after tokenization")
    if params.max_new_tokens > settings.max_new_tokens:
        raise ApiError(
            422, f"max_new_tokens {params.max_new_tokens} exceeds the server's limit of {settings.max_new_tokens}"
        )
    if engine.context_length is not None and len(prompt_ids) + params.max_new_tokens > engine.context_length:
        raise ApiError(
            422,
            f"the prompt's {len(prompt_ids)} tokens plus max_new_tokens {params.max_new_tokens} exceed the model's "
            f"context length of {engine.context_length} tokens",
            "context_length_exceeded",
        )


def _unknown_adapter(engine: Engine, adapter: str) -> NoReturn:
    # Label "unknown", not the name: clients must not be able to grow the metric's label set.
    engine.metrics.requests.labels(adapter="unknown", status="404").inc()
    why = engine.catalog.unavailable(adapter)
    raise ApiError(why.status, why.message, why.code)
