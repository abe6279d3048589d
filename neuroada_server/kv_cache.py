"""Hugging Face's dynamic KV cache for a running batch (`neuroada_server.forward.hf`): joining, selecting
and trimming it, and undoing a failed step.

Rows are left-padded: every row's last token sits in the last column, and the attention mask
marks each row's padding. Keys are stored after rotary embedding with explicit position ids, so
padding columns can be added to or cut from the left without changing any row's attention.

Every function here builds all of its new tensors before it assigns any: if one allocation
fails, the cache is left exactly as it was. A forward appends to each layer by concatenation
(new tensors), so the layers' tensors taken before it (`snapshot`) are the cache before it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

Snapshot = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values), each [B, H, L, D]


def _layers(cache: DynamicCache) -> list:
    layers = cache.layers
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError("continuous batching needs full-attention KV caches (no sliding window)")
    return layers


def snapshot(cache: DynamicCache) -> Snapshot:
    """The layers' tensors now; `set_layers_(cache, snapshot)` undoes a forward that failed after it."""
    return [(layer.keys, layer.values) for layer in _layers(cache)]


def set_layers_(cache: DynamicCache, tensors: Snapshot) -> None:
    for layer, (keys, values) in zip(_layers(cache), tensors, strict=True):
        layer.keys, layer.values = keys, values


def join_(cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` (in place), left-padding the shorter; returns the joined mask."""
    length, other_length = mask.shape[1], other_mask.shape[1]
    width = max(length, other_length)
    joined = [
        (
            torch.cat([_pad_left(layer.keys, width), _pad_left(new.keys, width)]),
            torch.cat([_pad_left(layer.values, width), _pad_left(new.values, width)]),
        )
        for layer, new in zip(_layers(cache), _layers(other), strict=True)
    ]
    joined_mask = torch.cat([F.pad(mask, (width - length, 0)), F.pad(other_mask, (width - other_length, 0))])
    set_layers_(cache, joined)
    return joined_mask


def select_(cache: DynamicCache, rows: torch.Tensor) -> None:
    """Keep only `rows` ([n] int64), in that order, in place."""
    set_layers_(cache, [(layer.keys[rows], layer.values[rows]) for layer in _layers(cache)])


def select(cache: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A new cache holding only `rows` ([n] int64), in that order; `cache` itself is unchanged."""
    picked = DynamicCache()
    for layer in _layers(cache):
        picked.update(layer.keys[rows], layer.values[rows], len(picked.layers))
    return picked


def trim_(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row (after long rows left); returns the mask."""
    used = mask.any(0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    if start == 0:
        return mask
    set_layers_(cache, [(layer.keys[..., start:, :], layer.values[..., start:, :]) for layer in _layers(cache)])
    return mask[:, start:]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:  # [B, H, L, D] -> [B, H, width, D]
    return t if t.shape[-2] == width else F.pad(t, (0, 0, width - t.shape[-2], 0))
