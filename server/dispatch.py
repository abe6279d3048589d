"""From an HTTP handler to the engine's worker and back: checks, queueing, events, cancellation."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request

from server.engine import Engine
from server.errors import ApiError, error_body
from server.generation import Event, Failed, Finished, GenerationRequest, SamplingParams, TextDelta
from server.scheduler import QueueFull

MAX_STOP_STRINGS = 8


class Submitted:
    """One queued request and the asyncio queue its events arrive on."""

    def __init__(self, request: GenerationRequest, events: asyncio.Queue):
        self.request = request
        self.events = events

    def cancel(self) -> None:
        self.request.cancelled.set()

    async def stream(self, http: Request | None = None) -> AsyncIterator[Event]:
        """Events until the final one; the request is cancelled if the client goes away."""
        done = False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(self.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if http is not None and await http.is_disconnected():
                        return
                    continue
                done = isinstance(event, (Finished, Failed))
                yield event
                if done:
                    return
        finally:
            if not done:
                self.cancel()

    async def sse(self, render: Callable[[TextDelta | Finished], dict]) -> AsyncIterator[str]:
        """Server-sent events: a `data:` line per event (errors in the shared JSON shape), then [DONE]."""
        try:
            async for event in self.stream():
                payload = error_body(event.status, event.message) if isinstance(event, Failed) else render(event)
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # a client that went away stops its generation (a no-op once finished)

    async def result(self, http: Request | None = None) -> Finished:
        async for event in self.stream(http):
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message)
            if isinstance(event, Finished):
                return event
        raise ApiError(499, "the client closed the connection")


def submit(
    engine: Engine,
    prompt_ids: list[int],
    adapter: str | None,
    params: SamplingParams,
    timeout_s: float | None = None,
) -> Submitted:
    """Check a request against the server's limits and queue it (raises ApiError)."""
    settings = engine.settings
    if adapter is not None and engine.registry.get(adapter) is None:
        # Label "unknown", not the name: clients must not be able to grow the metric's label set.
        engine.metrics.requests.labels(adapter="unknown", status="404").inc()
        raise ApiError(404, f"adapter {adapter!r} not found", "adapter_not_found")
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
    if len(params.stop) > MAX_STOP_STRINGS or any(len(s) > 64 for s in params.stop):
        raise ApiError(422, f"at most {MAX_STOP_STRINGS} stop strings of at most 64 characters each")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        adapter=adapter,
        params=params,
        on_event=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        deadline=time.monotonic() + min(settings.request_timeout_s, timeout_s or settings.request_timeout_s),
        # A deadline the client chose and missed is the client's (408), the server's own is 504.
        deadline_status=408 if timeout_s is not None and timeout_s < settings.request_timeout_s else 504,
    )
    try:
        engine.submit(request)
    except QueueFull as e:
        engine.metrics.requests.labels(adapter=adapter or "base", status="429").inc()
        raise ApiError(429, f"server overloaded: {e}; retry later", headers={"Retry-After": "1"}) from None
    return Submitted(request, events)
