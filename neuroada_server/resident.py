"""Adapters laid out on the model's device, ready to be merged or bound to batch rows.

`AdapterLoader` reads and validates a file fully against the base (`read`: the host copy) and
lays it out on the device with its merge fidelity (`place`). A `ResidentAdapter` is immutable: a
replacement is a new version, and a batch keeps the version it started with.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuroada.errors import AdapterError, UnreadableAdapterError
from neuroada.fingerprint import BaseModelSpec
from neuroada.format import AdapterHeader, SparseAdapter, load_adapter, read_adapter_header
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


@dataclass(frozen=True, eq=False)
class IndexSetCopy:
    """One index set on the device, shared by its resident adapters."""

    offsets: torch.Tensor  # [n] int64, positions in PackedWeights.buffer
    base: torch.Tensor  # [n] the pristine base weights there (an adapter's fidelity is measured on them)


@dataclass(frozen=True)
class ResidentAdapter:
    name: str
    version: int
    adapter: SparseAdapter  # metadata and the host copy of the tensors
    delta: PackedDelta  # on the device; its offsets are index_set.offsets
    index_set: IndexSetCopy
    fidelity: Fidelity
    merged: bool  # False: always served through the mixed path (fidelity below threshold)
    loaded_at: float
    stats: UsageStats = field(default_factory=UsageStats, compare=False)


class AdapterLoader:
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
        self._versions = itertools.count(1)

    def new_version(self) -> int:
        return next(self._versions)

    def read_header(self, path: Path) -> AdapterHeader:
        """The checks a store listing can afford, from the header alone: format, metadata, base
        fingerprint, target layers. Raises AdapterError."""
        header = read_adapter_header(path, self.base)
        for target in header.metadata.targets:
            self.packed.check_target(target)
        return header

    def read(self, name: str, source: bytes | Path) -> SparseAdapter:
        """The adapter, validated fully against the base. Raises AdapterError, whatever is wrong."""
        return self._as_adapter_error(name, lambda: load_adapter(source, self.base))

    def place(
        self,
        name: str,
        adapter: SparseAdapter,
        version: int | None = None,
        index_set: IndexSetCopy | None = None,
        stats: UsageStats | None = None,
    ) -> ResidentAdapter:
        """Lay a validated adapter out on the device. `index_set`, the copy already placed for
        adapters with its index set, is shared; it also spares reading the base weights (which
        waits for the step running on them)."""

        def place() -> ResidentAdapter:
            if index_set is None:
                offsets = self.packed.offsets(adapter)
                shared = IndexSetCopy(offsets, self.base_values(offsets))
            else:
                shared = index_set
            delta = PackedDelta(shared.offsets, self.packed.values(adapter))
            fidelity = measure_fidelity(shared.base, delta.values, self.packed.dtype)
            return ResidentAdapter(
                name=name,
                version=self.new_version() if version is None else version,
                adapter=adapter,
                delta=delta,
                index_set=shared,
                fidelity=fidelity,
                merged=fidelity.survived >= self.fidelity_threshold,
                loaded_at=time.time(),
                stats=stats or UsageStats(),
            )

        return self._as_adapter_error(name, place)

    def prepare(self, name: str, source: bytes | Path) -> ResidentAdapter:
        """`read` then `place`: a file straight to the device."""
        return self.place(name, self.read(name, source))

    @staticmethod
    def _as_adapter_error(name: str, work: Callable):
        try:
            return work()
        except AdapterError:
            raise
        except Exception as e:  # whatever else a file can make fail, it is that file's error, never the server's
            log.exception("adapter %s could not be read", name)
            raise UnreadableAdapterError(f"{type(e).__name__}: {e}") from e


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
