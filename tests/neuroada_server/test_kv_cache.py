"""KV-cache surgery of a running batch: exact, and all-or-nothing when an allocation fails."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from neuroada_server import kv_cache

LAYERS, HEADS, DIM = 3, 2, 4


def _cache(rows: int, length: int, seed: int) -> DynamicCache:
    g = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for i in range(LAYERS):
        keys, values = (torch.randn(rows, HEADS, length, DIM, generator=g) for _ in range(2))
        cache.update(keys, values, i)
    return cache


def _tensors(cache: DynamicCache) -> list[torch.Tensor]:
    return [t.clone() for pair in kv_cache.snapshot(cache) for t in pair]


def test_join_left_pads_the_shorter_and_select_takes_rows_back_out():
    cache, other = _cache(2, 5, seed=0), _cache(3, 7, seed=1)
    mask, other_mask = torch.ones(2, 5, dtype=torch.long), torch.ones(3, 7, dtype=torch.long)
    before, joined_other = _tensors(cache), _tensors(other)
    mask = kv_cache.join_(cache, mask, other, other_mask)
    assert mask.shape == (5, 7) and mask[:2, :2].sum() == 0 and mask[2:].all()
    part = kv_cache.select(cache, torch.tensor([2, 3, 4]))
    assert all(torch.equal(a, b) for a, b in zip(_tensors(part), joined_other))
    kv_cache.select_(cache, torch.tensor([0, 1]))
    mask = kv_cache.trim_(cache, mask[:2])  # the two padding columns go
    assert mask.shape == (2, 5) and all(torch.equal(a, b) for a, b in zip(_tensors(cache), before))


def test_a_failed_join_leaves_the_cache_as_it_was(monkeypatch):
    cache, other = _cache(2, 5, seed=0), _cache(1, 3, seed=1)
    before = _tensors(cache)
    real_cat, calls = torch.cat, {"n": 0}

    def cat_that_runs_out_of_memory(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the third layer's keys: two layers are joined already
            raise MemoryError("out of memory")
        return real_cat(*args, **kwargs)

    monkeypatch.setattr(torch, "cat", cat_that_runs_out_of_memory)
    with pytest.raises(MemoryError):
        kv_cache.join_(cache, torch.ones(2, 5, dtype=torch.long), other, torch.ones(1, 3, dtype=torch.long))
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(_tensors(cache), before))


def test_set_layers_undoes_a_forward_that_appended_to_some_layers():
    cache = _cache(2, 5, seed=0)
    before, taken = _tensors(cache), kv_cache.snapshot(cache)
    cache.update(torch.zeros(2, HEADS, 1, DIM), torch.zeros(2, HEADS, 1, DIM), 0)  # layer 0 appended, then it raised
    kv_cache.set_layers_(cache, taken)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(cache), before))
