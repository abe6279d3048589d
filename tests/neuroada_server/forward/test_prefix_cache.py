"""The prefix cache's blocks: found by key and tokens, kept under a byte budget, leaves evicted first."""

from __future__ import annotations

import torch

from neuroada_server.forward.prefix_cache import BLOCK, PrefixCache

SHAPE = (2, 3, 2, BLOCK, 4)  # [keys/values, layers, kv_heads, BLOCK, head_dim] of one block
BLOCK_BYTES = torch.empty(SHAPE).nbytes
BASE = ("base",)


def kv_for(prompt: list[int], start: int = 0) -> torch.Tensor:
    """Stand-in keys and values for the prompt's tokens from `start` on: each position's value is
    its token, so a block read back shows which tokens it was stored for."""
    tokens = torch.tensor(prompt[start:], dtype=torch.float32)
    return tokens[None, None, None, :, None].expand(2, 3, 2, len(tokens), 4).contiguous()


def stored(cache: PrefixCache, key, prompt: list[int]) -> int:
    """How many of the prompt's tokens are cached: the chain `match` finds, checked to be theirs."""
    chain = cache.match(key, prompt)
    if chain:
        kv = PrefixCache.gather(chain)
        assert torch.equal(kv, kv_for(prompt[: len(chain) * BLOCK]))
    return len(chain) * BLOCK


def put(cache: PrefixCache, key, prompt: list[int]) -> list[tuple[int, int]]:
    """Store the prompt's blocks; the token ranges whose keys and values the cache read."""
    reads = []

    def kv(start: int, stop: int) -> torch.Tensor:
        reads.append((start, stop))
        return kv_for(prompt[:stop], start)

    cache.insert(key, prompt, kv)
    return reads


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(1, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_prompt_finds_its_full_blocks_and_leaves_its_last_token_to_compute():
    cache = PrefixCache(budget_bytes=100 * BLOCK_BYTES)
    prompt = tokens(0, 3 * BLOCK + 5)
    assert stored(cache, BASE, prompt) == 0
    put(cache, BASE, prompt)
    assert len(cache) == 3
    assert stored(cache, BASE, prompt) == 3 * BLOCK
    assert stored(cache, BASE, prompt[: 3 * BLOCK]) == 2 * BLOCK  # the last token is never served cached
    assert stored(cache, BASE, prompt[: 3 * BLOCK + 1]) == 3 * BLOCK
    assert stored(cache, BASE, prompt[: BLOCK - 1]) == 0
    longer = prompt + tokens(1, 40)
    assert stored(cache, BASE, longer) == 3 * BLOCK
    assert put(cache, BASE, longer) == [(3 * BLOCK, 5 * BLOCK)]  # reads only the blocks past the three it found
    assert len(cache) == 5
    assert stored(cache, BASE, longer) == 5 * BLOCK


def test_a_differing_token_ends_the_match_at_its_block():
    cache = PrefixCache(budget_bytes=100 * BLOCK_BYTES)
    prompt = tokens(0, 4 * BLOCK)
    put(cache, BASE, prompt)
    changed = list(prompt)
    changed[BLOCK + 7] += 1
    assert stored(cache, BASE, changed) == BLOCK
    changed[0] += 1
    assert stored(cache, BASE, changed) == 0


def test_one_keys_blocks_never_serve_another_key():
    cache = PrefixCache(budget_bytes=100 * BLOCK_BYTES)
    prompt = tokens(0, 3 * BLOCK)
    put(cache, ("adapter", "a", 1), prompt)
    assert stored(cache, ("adapter", "a", 1), prompt) == 2 * BLOCK
    for other in (BASE, ("adapter", "b", 2), ("adapter", "a", 2)):  # the base, another adapter, a new version
        assert stored(cache, other, prompt) == 0


def test_non_finite_keys_or_values_are_not_kept():
    cache = PrefixCache(budget_bytes=100 * BLOCK_BYTES)
    prompt = tokens(0, 3 * BLOCK + 1)
    kv = kv_for(prompt)
    kv[1, 2, 0, BLOCK + 3, 1] = float("nan")  # in the second block's values
    cache.insert(BASE, prompt, lambda start, stop: kv[:, :, :, start:stop])
    assert len(cache) == 1  # the first block; nothing from the poisoned one on
    assert stored(cache, BASE, prompt) == BLOCK


def test_the_budget_holds_and_the_least_recently_used_prefix_leaves_first():
    cache = PrefixCache(budget_bytes=6 * BLOCK_BYTES)
    a, b, c = tokens(1, 2 * BLOCK + 1), tokens(2, 2 * BLOCK + 1), tokens(3, 2 * BLOCK + 1)
    put(cache, BASE, a)
    put(cache, BASE, b)
    put(cache, BASE, c)  # six blocks: full
    assert cache.bytes == 6 * BLOCK_BYTES
    assert stored(cache, BASE, a) == 2 * BLOCK  # a is now the most recently used
    d = tokens(4, 2 * BLOCK + 1)
    put(cache, BASE, d)  # evicts b, the least recently used: its second block, then its first
    assert cache.bytes <= cache.budget_bytes
    assert [stored(cache, BASE, p) for p in (a, b, c, d)] == [2 * BLOCK, 0, 2 * BLOCK, 2 * BLOCK]


def test_a_block_leaves_only_after_the_blocks_that_extend_it():
    cache = PrefixCache(budget_bytes=3 * BLOCK_BYTES)
    shared = tokens(0, BLOCK)
    x, y = shared + tokens(1, BLOCK + 1), shared + tokens(2, BLOCK + 1)
    put(cache, BASE, x)
    put(cache, BASE, y)  # the shared block and one block each
    assert len(cache) == 3
    put(cache, BASE, tokens(3, BLOCK + 1))  # one block of room needed: x's own block leaves, not the shared one
    assert stored(cache, BASE, y) == 2 * BLOCK
    assert stored(cache, BASE, x) == BLOCK


def test_a_prompt_longer_than_the_budget_keeps_what_fits_and_evicts_none_of_its_own_chain():
    cache = PrefixCache(budget_bytes=2 * BLOCK_BYTES)
    prompt = tokens(0, 5 * BLOCK + 1)
    put(cache, BASE, prompt)
    assert cache.bytes == 2 * BLOCK_BYTES
    assert stored(cache, BASE, prompt) == 2 * BLOCK  # its first two blocks: a chain from the start
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0
    assert stored(cache, BASE, prompt) == 0


def test_blocks_evicted_after_a_prompt_found_them_are_stored_again_with_the_blocks_past_them():
    cache = PrefixCache(budget_bytes=4 * BLOCK_BYTES)
    prompt, other = tokens(0, 3 * BLOCK + 1), tokens(1, 4 * BLOCK + 1)
    put(cache, BASE, prompt)
    assert len(cache.match(BASE, prompt)) == 3  # found: its prefill would start past them
    put(cache, BASE, other)  # another prompt of the same prefill needs the whole budget
    assert stored(cache, BASE, prompt) == 0
    longer = prompt[: 3 * BLOCK] + tokens(2, BLOCK + 1)
    assert put(cache, BASE, longer) == [(0, 4 * BLOCK)]  # its slot holds every block: all four stored
    assert stored(cache, BASE, longer) == 4 * BLOCK
    assert len(cache) == 4 and cache.bytes == 4 * BLOCK_BYTES


def test_hidden_states_are_kept_with_their_blocks_and_only_chains_that_hold_them_serve_every_position():
    cache, prompt = PrefixCache(10 * BLOCK_BYTES), tokens(9, 3 * BLOCK + 1)
    states = torch.arange(len(prompt), dtype=torch.float32)[:, None].expand(-1, 5)  # [S, hidden]: its position
    put(cache, BASE, prompt[: 2 * BLOCK])  # two blocks, no hidden states
    assert cache.match(BASE, prompt, with_hidden=True) == [] and stored(cache, BASE, prompt) == 2 * BLOCK
    before = cache.bytes
    # The states of positions from BLOCK on only: the first block stays without, the second takes its.
    cache.insert(
        BASE, prompt, lambda start, stop: kv_for(prompt[:stop], start), lambda a, b: states[a:b] if a >= BLOCK else None
    )
    assert cache.match(BASE, prompt, with_hidden=True) == []  # its first block has none
    assert (
        cache.bytes == before + 2 * states[:BLOCK].nbytes + BLOCK_BYTES
    )  # the second's states, a third block with its
    cache.insert(BASE, prompt, lambda start, stop: kv_for(prompt[:stop], start), lambda a, b: states[a:b])
    chain = cache.match(BASE, prompt, with_hidden=True)
    assert len(chain) == 3 and torch.equal(PrefixCache.gather_hidden(chain), states[: 3 * BLOCK])
    nan = states.clone().fill_(float("nan"))
    other = PrefixCache(10 * BLOCK_BYTES)
    other.insert(BASE, prompt, lambda start, stop: kv_for(prompt[:stop], start), lambda a, b: nan[a:b])
    assert len(other.match(BASE, prompt)) == 3 and other.match(BASE, prompt, with_hidden=True) == []  # not kept
