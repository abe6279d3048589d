"""The adapter catalog: the store on disk, the resident adapters, and the files that failed.

What the HTTP routes talk to for adapter management. Uploads and deletes are serialised, so the
store and the registry always agree; a delete of the applied adapter restores the base first.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from neuroada.errors import AdapterError
from server.batch_adapters import SparseDeltaAdapters
from server.metrics import ServerMetrics
from server.registry import AdapterRegistry, ResidentAdapter
from server.store import AdapterStore

log = logging.getLogger(__name__)


class AdapterCatalog:
    def __init__(
        self,
        store: AdapterStore,
        registry: AdapterRegistry,
        adapters: SparseDeltaAdapters,
        metrics: ServerMetrics,
        max_concurrent_uploads: int,
    ):
        self.store = store
        self.registry = registry
        self.adapters = adapters
        self.metrics = metrics
        self.load_errors: dict[str, str] = {}  # adapter files in the store that failed validation
        self.upload_slots = threading.BoundedSemaphore(max_concurrent_uploads)
        self._manage_lock = threading.Lock()  # serialises uploads and deletes: disk and registry agree

    def load_store(self) -> None:
        """Every adapter in the store, validated; a file that fails is listed with its error."""
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
        self._update_gauges()

    def get(self, name: str) -> ResidentAdapter | None:
        return self.registry.get(name)

    def all(self) -> list[ResidentAdapter]:
        return self.registry.all()

    def upload(self, name: str, incoming: Path) -> tuple[ResidentAdapter, bool]:
        """Validate the uploaded file fully, move it into the store atomically, then serve it.
        Raises AdapterError and changes nothing (the caller removes `incoming`)."""
        resident = self.registry.prepare(name, incoming)
        with self._manage_lock:
            replaced_on_disk = self.store.commit(incoming, name)
            replaced = self.registry.put(resident) or replaced_on_disk
            self.load_errors.pop(name, None)
        self._update_gauges()
        return resident, replaced

    def delete(self, name: str) -> bool:
        with self._manage_lock:
            known = self.registry.get(name) is not None or name in self.load_errors
            self.adapters.forget(name)
            self.registry.remove(name)
            on_disk = self.store.delete(name)
            self.load_errors.pop(name, None)
        self.metrics.forget_adapter(name)
        self._update_gauges()
        return known or on_disk

    def _update_gauges(self) -> None:
        self.metrics.adapters_resident.set(len(self.registry.all()))
        self.metrics.adapter_bytes.set(self.registry.resident_bytes())
        device = self.adapters.packed.device
        if device.type == "cuda":
            self.metrics.device_memory.set(torch.cuda.memory_allocated(device))
