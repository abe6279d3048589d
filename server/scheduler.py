"""BatchScheduler: a bounded queue of requests, admitted into the running batch between steps.

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

import threading
import time
from collections import deque

from server.generation import Failed, GenerationRequest

_ANY = object()  # mixed mode: requests of any adapter may join
_DRAIN = object()  # per-adapter mode: none may join; the running batch drains first


class QueueFull(Exception):
    pass


class ShuttingDown(QueueFull):
    """The server stopped taking requests."""


class BatchScheduler:
    def __init__(self, max_batch_size: int, max_queued: int, max_wait_s: float, mixed: bool = True):
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.max_wait_s = max_wait_s
        self.mixed = mixed
        self._queue: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def submit(self, request: GenerationRequest) -> None:
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queued:
                raise QueueFull(f"the queue holds {len(self._queue)} requests, its limit")
            self._queue.append(request)
            self._cond.notify()

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Take no more requests; the queued ones fail with 503."""
        with self._cond:
            self._closed = True
            for r in self._queue:
                r.on_event(Failed(503, "the server is shutting down", "shutting_down"))
            self._queue.clear()
            self._cond.notify_all()

    def admit(self, running: list[str | None], applied: str | None, timeout: float = 0.5) -> list[GenerationRequest]:
        """Requests to join a batch now running `running` (their adapters); waits only when it is empty."""
        free = self.max_batch_size - len(running)
        with self._cond:
            if not self._queue and not running and not self._closed:
                self._cond.wait(timeout)
            self._drop_dead()
            if not self._queue or self._closed or free <= 0:
                return []
            adapter = _ANY if self.mixed else self._next_adapter(running, applied)
            if adapter is _DRAIN:
                return []
            chosen, rest = [], deque()
            for r in self._queue:
                if len(chosen) < free and (adapter is _ANY or r.adapter == adapter):
                    chosen.append(r)
                else:
                    rest.append(r)
            self._queue = rest
            return chosen

    def _next_adapter(self, running: list[str | None], applied: str | None):
        """Per-adapter mode: the adapter whose requests may join now, or _DRAIN."""
        oldest = self._queue[0]
        overdue = time.monotonic() - oldest.enqueued_at >= self.max_wait_s
        if running:
            if overdue and oldest.adapter != running[0]:
                return _DRAIN
            return running[0]
        if overdue:
            return oldest.adapter
        if any(r.adapter == applied for r in self._queue):
            return applied
        return oldest.adapter

    def _drop_dead(self) -> None:
        """Cancelled requests leave silently; expired ones get 504 (the server's timeout) or 408 (their own)."""
        now = time.monotonic()
        alive = deque()
        for r in self._queue:
            if r.cancelled.is_set():
                continue
            if r.expired(now):
                whose = "its timeout_s" if r.deadline_status == 408 else "the server's request_timeout_s"
                r.on_event(
                    Failed(r.deadline_status, f"the request's deadline ({whose}) passed while it waited in the queue")
                )
                continue
            alive.append(r)
        self._queue = alive
