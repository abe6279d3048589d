"""From an HTTP handler to the engine's worker and back: checks, queueing, events, cancellation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request

from server.engine import Engine
from server.errors import ApiError
from server.generation import Event, Failed, Finished, GenerationRequest, SamplingParams
from server.scheduler import QueueFull

MAX_STOP_STRINGS = 8


class Submitted:
    """One queued request and the asyncio queue its events arrive on."""

    def __init__(self, engine: Engine, request: GenerationRequest, events: asyncio.Queue):
        self.engine = engine
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
                if isinstance(event, (Finished, Failed)):
                    done = True
                    self.engine.record(self.request, event)
                yield event
                if done:
                    return
        finally:
            if not done:
                self.cancel()

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
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: tuple[str, ...],
    ignore_eos: bool = False,
) -> Submitted:
    """Check a request against the server's limits and queue it (raises ApiError)."""
    settings = engine.settings
    if adapter is not None and engine.registry.get(adapter) is None:
        raise ApiError(404, f"adapter {adapter!r} not found", "adapter_not_found")
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise ApiError(413, f"prompt has {len(prompt_ids)} tokens; the limit (max_prompt_tokens) is {settings.max_prompt_tokens}")
    if not prompt_ids:
        raise ApiError(422, "prompt is empty after tokenization")
    if max_new_tokens > settings.max_new_tokens:
        raise ApiError(422, f"max_new_tokens {max_new_tokens} exceeds the server's limit of {settings.max_new_tokens}")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > 64 for s in stop):
        raise ApiError(422, f"at most {MAX_STOP_STRINGS} stop strings of at most 64 characters each")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        adapter=adapter,
        params=SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, stop, ignore_eos),
        on_event=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        deadline=time.monotonic() + settings.request_timeout_s,
    )
    try:
        engine.submit(request)
    except QueueFull as e:
        engine.metrics.requests.labels(adapter=adapter or "base", status="429").inc()
        raise ApiError(429, f"server overloaded: {e}; retry later", headers={"Retry-After": "1"}) from None
    return Submitted(engine, request, events)
