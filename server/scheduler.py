"""BatchScheduler: a bounded queue of requests, cut into batches that share one adapter.

Which adapter goes next:
- the oldest waiting request's adapter, once that request has waited `max_wait_s` (fairness:
  no adapter with waiting requests starves);
- otherwise the adapter already applied, if it has waiting requests (no switch needed);
- otherwise the oldest waiting request's adapter.
A batch takes up to `max_batch_size` requests of that adapter in arrival order. Each request
still carries its own adapter name, so a mixed-adapter mode can consume the same batches.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from server.generation import Failed, GenerationRequest


class QueueFull(Exception):
    pass


@dataclass(frozen=True)
class Batch:
    requests: list[GenerationRequest]

    @property
    def adapter(self) -> str | None:
        """The adapter every request of this batch uses (batches are single-adapter for now)."""
        return self.requests[0].adapter


class BatchScheduler:
    def __init__(self, max_batch_size: int, max_queued: int, max_wait_s: float):
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.max_wait_s = max_wait_s
        self._queue: deque[GenerationRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def submit(self, request: GenerationRequest) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queued:
                raise QueueFull(f"the queue holds {len(self._queue)} requests, its limit")
            self._queue.append(request)
            self._cond.notify()

    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def next_batch(self, applied: str | None, timeout: float = 0.5) -> Batch | None:
        """Block up to `timeout` for work; None if there is none (or the scheduler closed)."""
        with self._cond:
            if not self._queue and not self._closed:
                self._cond.wait(timeout)
            self._drop_dead()
            if not self._queue or self._closed:
                return None
            now = time.monotonic()
            oldest = self._queue[0]
            if now - oldest.enqueued_at >= self.max_wait_s:
                adapter = oldest.adapter
            elif any(r.adapter == applied for r in self._queue):
                adapter = applied
            else:
                adapter = oldest.adapter
            chosen, rest = [], deque()
            for r in self._queue:
                if r.adapter == adapter and len(chosen) < self.max_batch_size:
                    chosen.append(r)
                else:
                    rest.append(r)
            self._queue = rest
            return Batch(chosen)

    def _drop_dead(self) -> None:
        """Cancelled requests leave silently; expired ones get a 504-style error."""
        now = time.monotonic()
        alive = deque()
        for r in self._queue:
            if r.cancelled.is_set():
                continue
            if r.expired(now):
                r.on_event(Failed(504, "the request's deadline passed while it waited in the queue"))
                continue
            alive.append(r)
        self._queue = alive
