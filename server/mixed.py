"""The mixed path: pristine base weights, and each batch row's own adapter added beside them.

`MixedAdapters` keeps, for every index set in use, its indices on the device and a stack of
value slots (slot 0 = zeros, for rows without an adapter), and puts adapters into slots as rows
need them, least recently used out first: an adapter is copied to the device once, not at every
change of the batch. While the mixed path is on, a forward hook on each target linear adds
`kernels.mixed_delta_` for every index set bound to the coming forward call.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from kernels import mixed_delta_
from server.registry import ResidentAdapter

MAX_INDEX_SETS = 16  # index sets kept on the device; past it, unused ones are dropped (oldest first)


@dataclass
class _IndexSet:
    """The slots of the adapters sharing one index set (one `index_hash`)."""

    indices: dict[str, torch.Tensor]  # layer -> [d_out, k] int64 on the device
    values: dict[str, torch.Tensor]  # layer -> [capacity, d_out, k]; slot 0 stays zero
    slot_of: OrderedDict[int, int] = field(default_factory=OrderedDict)  # version -> slot, LRU first

    @property
    def capacity(self) -> int:
        return next(iter(self.values.values())).shape[0]


class MixedAdapters:
    def __init__(self, model: nn.Module, device: torch.device):
        self.modules = dict(model.named_modules())
        self.device = device
        # Values are bf16 on disk; float32 on the CPU spares its slow bf16 arithmetic, bf16 on a GPU halves memory.
        self.values_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        self._sets: OrderedDict[str, _IndexSet] = OrderedDict()  # index_hash -> slots, LRU first
        self._bound: list[tuple[_IndexSet, torch.Tensor]] = []  # (index set, slots [B]) of the coming forward
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}  # layer -> its hook

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def bind(self, rows: list[ResidentAdapter | None]) -> None:
        """Make the next forward call add, to batch row b, the delta of adapter rows[b] (None: none)."""
        wanted = {r.version: r for r in rows if r is not None}
        slots: dict[str, list[int]] = {}
        for resident in wanted.values():
            index_hash = resident.adapter.metadata.index_hash
            if index_hash not in self._sets:
                self._sets[index_hash] = self._new_set(resident)
            self._sets.move_to_end(index_hash)
            self._ensure_slot(self._sets[index_hash], resident, keep=wanted.keys())
        self._drop_cold_sets(keep={r.adapter.metadata.index_hash for r in wanted.values()})
        for index_hash, index_set in self._sets.items():
            row_slots = [index_set.slot_of.get(r.version, 0) if r is not None else 0 for r in rows]
            if any(row_slots):
                slots[index_hash] = row_slots
        self._bound = [
            (self._sets[h], torch.tensor(s, dtype=torch.int64, device=self.device)) for h, s in slots.items()
        ]
        for name in {n for s in self._sets.values() for n in s.indices} - self._handles.keys():
            self._handles[name] = self.modules[name].register_forward_hook(self._hook(name))

    def unbind(self) -> None:
        """Leave the mixed path: remove the hooks, so the merged path runs the plain model."""
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}
        self._bound = []

    def resident_bytes(self) -> int:
        return sum(v.nbytes for s in self._sets.values() for v in (*s.values.values(), *s.indices.values()))

    def _hook(self, name: str):
        def add_deltas(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            for index_set, slots in self._bound:
                indices = index_set.indices.get(name)
                if indices is not None:
                    mixed_delta_(output, args[0], indices, index_set.values[name], slots)

        return add_deltas

    def _new_set(self, resident: ResidentAdapter) -> _IndexSet:
        layers = resident.adapter.layers
        return _IndexSet(
            indices={n: d.indices.to(self.device, torch.int64) for n, d in layers.items()},
            values={
                n: torch.zeros(2, *d.values.shape, dtype=self.values_dtype, device=self.device)
                for n, d in layers.items()
            },
        )

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
                for name, stack in index_set.values.items():
                    index_set.values[name] = torch.cat([stack, torch.zeros_like(stack)])
        for name, d in resident.adapter.layers.items():
            index_set.values[name][free].copy_(d.values)
        index_set.slot_of[resident.version] = free
