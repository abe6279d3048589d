"""The worker: one thread that owns the model and runs one batch continuously.

Between decode steps the scheduler admits waiting requests and finished ones leave. The worker
plans each forward call on its `BatchAdapters` (which path, which weights) and hands that object
down to `RunningBatch.join/step`, which binds the call's rows to it.

One request's failure is its own: a row whose sampling or logits fail leaves the batch alone
(`RunningBatch`); a forward call that raises is undone (the batch is as it was, the weights are
the base's) and retried on halves of its rows, down to single rows, so only the rows that fail
alone fail and every other row gets the token it would have got in any batch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from torch import nn
from transformers import PreTrainedTokenizerBase

from neuroada_server.batch_adapters import BatchAdapters
from neuroada_server.catalog import AdapterCatalog
from neuroada_server.forward import BatchForward
from neuroada_server.generation import Event, Failed, Finished, GenerationRequest, RunningBatch
from neuroada_server.metrics import ServerMetrics
from neuroada_server.scheduler import BatchScheduler

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: set[int],
        pad_id: int,
        adapters: BatchAdapters,
        lock: threading.Lock,
        catalog: AdapterCatalog,
        scheduler: BatchScheduler,
        metrics: ServerMetrics,
        drain_s: float,
        forward: BatchForward,  # the batch's forward calls and KV cache, for the worker's lifetime
        warm_up: Callable[[], object] | None = None,  # run on the worker's thread before it serves
    ):
        self.model = model
        self.forward = forward
        self.warm_up = warm_up
        self._ready = threading.Event()
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.adapters = adapters
        self.lock = lock  # guards the weights: held for each step
        self.catalog = catalog
        self.running_adapters: frozenset[str] = frozenset()  # of the running batch, for /metrics
        self.scheduler = scheduler
        self.metrics = metrics
        self.drain_s = drain_s
        self._stop = threading.Event()
        self._drain_until = float("inf")  # set by drain()
        self._thread = threading.Thread(target=self._run, name="neuroada-worker", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; returns once it is ready to serve (its warm-up done)."""
        self._thread.start()
        self._ready.wait()

    def drain(self) -> None:
        """Begin stopping (from any thread; SIGTERM calls it): queued and new requests fail (503),
        running ones get `drain_s` to finish and are then cancelled (each leaves within one step)."""
        if not self._stop.is_set():
            self._drain_until = time.monotonic() + self.drain_s
            self._stop.set()
        self.scheduler.close()

    def stop(self) -> None:
        """`drain`, wait for the thread, restore the base weights."""
        self.drain()
        if self._thread.is_alive():
            self._thread.join(timeout=self.drain_s + 30)
        with self.lock:
            self.adapters.reset()

    # --- requests ----------------------------------------------------------------------------

    def submit(self, *requests: GenerationRequest) -> None:
        """Queue requests, all or none (raises QueueFull, or UnknownAdapter when an adapter cannot
        be served). Each one's adapter is kept from eviction, and loaded if need be, until it ends."""
        acquired: list[str] = []
        try:
            for request in requests:
                name = request.adapter
                if name is not None:
                    request.adapter_tier = self.catalog.acquire(name)
                    if request.adapter_tier is None:
                        raise UnknownAdapter(f"adapter {name!r} not found")
                    acquired.append(name)
                request.on_event = self._ends_once(request, request.on_event)
            self.scheduler.submit(*requests)
        except Exception:
            for name in acquired:
                self.catalog.release(name)
            raise
        self.metrics.queue_depth.set(self.scheduler.depth())

    def _ends_once(self, request: GenerationRequest, deliver: Callable[[Event], None]) -> Callable[[Event], None]:
        """`deliver`, passing one final event only (whatever path failed the request), which also
        releases its adapter and records its metrics."""
        ended = False

        def on_event(event: Event) -> None:
            nonlocal ended
            if ended:
                return
            if isinstance(event, (Finished, Failed)):
                ended = True
                if request.adapter is not None:
                    self.catalog.release(request.adapter)
                self._record(request, event)
            deliver(event)

        return on_event

    def _run(self) -> None:
        try:
            if self.warm_up is not None:
                self.warm_up()
        finally:
            self._ready.set()
        batch = RunningBatch(self.model, self.tokenizer, self.eos_ids, self.pad_id, forward=self.forward)
        while not (self._stop.is_set() and not batch):  # on stop, running requests finish first
            if self._stop.is_set() and time.monotonic() > self._drain_until:
                for request in batch.requests:  # past the drain time: cancelled, they leave next step
                    request.cancelled.set()
            newcomers = []
            try:
                running = [r.adapter for r in batch.requests]
                newcomers = self.scheduler.admit(running, applied=self.adapters.applied_name)
                self.metrics.queue_depth.set(self.scheduler.depth())
                newcomers = self._resolve(newcomers)
                if batch or newcomers:
                    with self.lock:
                        self._step(batch, newcomers)
            except Exception as e:  # a bug outside any one request: fail what is in hand, keep serving
                log.exception("worker iteration failed")
                failed = _failure(e)
                for r in newcomers:
                    r.on_event(failed)
                batch.fail(failed)
                try:
                    with self.lock:
                        self.adapters.reset()
                except Exception:  # the thread must live on: it is the only one that serves
                    log.exception("restoring the base weights failed")
            self.metrics.running.set(len(batch))
            self.running_adapters = frozenset(r.adapter for r in batch.requests if r.adapter is not None)

    def _resolve(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Fix the adapter version each request runs with. One whose adapter stopped being
        resident since it was admitted (replaced meanwhile) goes back to wait for the new version."""
        ready, unready = [], []
        for r in requests:
            if r.adapter is not None:
                r.resident = self.catalog.resident(r.adapter)
                if r.resident is None:
                    unready.append(r)
                    continue
                r.resident.stats.requests_served += 1
                r.resident.stats.last_used = time.time()
            ready.append(r)
        if unready:
            self.scheduler.requeue(unready)
        return ready

    def _step(self, batch: RunningBatch, newcomers: list[GenerationRequest]) -> None:
        """Newcomers' prefill, then one decode step of the whole batch, on the path this step needs."""
        if newcomers:
            self._prefill(batch, newcomers)
        if batch:
            self._decode(batch)

    def _prefill(self, batch: RunningBatch, newcomers: list[GenerationRequest]) -> None:
        try:
            self.adapters.plan(batch.requests + newcomers)
            batch.join(newcomers, self.adapters)
        except Exception as e:
            self.adapters.reset()
            if len(newcomers) == 1:
                log.exception("prefill failed")
                newcomers[0].on_event(_failure(e))
                return
            log.warning("a prefill of %d requests failed (%r): retrying it in halves", len(newcomers), e)
            self.metrics.split_batches.labels(stage="prefill").inc()
            half = len(newcomers) // 2
            self._prefill(batch, newcomers[:half])
            self._prefill(batch, newcomers[half:])

    def _decode(self, batch: RunningBatch) -> None:
        try:
            self.adapters.plan(batch.requests)
            batch.step(self.adapters)
        except Exception as e:
            self.adapters.reset()
            if len(batch) == 1:
                log.exception("decode step failed")
                batch.fail(_failure(e))
                return
            log.warning("a decode step of %d requests failed (%r): retrying it in halves", len(batch), e)
            self.metrics.split_batches.labels(stage="decode").inc()
            other = batch.split()
            self._decode(batch)
            self._decode(other)
            batch.merge(other)

    def _record(self, request: GenerationRequest, event: Finished | Failed) -> None:
        """Metrics for a request that ended, whether or not its client is still there."""
        label = request.adapter or "base"
        if isinstance(event, Finished):
            # 499 (client closed request): the client went away and its generation was stopped.
            status = "499" if event.finish_reason == "cancelled" else "200"
            self.metrics.requests.labels(adapter=label, status=status).inc()
            self.metrics.tokens.labels(adapter=label).inc(event.completion_tokens)
            self.metrics.prefix_cache_queries.inc(event.prompt_tokens)
            self.metrics.prefix_cache_hits.inc(event.cached_tokens)
            if event.first_token_at is not None:
                self.metrics.ttft.observe(event.first_token_at - request.enqueued_at)
            self.metrics.e2e.observe(time.monotonic() - request.enqueued_at)
        else:
            self.metrics.requests.labels(adapter=label, status=str(event.status)).inc()


class UnknownAdapter(LookupError):
    pass


def _failure(error: Exception) -> Failed:
    return Failed(500, f"generation failed: {type(error).__name__}: {error}")
