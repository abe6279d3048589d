"""BatchScheduler: a bounded queue of requests, admitted into the running batch between steps.

Only requests whose adapter is ready (resident) are admitted: the others wait in the queue,
keeping their place, while the adapter catalog loads theirs; `gate` says which (or fails a
request whose adapter was deleted or turned out invalid), and `wake` ends the wait of an idle
worker when a load lands.

Mixed mode (the default): the oldest waiting requests join, whatever their adapters, as long as
the batch has room; the engine serves a batch of several adapters through the mixed path.

Per-adapter mode (`mixed=False`, one adapter per batch, as servers that merge adapters must):
- a running batch admits only requests of its own adapter, and none once another adapter's
  request has waited `max_wait_s` (the batch drains so that adapter gets its turn);
- an empty batch takes the oldest waiting request's adapter once that request has waited
  `max_wait_s` (no adapter starves), otherwise the adapter already applied if it has waiting
  requests (no switch), otherwise the oldest request's adapter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from neuroada_server.generation import Event, Failed, Finished, GenerationRequest

log = logging.getLogger(__name__)

_ANY = object()  # mixed mode: requests of any adapter may join
_DRAIN = object()  # per-adapter mode: none may join; the running batch drains first


class QueueFull(Exception):
    pass


class ShuttingDown(QueueFull):
    """The server stopped taking requests."""


AdapterGate = Callable[[str], "bool | Failed"]  # adapter name -> ready, not yet, or never (why)


class BatchScheduler:
    def __init__(
        self,
        max_batch_size: int,
        max_queued: int,
        max_wait_s: float,
        mixed: bool = True,
        gate: AdapterGate = lambda name: True,
    ):
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.max_wait_s = max_wait_s
        self.mixed = mixed
        self.gate = gate
        self._queue: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def submit(self, *requests: GenerationRequest) -> None:
        """Queue requests, all or none (one HTTP request's `n` choices)."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) + len(requests) > self.max_queued:
                raise QueueFull(f"the queue holds {len(self._queue)} of its {self.max_queued} requests")
            self._queue.extend(requests)
            self._cond.notify()

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Take no more requests; the queued ones fail with 503."""
        with self._cond:
            self._closed = True
            for r in self._queue:
                _end(r, Failed(503, "the server is shutting down", "shutting_down"))
            self._queue.clear()
            self._cond.notify_all()

    def wake(self) -> None:
        """Something a waiting request needed happened (an adapter became resident)."""
        with self._cond:
            self._cond.notify_all()

    def requeue(self, requests: list[GenerationRequest]) -> None:
        """Admitted requests that cannot run yet go back to the front, in order."""
        with self._cond:
            self._queue.extendleft(reversed(requests))

    def waiting_adapters(self) -> set[str]:
        with self._cond:
            return {r.adapter for r in self._queue if r.adapter is not None}

    def admit(self, running: list[str | None], applied: str | None, timeout: float = 0.5) -> list[GenerationRequest]:
        """Requests to join a batch now running `running` (their adapters); waits only when
        nothing is running and nothing waiting is ready."""
        free = self.max_batch_size - len(running)
        with self._cond:
            ready = self._ready()
            if not ready and not running and not self._closed:
                self._cond.wait(timeout)
                ready = self._ready()
            if not ready or self._closed or free <= 0:
                return []
            adapter = _ANY if self.mixed else self._next_adapter(ready, running, applied)
            if adapter is _DRAIN:
                return []
            chosen = []
            for r in ready:
                if len(chosen) < free and (adapter is _ANY or r.adapter == adapter):
                    chosen.append(r)
            taken = set(map(id, chosen))
            self._queue = deque(r for r in self._queue if id(r) not in taken)
            return chosen

    def _ready(self) -> list[GenerationRequest]:
        """Drop what is dead or can never run, then the waiting requests that may run now, oldest first."""
        self._drop_dead()
        kept, ready = deque(), []
        for r in self._queue:
            verdict = True if r.adapter is None else self.gate(r.adapter)
            if verdict is True or verdict is False:
                kept.append(r)
                if verdict:
                    ready.append(r)
            else:
                _end(r, verdict)
        self._queue = kept
        return ready

    def _next_adapter(self, ready: list[GenerationRequest], running: list[str | None], applied: str | None):
        """Per-adapter mode: the adapter whose requests may join now, or _DRAIN."""
        oldest = ready[0]
        overdue = time.monotonic() - oldest.enqueued_at >= self.max_wait_s
        if running:
            if overdue and oldest.adapter != running[0]:
                return _DRAIN
            return running[0]
        if overdue:
            return oldest.adapter
        if any(r.adapter == applied for r in ready):
            return applied
        return oldest.adapter

    def _drop_dead(self) -> None:
        """Cancelled requests leave (their final event says so: it releases what they hold); expired
        ones get 504 (the server's timeout) or 408 (their own)."""
        now = time.monotonic()
        alive = deque()
        for r in self._queue:
            if r.cancelled.is_set():
                _end(r, Finished("", "cancelled", len(r.prompt_ids), 0, first_token_at=None))
                continue
            if r.expired(now):
                whose = "its timeout_s" if r.deadline_status == 408 else "the server's request_timeout_s"
                why = f"the request's deadline ({whose}) passed while it waited in the queue"
                _end(r, Failed(r.deadline_status, why))
                continue
            alive.append(r)
        self._queue = alive


def _end(request: GenerationRequest, event: Event) -> None:
    """A queued request's final event. A listener that fails (its client's event loop closed) must
    not stop the queue being walked: the request leaves all the same."""
    try:
        request.on_event(event)
    except Exception:
        log.exception("a queued request's final event could not be delivered")
