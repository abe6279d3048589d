"""Offline generation: many prompts through an engine in this process, no HTTP (vLLM's `LLM.generate`).

Prompts join the engine's continuous batch as earlier ones finish, each with its adapter served as
`neuroada serve` serves it (merged, or beside the weights on the mixed path), so what comes back is
what the server would have answered. `neuroada eval` is built on it.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

from neuroada_server.engine import Engine
from neuroada_server.generation import Event, Failed, Finished, GenerationRequest, SamplingParams


class GenerationFailed(RuntimeError):
    """A prompt's generation failed (its adapter became unservable, the worker died, ...)."""


def generate_offline(
    engine: Engine,
    prompts: list[list[int]],
    adapter: str | None,
    params: SamplingParams,
    in_flight: int,
    stall_s: float,
    on_finished: Callable[[int], None] | None = None,
) -> list[Finished]:
    """One `Finished` per prompt (token ids), in the prompts' order. At most `in_flight` prompts
    are queued or running at once (the engine's queue is bounded); `stall_s` without any prompt
    finishing is a failure, so a wedged engine cannot hang the caller. `on_finished(i)` after each."""
    ended: queue.SimpleQueue[tuple[int, Event]] = queue.SimpleQueue()
    results: list[Finished | None] = [None] * len(prompts)

    def submit(i: int) -> None:
        def on_event(event: Event) -> None:  # on the worker's thread
            if isinstance(event, (Finished, Failed)):
                ended.put((i, event))

        engine.submit(GenerationRequest(prompt_ids=prompts[i], adapter=adapter, params=params, on_event=on_event))

    # Longest first: prompts that join the batch together are prefilled padded to the longest of them.
    waiting = iter(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    for _ in range(min(in_flight, len(prompts))):
        submit(next(waiting))
    for _ in range(len(prompts)):
        try:
            i, event = ended.get(timeout=stall_s)
        except queue.Empty:
            raise GenerationFailed(f"no generation finished in {stall_s:g} s") from None
        if isinstance(event, Failed):
            raise GenerationFailed(f"prompt {i}: {event.message}")
        results[i] = event
        if on_finished is not None:
            on_finished(i)
        next_prompt = next(waiting, None)
        if next_prompt is not None:
            submit(next_prompt)
    return results
