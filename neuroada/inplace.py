"""Whole-model apply / restore of an adapter into the base weights, in place and exactly.

Two forms:
- `apply_adapter_` / `restore_adapter_`: per layer, on any model (used by `neuroada merge`).
- `PackedWeights`: the linear weights of a model re-homed into one flat buffer, so that a whole
  adapter is applied or restored by one kernel launch on CUDA and one index op on the CPU,
  whatever the number of layers. The model's parameters become views of that buffer and the
  model computes exactly as before.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from neuroada import host_memory
from neuroada.errors import TiedWeightError
from neuroada.fingerprint import untied_linear_layers
from neuroada.format import SparseAdapter
from neuroada_kernels import apply_delta_, apply_delta_flat_, flat_offsets, reapply_delta_flat_, restore_, restore_flat_


def apply_adapter_(model: nn.Module, adapter: SparseAdapter) -> dict[str, torch.Tensor]:
    """Merge the adapter into the model's weights; returns the saved originals for restore_adapter_."""
    modules = dict(model.named_modules())
    saved = {}
    for name, d in adapter.layers.items():
        weight = modules[name].weight.data
        saved[name] = torch.empty(d.indices.shape, dtype=weight.dtype, device=weight.device)
        apply_delta_(weight, d.indices.to(weight.device), d.values.to(weight.device), saved[name])
    return saved


def restore_adapter_(model: nn.Module, adapter: SparseAdapter, saved: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, d in adapter.layers.items():
        weight = modules[name].weight.data
        restore_(weight, d.indices.to(weight.device), saved[name])


@dataclass(frozen=True)
class PackedDelta:
    """An adapter laid out for one PackedWeights: flat positions and their deltas."""

    offsets: torch.Tensor  # [n] int64, positions in PackedWeights.buffer
    values: torch.Tensor  # [n] bfloat16


Applied = tuple[PackedDelta, torch.Tensor]  # a delta merged into the buffer, and the originals it saved


class PackedWeights:
    """The model's untied linear weights in one contiguous buffer (one dtype, one device)."""

    def __init__(self, model: nn.Module, device: torch.device | str | None = None):
        """Move the weights into the buffer on `device` (default: where they are) layer by layer,
        releasing each original as it goes: the move peaks at the buffer plus about one layer."""
        # In module order, not `linear_layers`' sorted one: a layer's siblings that read one input
        # (q, k, v; gate, up) then lie back to back, and a decoder may read them as one matrix.
        untied = untied_linear_layers(model)
        layers = {name: untied[name] for name, _ in model.named_modules() if name in untied}
        if not layers:
            raise ValueError("the model has no untied nn.Linear layers to pack")
        dtypes = {m.weight.dtype for m in layers.values()}
        devices = {m.weight.device for m in layers.values()}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(f"linear weights must share one dtype and device, got {dtypes} on {devices}")
        total = sum(m.weight.numel() for m in layers.values())
        source_device, dtype = devices.pop(), dtypes.pop()
        device = torch.device(device or source_device)
        if device.type == "cpu":  # a decode step streams the whole buffer: on huge pages it reads faster
            self.buffer = host_memory.huge_page_empty(total, dtype)  # [N]
        else:
            self.buffer = torch.empty(total, dtype=dtype, device=device)  # [N]
        self.layout: dict[str, tuple[int, int, int]] = {}  # name -> (start, d_out, d_in)
        mappings = host_memory.private_file_mappings() if source_device.type == "cpu" else []
        start = 0
        for name, m in layers.items():
            d_out, d_in = m.weight.shape
            view = self.buffer[start : start + d_out * d_in].view(d_out, d_in)
            original = m.weight.data
            view.copy_(original)
            m.weight = nn.Parameter(view, requires_grad=False)  # a new Parameter: it may be on another device
            self.layout[name] = (start, d_out, d_in)
            start += d_out * d_in
            if source_device.type == "cpu":
                address, nbytes = original.data_ptr(), original.numel() * original.element_size()
                del original
                host_memory.drop_file_pages(address, nbytes, mappings)
                host_memory.trim_heap()

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def holds(self, t: torch.Tensor) -> bool:
        """Whether `t` is (a view of) memory of the buffer."""
        start = self.buffer.data_ptr()
        return t.device == self.device and start <= t.data_ptr() < start + self.buffer.nbytes

    def check_target(self, name: str) -> None:
        """A linear layer of the base (`neuroada.format.check_target`) whose weight is in the buffer."""
        if name not in self.layout:
            raise TiedWeightError(
                f"layer {name}: its weight is tied to another parameter (e.g. lm_head to the input "
                "embedding), so a delta cannot be merged into it alone; train without this target"
            )

    def offsets(self, adapter: SparseAdapter) -> torch.Tensor:  # [n] int64 on self.device
        parts = []
        for name, d in adapter.layers.items():
            self.check_target(name)
            start, _, d_in = self.layout[name]
            parts.append(flat_offsets(d.indices.to(self.device), d_in, start))
        return torch.cat(parts)

    def values(self, adapter: SparseAdapter) -> torch.Tensor:  # [n] bfloat16 on self.device
        return torch.cat([d.values.reshape(-1) for d in adapter.layers.values()]).to(self.device)

    def pack(self, adapter: SparseAdapter, offsets: torch.Tensor | None = None) -> PackedDelta:
        """Lay the adapter out on this buffer; pass `offsets` to share one index set between adapters."""
        return PackedDelta(self.offsets(adapter) if offsets is None else offsets, self.values(adapter))

    def apply_(self, delta: PackedDelta) -> torch.Tensor:  # saved [n], for restore_
        saved = torch.empty(delta.offsets.shape, dtype=self.dtype, device=self.device)
        # Offsets come from `offsets()`, built from indices validated against this base: no range check.
        apply_delta_flat_(self.buffer, delta.offsets, delta.values, saved, check_ranges=False)
        return saved

    def restore_(self, delta: PackedDelta, saved: torch.Tensor) -> None:
        restore_flat_(self.buffer, delta.offsets, saved, check_ranges=False)

    def switch_(self, applied: PackedDelta, new: PackedDelta, saved: torch.Tensor) -> torch.Tensor:
        """Replace the applied delta by `new`; returns the saved originals for the next restore.

        Deltas sharing one offsets tensor (one index set) switch in a single scatter.
        """
        if applied.offsets is new.offsets:
            reapply_delta_flat_(self.buffer, new.offsets, new.values, saved, check_ranges=False)
            return saved
        self.restore_(applied, saved)
        return self.apply_(new)

    def base_values(self, offsets: torch.Tensor, applied: Applied | None = None) -> torch.Tensor:  # [n]
        """The base weights at `offsets` ([n] int64), even while `applied` (a delta and its saved
        originals) is merged in: positions it covers read its saved originals."""
        values = self.buffer[offsets]
        if applied is not None:
            delta, saved = applied
            order = delta.offsets.argsort()
            covered = delta.offsets[order]  # sorted; unique, as every row's indices are
            at = torch.searchsorted(covered, offsets).clamp(max=covered.numel() - 1)
            hit = covered[at] == offsets
            values[hit] = saved[order[at[hit]]]
        return values

    def checksum(
        self,
        lock: contextlib.AbstractContextManager = contextlib.nullcontext(),
        applied: Callable[[], Applied | None] = lambda: None,
        chunk_elems: int = 1 << 24,
    ) -> str:
        """Hash of every base weight bit: equal before and after any apply/restore sequence.

        Reads the buffer a chunk at a time, each under `lock` with the then-`applied()` delta's
        saved originals patched in, so a caller serving from these weights holds the lock for one
        chunk's copy at a time and never needs to restore the base first.
        """
        h = hashlib.sha256()
        for chunk in self._base_chunks(lock, applied, chunk_elems):
            h.update(chunk.view(torch.uint8).numpy())
        return "sha256:" + h.hexdigest()

    def _base_chunks(self, lock, applied, chunk_elems: int) -> Iterator[torch.Tensor]:
        for start in range(0, self.buffer.numel(), chunk_elems):
            end = min(start + chunk_elems, self.buffer.numel())
            with lock:
                chunk = self.buffer[start:end].detach().to("cpu", copy=True)  # [end - start]
                current = applied()
                if current is not None:
                    delta, saved = current
                    inside = (delta.offsets >= start) & (delta.offsets < end)
                    chunk[(delta.offsets[inside] - start).cpu()] = saved[inside].cpu()
            yield chunk
