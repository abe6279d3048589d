"""The engine: one frozen base model, one worker thread that owns it, and the adapters it serves.

The worker runs one batch continuously: between decode steps the scheduler admits waiting
requests and finished ones leave. Each step takes one of two paths:
- merged, when every request in it uses the same adapter (or none): that adapter is applied in
  place (restore the old deltas exactly, apply the new; nothing when already applied), and the
  model runs as plain as the base;
- mixed, otherwise: the base weights are restored to pristine and each row's own sparse delta
  is added beside every target linear (`server.mixed`). Adapters whose deltas would not survive
  merging into the serving dtype take this path even alone.
Adapter management changes the registry and the store; anything that must touch or read the
weights (deleting the applied adapter, measuring an upload's fidelity, a chunk of the integrity
check) holds `model_lock`, which the worker holds for each step.

One request's failure is its own: a row whose sampling or logits fail leaves the batch alone
(`RunningBatch`); a forward call that raises is undone and retried on halves of its rows until
the rows that fail alone are found (`_prefill`, `_decode`).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from neuroada.base_model import load_base_model, load_tokenizer, resolve_model_name
from neuroada.errors import AdapterError
from neuroada.fingerprint import BaseModelSpec
from neuroada.inplace import Applied, PackedWeights
from server.generation import Event, Failed, Finished, GenerationRequest, RunningBatch
from server.metrics import ServerMetrics
from server.mixed import MixedAdapters
from server.registry import AdapterRegistry, ResidentAdapter
from server.scheduler import BatchScheduler
from server.settings import ServerSettings
from server.store import AdapterStore

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(settings: ServerSettings) -> tuple[torch.device, torch.dtype]:
    if settings.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(settings.device)
    if settings.dtype == "auto":
        # bf16 matmuls are slow on most CPUs, and fp32 weights keep every merged delta.
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, _DTYPES[settings.dtype]


class Engine:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.metrics = ServerMetrics()
        self.model_name = resolve_model_name(settings.model)
        device, dtype = resolve_device_dtype(settings)
        # Loaded on the host and moved into the device's packed buffer layer by layer: the device
        # never holds the linear weights twice.
        self.model: PreTrainedModel = load_base_model(settings.model, dtype=dtype, device="cpu")
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(settings.model)
        self.base = BaseModelSpec.from_model(self.model, self.model_name)
        self.packed = PackedWeights(self.model, device=device)
        self.model.to(device)
        self.base_checksum = self.packed.checksum()
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        # Limits a request is checked against before it is tokenized or queued.
        self.context_length: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab()), default=1)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)

        self.model_lock = threading.Lock()
        self.manage_lock = threading.Lock()  # serialises uploads and deletes: disk and registry agree
        self.deep_check_lock = threading.Lock()  # one /health?deep=1 at a time
        self.upload_slots = threading.BoundedSemaphore(settings.max_concurrent_uploads)
        self._applied: ResidentAdapter | None = None
        self._saved: torch.Tensor | None = None  # the weights under the applied adapter's deltas

        self.store = AdapterStore(settings.adapter_dir)
        self.registry = AdapterRegistry(self.packed, self.base, settings.fidelity_threshold, self._base_values)
        self.load_errors: dict[str, str] = {}  # adapter files in the store that failed validation
        self.scheduler = BatchScheduler(
            settings.max_batch_size, settings.max_queued_requests, settings.max_wait_ms / 1000, settings.mixed_batches
        )
        self.mixed = MixedAdapters(self.model, device)
        self._path = "merged"
        self._stop = threading.Event()
        self._drain_until = float("inf")  # set by drain()
        self._worker = threading.Thread(target=self._run, name="neuroada-worker", daemon=True)
        self._load_store()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    def drain(self) -> None:
        """Begin stopping (from any thread; SIGTERM calls it): queued and new requests fail (503),
        running ones get `shutdown_drain_s` to finish and are then cancelled (each leaves within
        one step)."""
        if not self._stop.is_set():
            self._drain_until = time.monotonic() + self.settings.shutdown_drain_s
            self._stop.set()
        self.scheduler.close()

    def stop(self) -> None:
        """`drain`, wait for the worker, restore the base weights."""
        self.drain()
        if self._worker.is_alive():
            self._worker.join(timeout=self.settings.shutdown_drain_s + 30)
        self.restore_base()

    def _load_store(self) -> None:
        for name in self.store.names():
            try:
                resident = self.registry.prepare(name, self.store.source(name))
            except (AdapterError, OSError) as e:
                self.load_errors[name] = str(e)
                log.error("adapter %s skipped: %s", name, e)
                continue
            self.registry.put(resident)
            log.info(
                "adapter %s loaded: k=%d, %s",
                name,
                resident.adapter.metadata.k,
                "mergeable" if resident.merged else "served unmerged (mixed path)",
            )
        self._update_adapter_gauges()

    # --- requests ----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request (raises QueueFull); its adapter must be resident (checked by the caller)."""
        deliver = request.on_event
        ended = False

        def on_event(event: Event) -> None:
            nonlocal ended
            if ended:  # one final event per request, whatever path failed it
                return
            if isinstance(event, (Finished, Failed)):
                ended = True
                self._record(request, event)
            deliver(event)

        request.on_event = on_event
        self.scheduler.submit(request)
        self.metrics.queue_depth.set(self.scheduler.depth())

    def _run(self) -> None:
        batch = RunningBatch(self.model, self.tokenizer, self.eos_ids, self.pad_id, before_forward=self._bind_rows)
        while not (self._stop.is_set() and not batch):  # on stop, running requests finish first
            if self._stop.is_set() and time.monotonic() > self._drain_until:
                for request in batch.requests:  # past the drain time: cancelled, they leave next step
                    request.cancelled.set()
            newcomers = []
            try:
                newcomers = self.scheduler.admit([r.adapter for r in batch.requests], applied=self.applied)
                self.metrics.queue_depth.set(self.scheduler.depth())
                newcomers = self._resolve(newcomers)
                if batch or newcomers:
                    with self.model_lock:
                        self._step(batch, newcomers)
            except Exception as e:  # a bug outside any one request: fail what is in hand, keep serving
                log.exception("worker iteration failed")
                failed = _failure(e)
                for r in newcomers:
                    r.on_event(failed)
                batch.fail(failed)
                with self.model_lock:
                    self._revert()
            self.metrics.running.set(len(batch))

    def _resolve(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """Fix the adapter version each request runs with; one deleted meanwhile fails with 404."""
        ready = []
        for r in requests:
            if r.adapter is not None:
                r.resident = self.registry.get(r.adapter)
                if r.resident is None:
                    r.on_event(Failed(404, f"adapter {r.adapter!r} was deleted before the request ran"))
                    continue
                r.resident.stats.requests_served += 1
                r.resident.stats.last_used = time.time()
            ready.append(r)
        return ready

    def _step(self, batch: RunningBatch, newcomers: list[GenerationRequest]) -> None:
        """Newcomers' prefill, then one decode step of the whole batch, on the path this step needs.

        A forward that raises is undone (the batch is as it was, the weights are the base's) and
        retried on halves of its rows, down to single rows: only the rows that fail alone fail,
        and every other row gets the token it would have got in any batch.
        """
        if newcomers:
            self._prefill(batch, newcomers)
        if batch:
            self._decode(batch)

    def _prefill(self, batch: RunningBatch, newcomers: list[GenerationRequest]) -> None:
        try:
            self._choose_path(batch.requests + newcomers)
            batch.join(newcomers)
        except Exception as e:
            self._revert()
            if len(newcomers) == 1:
                log.exception("prefill failed")
                newcomers[0].on_event(_failure(e))
                return
            half = len(newcomers) // 2
            self._prefill(batch, newcomers[:half])
            self._prefill(batch, newcomers[half:])

    def _decode(self, batch: RunningBatch) -> None:
        try:
            self._choose_path(batch.requests)
            batch.step()
        except Exception as e:
            self._revert()
            if len(batch) == 1:
                log.exception("decode step failed")
                batch.fail(_failure(e))
                return
            other = batch.split()
            self._decode(batch)
            self._decode(other)
            batch.merge(other)

    def restore_base(self) -> None:
        """Put the base weights back (no adapter applied); the next step applies what it needs."""
        with self.model_lock:
            self._revert()

    def _revert(self) -> None:
        """After a failure: the plain model on base weights (undone before anyone hears of it)."""
        self.mixed.unbind()
        self._switch_to(None)

    def _choose_path(self, requests: list[GenerationRequest]) -> None:
        """Merged when every request runs the same mergeable adapter (or none): zero overhead per
        token. Mixed otherwise: pristine base weights plus each row's own delta."""
        versions = {id(r.resident): r.resident for r in requests}
        only = next(iter(versions.values())) if len(versions) == 1 else None
        if len(versions) == 1 and (only is None or only.merged):
            self.mixed.unbind()
            self._switch_to(only)
            self._path = "merged"
        else:
            self._switch_to(None)
            self._path = "mixed"
        self.metrics.steps.labels(path=self._path).inc()

    def _bind_rows(self, requests: list[GenerationRequest]) -> None:
        if self._path == "mixed":
            self.mixed.bind([r.resident for r in requests])

    def _switch_to(self, resident: ResidentAdapter | None) -> None:
        """Make `resident` (None = base) the applied adapter; lazy when it already is."""
        if self._applied is resident:
            return
        started = time.perf_counter()
        if self._applied is not None and resident is not None:
            self._saved = self.packed.switch_(self._applied.delta, resident.delta, self._saved)
        elif self._applied is not None:
            self.packed.restore_(self._applied.delta, self._saved)
            self._saved = None
        else:
            self._saved = self.packed.apply_(resident.delta)
        self._applied = resident
        if self.packed.device.type == "cuda":
            torch.cuda.synchronize(self.packed.device)
        self.metrics.switches.inc()
        self.metrics.switch_seconds.observe(time.perf_counter() - started)

    def _record(self, request: GenerationRequest, event: Finished | Failed) -> None:
        """Metrics for a request that ended, whether or not its client is still there."""
        label = request.adapter or "base"
        if isinstance(event, Finished):
            # 499 (client closed request): the client went away and its generation was stopped.
            status = "499" if event.finish_reason == "cancelled" else "200"
            self.metrics.requests.labels(adapter=label, status=status).inc()
            self.metrics.tokens.labels(adapter=label).inc(event.completion_tokens)
            if event.first_token_at is not None:
                self.metrics.ttft.observe(event.first_token_at - request.enqueued_at)
            self.metrics.e2e.observe(time.monotonic() - request.enqueued_at)
        else:
            self.metrics.requests.labels(adapter=label, status=str(event.status)).inc()

    # --- adapter management ------------------------------------------------------------------

    def upload(self, name: str, incoming: Path) -> tuple[ResidentAdapter, bool]:
        """Validate the uploaded file fully, move it into the store atomically, then serve it.
        Raises AdapterError and changes nothing (the caller removes `incoming`)."""
        resident = self.registry.prepare(name, incoming)
        with self.manage_lock:
            replaced_on_disk = self.store.commit(incoming, name)
            replaced = self.registry.put(resident) or replaced_on_disk
            self.load_errors.pop(name, None)
        self._update_adapter_gauges()
        return resident, replaced

    def delete(self, name: str) -> bool:
        with self.manage_lock:
            known = self.registry.get(name) is not None or name in self.load_errors
            with self.model_lock:
                if self._applied is not None and self._applied.name == name:
                    self._switch_to(None)
                self.registry.remove(name)
            on_disk = self.store.delete(name)
            self.load_errors.pop(name, None)
        self.metrics.forget_adapter(name)
        self._update_adapter_gauges()
        return known or on_disk

    def _update_adapter_gauges(self) -> None:
        self.metrics.adapters_resident.set(len(self.registry.all()))
        self.metrics.adapter_bytes.set(self.registry.resident_bytes())
        if self.packed.device.type == "cuda":
            self.metrics.device_memory.set(torch.cuda.memory_allocated(self.packed.device))

    # --- integrity ---------------------------------------------------------------------------

    def base_weights_intact(self) -> bool:
        """Compare every base weight with its load-time checksum, without restoring the base: a
        chunk at a time under the model lock, the applied adapter's saved originals patched in."""
        return self.packed.checksum(self.model_lock, self._applied_originals) == self.base_checksum

    def _base_values(self, offsets: torch.Tensor) -> torch.Tensor:  # [n]
        with self.model_lock:
            return self.packed.base_values(offsets, self._applied_originals())

    def _applied_originals(self) -> Applied | None:
        return None if self._applied is None else (self._applied.delta, self._saved)

    @property
    def applied(self) -> str | None:
        return self._applied.name if self._applied else None


def _failure(error: Exception) -> Failed:
    return Failed(500, f"generation failed: {type(error).__name__}: {error}")


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set()
    config_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list):
        ids.update(config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
