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

A compiled decode step (`neuroada_server.forward.graphs`) runs mixed steps too, and what it needs
is kept here: a `rehearsal` of an adapter shape (k, target layers) to trace the graph for before
any such adapter is loaded; stacks of a rehearsed shape made whole at once (`compiled_slots`, a
slot for every row a batch may hold: they never grow, so the traced shapes hold; other shapes'
stacks start small and double); stacks and indices marked as read in place (a CUDA graph reads
them where they lie rather than copying them in); one `MixedForward` per layer for the object's
life (a compiled graph is tied to the objects it traced); and a `signature` of what the coming
forward call adds: the graph traced for a signature serves every index set with it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from neuroada_kernels import add_mixed_delta_, cpu_kernels, linear
from neuroada_server.resident import ResidentAdapter

MAX_INDEX_SETS = 16  # index sets kept on the device; past it, unused ones are dropped (oldest first)


@dataclass(eq=False)
class _Unit:
    """One layer's deltas in an index set: its indices and every slot's values."""

    indices: torch.Tensor  # [k, d_out] int32 (gathers with 32-bit indices are faster), j-major
    values: torch.Tensor  # [capacity, k, d_out]; slot 0 stays zero

    def __post_init__(self):
        # A captured graph reads them where they lie; a stack that grows is a new address, which
        # makes a graph re-record, not recompile (unguarded).
        for tensor in (self.indices, self.values):
            torch._dynamo.mark_static_address(tensor, guard=False)


@dataclass
class _IndexSet:
    """The slots of the adapters sharing one index set (one `index_hash`)."""

    units: dict[str, _Unit]  # layer -> its deltas, by name
    slot_of: OrderedDict[int, int] = field(default_factory=OrderedDict)  # adapter version -> slot, LRU first
    signature: tuple = field(init=False)  # what a traced forward depends on: each layer's name and stack shape

    def __post_init__(self):
        self.signature = tuple((name, tuple(unit.values.shape)) for name, unit in self.units.items())

    @property
    def capacity(self) -> int:
        return next(iter(self.units.values())).values.shape[0]

    def grow(self) -> int:
        """Double every stack (new zero slots); returns the first new slot."""
        free = self.capacity
        for name, unit in self.units.items():
            self.units[name] = _Unit(unit.indices, torch.cat([unit.values, torch.zeros_like(unit.values)]))
        self.__post_init__()
        return free


class MixedAdapters:
    def __init__(self, model: nn.Module, device: torch.device, compiled_slots: int = 2):
        self.modules = dict(model.named_modules())
        self.device = device
        self.compiled_slots = compiled_slots  # the stacks of a rehearsed shape, slot 0 included
        self._rehearsed: set[tuple[int, tuple[str, ...]]] = set()  # (k, target layers, sorted)
        # Values are bf16 on disk and stay bf16: the kernels widen them to float32 as they load
        # (a decode step reads every slot's values from memory, so half the bytes is time saved);
        # only the torch twin, for a CPU without the C++ kernels, wants float32 for speed.
        cpu_twin = device.type == "cpu" and cpu_kernels() is None
        self.values_dtype = torch.float32 if cpu_twin else torch.bfloat16
        self._sets: OrderedDict[str, _IndexSet] = OrderedDict()  # index_hash -> slots, LRU first
        self._bound: list[tuple[_IndexSet, torch.Tensor]] = []  # (index set, slots [B]) of the coming forward
        self._patched: set[str] = set()  # layers whose forward adds the bound deltas
        self._patched_names: tuple[str, ...] = ()  # the same, sorted
        self._forwards: dict[str, MixedForward] = {}  # made once a layer: a compiled graph holds them

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
        # Exactly the bound sets' layers: any other replaced forward would only cost its call, and
        # would make the step's signature one no graph was traced for.
        adapted = {name for index_set, _ in self._bound for name in index_set.units}
        for name in self._patched - adapted:
            self._unpatch(name)
        for name in adapted - self._patched:
            self._patch(name)

    def per_token(self, counts: torch.Tensor):  # [B] int64: tokens of each bound row
        """Within it, each bound row's slot repeats once per token of the row: a forward over the
        rows' tokens packed ([N, d_in], row b's counts[b] tokens in a run, N = counts.sum()) adds
        each token its row's delta."""
        return self._slots_as(lambda slots: slots.repeat_interleave(counts))

    def padded(self, rows: int):
        """Within it, the bound rows are followed by slot-0 rows up to `rows`: a compiled step's
        padding rows add nothing."""
        return self._slots_as(lambda slots: F.pad(slots, (0, rows - slots.shape[0])))

    @contextmanager
    def _slots_as(self, remade: Callable[[torch.Tensor], torch.Tensor]):
        bound = self._bound
        self._bound = [(index_set, remade(slots)) for index_set, slots in bound]
        try:
            yield
        finally:
            self._bound = bound

    def signature(self) -> tuple:
        """What the coming forward call adds, as a compiled step depends on it: the layers whose
        forward is replaced, and each bound index set's `signature`."""
        return self._patched_names, tuple(index_set.signature for index_set, _ in self._bound)

    @contextmanager
    def rehearsal(self, k: int, targets: list[str]):
        """Within it, the forward is bound as it would be to adapters of k inputs per output on
        `targets` sharing an index set, every row on slot 0 (zeros): what a compiled step is traced
        for before any such adapter is loaded. Nothing may be bound before; nothing is after."""
        if self._patched:
            raise RuntimeError("a rehearsal needs the mixed path off")
        self._rehearsed.add((k, tuple(sorted(targets))))
        units = {name: self._zero_unit(name, k, self.compiled_slots) for name in sorted(targets)}
        for name in units:
            self._patch(name)
        self._bound = [(_IndexSet(units), torch.zeros(1, dtype=torch.int64, device=self.device))]
        try:
            yield
        finally:
            self.unbind()

    def unbind(self) -> None:
        """Leave the mixed path: the target linears get their own forward back, so the merged
        path runs the plain model."""
        for name in list(self._patched):
            self._unpatch(name)
        self._bound = []

    def _patch(self, name: str) -> None:
        module = self.modules[name]
        if not isinstance(module, nn.Linear) or "forward" in vars(module):
            raise TypeError(f"{name}: the mixed path needs a plain nn.Linear, got {type(module).__name__}")
        if name not in self._forwards:
            self._forwards[name] = MixedForward(self, name, module)
        module.forward = self._forwards[name]
        self._patched.add(name)
        self._patched_names = tuple(sorted(self._patched))

    def _unpatch(self, name: str) -> None:
        del self.modules[name].forward
        self._patched.discard(name)
        self._patched_names = tuple(sorted(self._patched))

    def bound(self, name: str) -> list[tuple[_Unit, torch.Tensor]]:
        """The units of layer `name` bound to the coming forward call, with their rows' slots."""
        found = []
        for index_set, slots in self._bound:  # a loop, not a comprehension with `:=`: dynamo traces it
            unit = index_set.units.get(name)
            if unit is not None:
                found.append((unit, slots))
        return found

    def _new_set(self, resident: ResidentAdapter) -> _IndexSet:
        layers = resident.adapter.layers
        names = tuple(sorted(layers))  # in a rehearsal's order: a traced graph guards it
        rehearsed = (resident.adapter.metadata.k, names) in self._rehearsed
        units = {}
        for name in names:
            indices = layers[name].indices  # [d_out, k]
            units[name] = self._zero_unit(name, indices.shape[1], self.compiled_slots if rehearsed else 2)
            units[name].indices.copy_(indices.t())
        return _IndexSet(units=units)

    def _zero_unit(self, name: str, k: int, slots: int) -> _Unit:
        d_out = self.modules[name].weight.shape[0]
        indices = torch.zeros(k, d_out, dtype=torch.int32, device=self.device)
        return _Unit(indices, torch.zeros(slots, k, d_out, dtype=self.values_dtype, device=self.device))

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
            else:  # every slot serves a row of this batch
                free = index_set.grow()
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
        for unit, slots in self.adapters.bound(self.name):  # the hot path: a call per target layer per step
            # Indices were checked against the base when the adapter was loaded; slots are ours.
            add_mixed_delta_(out, x, unit.indices, unit.values, slots, check_ranges=False)
        return out

    def deltas(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(indices [k, d_out], values [slots, k, d_out], slots [B]) per bound index set."""
        return [(unit.indices, unit.values, slots) for unit, slots in self.adapters.bound(self.name)]
