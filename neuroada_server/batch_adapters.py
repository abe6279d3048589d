"""The adapters of each step: merged into the weights, or bound row by row beside them (mixed).

`BatchAdapters` is what the worker and a `RunningBatch` ask of the adapter layer, and all they
know of it: the worker `plan`s a step over its requests (the path, and the weights it needs),
the batch `bind`s the rows of each forward call just before it, and `reset` puts the plain
model on its base weights back (after a failure, at stop). `SparseDeltaAdapters` is ours:

- merged, when every request of the step uses the same mergeable adapter (or none): that adapter
  is applied in place (restore the old deltas exactly, apply the new; nothing when already
  applied), and the model runs as plain as the base;
- mixed, otherwise: the weights are restored to pristine and each row's own sparse delta is added
  beside every target linear (`neuroada_server.mixed`). Adapters whose deltas would not survive merging
  into the serving dtype take this path even alone.

It owns `lock`, which guards the weights: the worker holds it for each step, and whoever reads
or restores them from another thread (an upload's fidelity, the integrity check, a delete of the
applied adapter) takes it too.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Protocol

import torch

from neuroada.inplace import Applied, PackedWeights
from neuroada_server.metrics import ServerMetrics
from neuroada_server.mixed import MixedAdapters

if TYPE_CHECKING:
    from neuroada_server.generation import GenerationRequest
    from neuroada_server.resident import ResidentAdapter


class BatchAdapters(Protocol):
    @property
    def applied_name(self) -> str | None:
        """The adapter merged into the weights now (None: the base)."""

    def plan(self, requests: list[GenerationRequest]) -> None:
        """Choose the path of a step over these requests (all of the step's rows) and set the
        weights it needs."""

    def bind(self, rows: list[GenerationRequest]) -> None:
        """Just before a forward call: its rows' adapters, in row order."""

    def reset(self) -> None:
        """The plain model on its base weights."""


class NoAdapters:
    """The base model alone (a batch run without a server)."""

    applied_name = None

    def plan(self, requests: list[GenerationRequest]) -> None:
        pass

    def bind(self, rows: list[GenerationRequest]) -> None:
        pass

    def reset(self) -> None:
        pass


class SparseDeltaAdapters:
    def __init__(self, packed: PackedWeights, mixed: MixedAdapters, metrics: ServerMetrics):
        self.packed = packed
        self.mixed = mixed
        self.metrics = metrics
        self.lock = threading.Lock()
        self.path = "merged"  # of the step planned last
        self._applied: ResidentAdapter | None = None
        self._saved: torch.Tensor | None = None  # the weights under the applied adapter's deltas

    @property
    def applied(self) -> ResidentAdapter | None:
        return self._applied

    @property
    def applied_name(self) -> str | None:
        return self._applied.name if self._applied is not None else None

    def plan(self, requests: list[GenerationRequest]) -> None:
        """Merged when every request runs the same mergeable adapter (or none): zero overhead per
        token. Mixed otherwise: pristine base weights plus each row's own delta."""
        versions = {id(r.resident): r.resident for r in requests}
        only = next(iter(versions.values())) if len(versions) == 1 else None
        if len(versions) == 1 and (only is None or only.merged):
            self.mixed.unbind()
            self._switch_to(only)
            self.path = "merged"
        else:
            self._switch_to(None)
            self.path = "mixed"
        self.metrics.steps.labels(path=self.path).inc()

    def bind(self, rows: list[GenerationRequest]) -> None:
        if self.path == "mixed":
            self.mixed.bind([r.resident for r in rows])

    def reset(self) -> None:
        self.mixed.unbind()
        self._switch_to(None)

    def forget(self, name: str) -> None:
        """An adapter is being deleted: if it is applied, restore the base first."""
        with self.lock:
            if self._applied is not None and self._applied.name == name:
                self._switch_to(None)

    def restore_base(self) -> None:
        """Put the base weights back (no adapter applied); the next step applies what it needs."""
        with self.lock:
            self.reset()

    def base_values(self, offsets: torch.Tensor) -> torch.Tensor:  # [n]
        """The pristine base weights at `offsets`, whatever adapter is merged meanwhile."""
        with self.lock:
            return self.packed.base_values(offsets, self._originals())

    def base_checksum(self) -> str:
        """The base weights' checksum, read a chunk at a time under the lock beside decoding, the
        applied adapter's saved originals patched in: nothing is restored to compute it."""
        return self.packed.checksum(self.lock, self._originals)

    def _originals(self) -> Applied | None:
        return None if self._applied is None else (self._applied.delta, self._saved)

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
