"""Joining and trimming the KV cache of a running batch.

Rows are left-padded: every row's last token sits in the last column, and the attention mask
marks each row's padding. Keys are stored after rotary embedding with explicit position ids, so
padding columns can be added to or cut from the left without changing any row's attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _layers(cache: DynamicCache) -> list:
    layers = cache.layers
    for layer in layers:
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError("continuous batching needs full-attention KV caches (no sliding window)")
    return layers


def join_(cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` (in place), left-padding the shorter; returns the joined mask."""
    length, other_length = mask.shape[1], other_mask.shape[1]
    width = max(length, other_length)
    for layer, new in zip(_layers(cache), _layers(other), strict=True):
        layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(new.keys, width)])
        layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(new.values, width)])
    return torch.cat([F.pad(mask, (width - length, 0)), F.pad(other_mask, (width - other_length, 0))])


def trim_(cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
    """Drop leading columns that are padding in every row (after long rows left); returns the mask."""
    used = mask.any(0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    if start == 0:
        return mask
    for layer in _layers(cache):
        layer.keys = layer.keys[..., start:, :]
        layer.values = layer.values[..., start:, :]
    return mask[:, start:]


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:  # [B, H, L, D] -> [B, H, width, D]
    return t if t.shape[-2] == width else F.pad(t, (0, 0, width - t.shape[-2], 0))
