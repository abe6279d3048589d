"""The mixed path: pristine base weights, and each batch row's own adapter added beside them.

`MixedAdapters` keeps, for every index set in use, its indices on the device and a stack of
value slots (slot 0 = zeros, for rows without an adapter), and puts adapters into slots as rows
need them, least recently used out first: an adapter is copied to the device once, not at every
change of the batch. While the mixed path is on, each target linear's forward is replaced by the
same product plus the deltas of every index set bound to the coming forward call (`MixedForward`,
as accelerate's hooks replace `module.forward`): the module's own forward and a forward hook on it
cost more per call than such a replacement, a cost of the order of a decode step's whole sparse
kernel on the CPU (benchmarks/RESULTS.md). Our decoder's one-call layers (float32 on the CPU) take each
replacement's bound deltas (`MixedForward.deltas`) and add them inside that call. Elsewhere each
layer's deltas are one kernel call that adds straight into its output: the C++ kernel on the CPU,
one Triton launch on CUDA, where an eager step is bound by its launches (the deltas of sibling
projections computed in one launch, then each added by its slice in float32, made 25 kernel
launches a layer for all seven projections where this makes 7).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from neuroada_kernels import add_mixed_delta_, cpu_kernels, linear
from neuroada_server.resident import ResidentAdapter

MAX_INDEX_SETS = 16  # index sets kept on the device; past it, unused ones are dropped (oldest first)


@dataclass(eq=False)
class _Unit:
    """One layer's deltas in an index set: its indices and every slot's values."""

    indices: torch.Tensor  # [k, d_out] int32 (gathers with 32-bit indices are faster), j-major
    values: torch.Tensor  # [capacity, k, d_out]; slot 0 stays zero


@dataclass
class _IndexSet:
    """The slots of the adapters sharing one index set (one `index_hash`)."""

    units: dict[str, _Unit]  # layer -> its deltas
    slot_of: OrderedDict[int, int] = field(default_factory=OrderedDict)  # adapter version -> slot, LRU first

    @property
    def capacity(self) -> int:
        return next(iter(self.units.values())).values.shape[0]


class MixedAdapters:
    def __init__(self, model: nn.Module, device: torch.device):
        self.modules = dict(model.named_modules())
        self.device = device
        # Values are bf16 on disk and stay bf16: the kernels widen them to float32 as they load
        # (a decode step reads every slot's values from memory, so half the bytes is time saved);
        # only the torch twin, for a CPU without the C++ kernels, wants float32 for speed.
        cpu_twin = device.type == "cpu" and cpu_kernels() is None
        self.values_dtype = torch.float32 if cpu_twin else torch.bfloat16
        self._sets: OrderedDict[str, _IndexSet] = OrderedDict()  # index_hash -> slots, LRU first
        self._bound: list[tuple[_IndexSet, torch.Tensor]] = []  # (index set, slots [B]) of the coming forward
        self._patched: set[str] = set()  # layers whose forward adds the bound deltas

    def bind(self, rows: list[ResidentAdapter | None]) -> None:
        """Make the next forward call add, to batch row b, the delta of adapter rows[b] (None: none)."""
        wanted = {r.version: r for r in rows if r is not None}
        for resident in wanted.values():
            index_hash = resident.adapter.metadata.index_hash
            if index_hash not in self._sets:
                self._sets[index_hash] = self._new_set(resident)
            self._sets.move_to_end(index_hash)
            self._ensure_slot(self._sets[index_hash], resident, keep=wanted.keys())
        self._drop_cold_sets(keep={r.adapter.metadata.index_hash for r in wanted.values()})
        self._bound = []
        for index_set in self._sets.values():
            slots = [index_set.slot_of.get(r.version, 0) if r is not None else 0 for r in rows]
            if any(slots):
                self._bound.append((index_set, torch.tensor(slots, dtype=torch.int64, device=self.device)))
        for name in {n for s in self._sets.values() for n in s.units} - self._patched:
            self._patch(name)

    @contextmanager
    def per_token(self, counts: torch.Tensor):  # [B] int64: tokens of each bound row
        """Within it, each bound row's slot repeats once per token of the row: a forward over the
        rows' tokens packed ([N, d_in], row b's counts[b] tokens in a run, N = counts.sum()) adds
        each token its row's delta."""
        bound = self._bound
        self._bound = [(index_set, slots.repeat_interleave(counts)) for index_set, slots in bound]
        try:
            yield
        finally:
            self._bound = bound

    def unbind(self) -> None:
        """Leave the mixed path: the target linears get their own forward back, so the merged
        path runs the plain model."""
        for name in self._patched:
            del self.modules[name].forward
        self._patched = set()
        self._bound = []

    def _patch(self, name: str) -> None:
        module = self.modules[name]
        if not isinstance(module, nn.Linear) or "forward" in vars(module):
            raise TypeError(f"{name}: the mixed path needs a plain nn.Linear, got {type(module).__name__}")
        module.forward = MixedForward(self, name, module)
        self._patched.add(name)

    def bound(self, name: str) -> list[tuple[_Unit, torch.Tensor]]:
        """The units of layer `name` bound to the coming forward call, with their rows' slots."""
        return [(unit, slots) for index_set, slots in self._bound if (unit := index_set.units.get(name)) is not None]

    def _new_set(self, resident: ResidentAdapter) -> _IndexSet:
        units = {}
        for name, delta in resident.adapter.layers.items():
            indices = delta.indices.t().to(self.device, torch.int32).contiguous()  # [k, d_out]
            values = torch.zeros(2, *indices.shape, dtype=self.values_dtype, device=self.device)
            units[name] = _Unit(indices, values)
        return _IndexSet(units=units)

    def _drop_cold_sets(self, keep: set[str]) -> None:
        """Bound the memory of index sets no running row uses: keep the most recent few."""
        cold = [h for h in self._sets if h not in keep]
        for index_hash in cold[: max(0, len(self._sets) - MAX_INDEX_SETS)]:
            del self._sets[index_hash]

    def _ensure_slot(self, index_set: _IndexSet, resident: ResidentAdapter, keep) -> None:
        if resident.version in index_set.slot_of:
            index_set.slot_of.move_to_end(resident.version)
            return
        used = set(index_set.slot_of.values())
        free = next((s for s in range(1, index_set.capacity) if s not in used), None)
        if free is None:
            evictable = next((v for v in index_set.slot_of if v not in keep), None)
            if evictable is not None:
                free = index_set.slot_of.pop(evictable)
            else:  # every slot serves a row of this batch: double the stack
                free = index_set.capacity
                for unit in index_set.units.values():
                    unit.values = torch.cat([unit.values, torch.zeros_like(unit.values)])
        for name, unit in index_set.units.items():
            unit.values[free].copy_(resident.adapter.layers[name].values.t())
        index_set.slot_of[resident.version] = free


class MixedForward:
    """A target linear's forward while the mixed path is on: its product plus the deltas of every
    index set bound to the coming forward call. `deltas` hands them to a caller that computes the
    product itself (our decoder's one-call layers)."""

    def __init__(self, adapters: MixedAdapters, name: str, module: nn.Linear):
        self.adapters, self.name = adapters, name
        # Weights change only in place (PackedWeights), never by reassignment, so the forward can
        # keep the tensors rather than look them up through nn.Module.__getattr__ at every call.
        self.weight, self.bias = module.weight, module.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.bias)
        for index_set, slots in self.adapters._bound:  # the hot path: a call per target layer per step
            unit = index_set.units.get(self.name)
            if unit is not None:
                # Indices were checked against the base when the adapter was loaded; slots are ours.
                add_mixed_delta_(out, x, unit.indices, unit.values, slots, check_ranges=False)
        return out

    def deltas(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(indices [k, d_out], values [slots, k, d_out], slots [B]) per bound index set."""
        return [(unit.indices, unit.values, slots) for unit, slots in self.adapters.bound(self.name)]
