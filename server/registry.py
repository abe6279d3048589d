"""Resident adapters: validated, laid out on the device, with their fidelity and usage counts.

Adapters with the same index set (same `index_hash`) share one copy of their offsets. Every
add or replace makes a new immutable `ResidentAdapter` version; a batch holds the version it
started with, so a replacement never changes a running batch.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuroada.errors import AdapterError, UnreadableAdapterError
from neuroada.fingerprint import BaseModelSpec
from neuroada.format import SparseAdapter, load_adapter
from neuroada.inplace import PackedDelta, PackedWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fidelity:
    """How much of an adapter survives being merged into weights of the serving dtype."""

    survived: float  # share of non-zero deltas that change their weight at all
    relative_error: float  # ||merged - w - delta|| / ||delta||


@dataclass
class UsageStats:
    requests_served: int = 0
    last_used: float | None = None


@dataclass(frozen=True)
class ResidentAdapter:
    name: str
    version: int
    adapter: SparseAdapter  # metadata and the host copy of the tensors
    delta: PackedDelta  # on the device
    fidelity: Fidelity
    merged: bool  # False: always served through the mixed path (fidelity below threshold)
    loaded_at: float
    stats: UsageStats = field(default_factory=UsageStats, compare=False)

    def describe(self) -> dict:
        meta = self.adapter.metadata
        return {
            "name": self.name,
            "version": self.version,
            "k": meta.k,
            "layers": len(self.adapter.layers),
            "parameters": self.adapter.num_params,
            "bytes": self.adapter.nbytes,
            "fingerprint_match": True,  # only validated adapters become resident
            "base_model": meta.base_model,
            "selection": meta.selection,
            "index_hash": meta.index_hash,
            "created": meta.created,
            "training": meta.training,
            "fidelity": {"survived": self.fidelity.survived, "relative_error": self.fidelity.relative_error},
            "path": "merged" if self.merged else "unmerged",
            "loaded_at": self.loaded_at,
            "last_used": self.stats.last_used,
            "requests_served": self.stats.requests_served,
        }


class AdapterRegistry:
    def __init__(
        self,
        packed: PackedWeights,
        base: BaseModelSpec,
        fidelity_threshold: float,
        base_values: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.packed = packed
        # The pristine base weights at given offsets, whatever adapter is merged meanwhile: an
        # adapter's fidelity depends on the file and the base only, never on upload timing.
        self.base_values = base_values or packed.base_values
        self.base = base
        self.fidelity_threshold = fidelity_threshold
        self._adapters: dict[str, ResidentAdapter] = {}
        self._offsets: dict[str, torch.Tensor] = {}  # index_hash -> shared offsets
        self._versions = itertools.count(1)
        self._lock = threading.Lock()

    def prepare(self, name: str, source: bytes | Path) -> ResidentAdapter:
        """Validate a file (or its bytes) fully and lay it out on the device; registers nothing.
        Raises AdapterError, whatever is wrong with the file."""
        try:
            adapter = load_adapter(source, self.base)
            with self._lock:
                offsets = self._offsets.get(adapter.metadata.index_hash)
            delta = self.packed.pack(adapter, offsets=offsets)
            fidelity = measure_fidelity(self.base_values(delta.offsets), delta.values, self.packed.dtype)
        except AdapterError:
            raise
        except Exception as e:  # whatever else a file can make fail, it is that file's error, never the server's
            log.exception("adapter %s could not be read", name)
            raise UnreadableAdapterError(f"{type(e).__name__}: {e}") from e
        return ResidentAdapter(
            name=name,
            version=next(self._versions),
            adapter=adapter,
            delta=delta,
            fidelity=fidelity,
            merged=fidelity.survived >= self.fidelity_threshold,
            loaded_at=time.time(),
        )

    def put(self, resident: ResidentAdapter) -> bool:
        """Make `resident` the served version of its name; True if it replaced one."""
        with self._lock:
            replaced = resident.name in self._adapters
            self._adapters[resident.name] = resident
            self._offsets.setdefault(resident.adapter.metadata.index_hash, resident.delta.offsets)
            self._drop_unused_offsets()
            return replaced

    def remove(self, name: str) -> ResidentAdapter | None:
        with self._lock:
            resident = self._adapters.pop(name, None)
            self._drop_unused_offsets()
            return resident

    def get(self, name: str) -> ResidentAdapter | None:
        with self._lock:
            return self._adapters.get(name)

    def all(self) -> list[ResidentAdapter]:
        with self._lock:
            return [self._adapters[n] for n in sorted(self._adapters)]

    def resident_bytes(self) -> int:
        with self._lock:
            values = sum(r.delta.values.nbytes for r in self._adapters.values())
            return values + sum(o.nbytes for o in self._offsets.values())

    def _drop_unused_offsets(self) -> None:
        used = {r.adapter.metadata.index_hash for r in self._adapters.values()}
        for h in list(self._offsets):
            if h not in used:
                del self._offsets[h]


def measure_fidelity(base: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> Fidelity:
    """Merge the deltas `values` into the `base` weights under them on the side (no weight is
    written) and compare with the intended deltas."""
    weights = base.float()
    intended = values.float()
    effective = (weights + intended).to(dtype).float() - weights
    nonzero = intended != 0
    survived = float(((effective != 0) & nonzero).sum()) / max(1, int(nonzero.sum()))
    norm = float(intended.norm())
    relative_error = float((effective - intended).norm()) / norm if norm > 0 else 0.0
    return Fidelity(survived=round(survived, 6), relative_error=round(relative_error, 6))
