"""Every layer of a decode step in one C++ call: the per-kernel calls it replaces, to the bit; refusals."""

from __future__ import annotations

import pytest
import torch

from neuroada_kernels import (
    add_mixed_delta_,
    cpu_kernels,
    decode_attention,
    decode_layers,
    gated_silu,
    linear,
    rms_norm,
)
from neuroada_kernels.decode_layers import PROJECTIONS

needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="the C++ CPU kernels could not be built here")
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 48, 6, 2, 8, 80, 3
SCALE, EPS = HEAD_DIM**-0.5, 1e-5


def model_case(B: int, weight_dtype: torch.dtype, slots: int = 8, capacity: int = 64):
    g = torch.Generator().manual_seed(B)

    def weights(rows: int, cols: int) -> list[torch.Tensor]:
        return [(torch.randn(rows, cols, generator=g) / cols**0.5).to(weight_dtype) for _ in range(LAYERS)]

    norms = [[1 + 0.1 * torch.randn(HIDDEN, generator=g) for _ in range(LAYERS)] for _ in range(2)]
    qkv = weights((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
    layers = (norms[0], qkv, weights(HIDDEN, HEADS * HEAD_DIM), norms[1])
    layers += (weights(INTER, HIDDEN), weights(INTER, HIDDEN), weights(HIDDEN, INTER))
    caches = [torch.randn(LAYERS, slots, KV_HEADS, capacity, HEAD_DIM, generator=g) for _ in range(2)]
    angles = torch.randn(B, HEAD_DIM // 2, generator=g).repeat(1, 2)
    x = torch.randn(B, HIDDEN, generator=g)
    positions = torch.randint(0, capacity, (B,), generator=g)
    return x, layers, caches, angles.cos(), angles.sin(), positions


def layer_by_layer(x, layers, keys, values, cos, sin, positions, first):
    """The kernels one call at a time, as our decoder's Python loop makes them."""
    B = x.shape[0]
    for norm, qkv, o, post_norm, gate, up, down, k_cache, v_cache in zip(*layers, keys, values, strict=True):
        widths = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
        q, k, v = linear(rms_norm(x, norm, EPS), qkv).split(widths, -1)
        shape = (B, -1, HEAD_DIM)
        attended = decode_attention(
            q.reshape(shape), k.reshape(shape), v.reshape(shape), cos, sin, k_cache, v_cache, first, positions, SCALE
        )
        x = x + linear(attended.reshape(B, -1), o)
        x = x + linear(gated_silu(rms_norm(x, post_norm, EPS), gate, up), down)
    return x


@needs_kernels
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_one_call_equals_the_kernels_called_layer_by_layer(B, weight_dtype):
    x, layers, (keys, values), cos, sin, positions = model_case(B, weight_dtype)
    first = 8 - B  # the rows' slots end the cache
    keys_ref, values_ref = list(keys.clone()), list(values.clone())
    slots = torch.arange(first, first + B)
    out = decode_layers(x, *layers, list(keys), list(values), cos, sin, slots, positions, HEADS, KV_HEADS, SCALE, EPS)
    expected = layer_by_layer(x, layers, keys_ref, values_ref, cos, sin, positions, first)
    assert torch.equal(out, expected)
    assert torch.equal(keys, torch.stack(keys_ref)) and torch.equal(values, torch.stack(values_ref))


@needs_kernels
def test_a_missing_layer_is_refused():
    x, layers, (keys, values), cos, sin, positions = model_case(2, torch.float32)
    short = (layers[0][:2],) + layers[1:]
    with pytest.raises(RuntimeError, match="per layer"):
        decode_layers(
            x, *short, list(keys), list(values), cos, sin, torch.arange(2), positions, HEADS, KV_HEADS, SCALE, EPS
        )


@needs_kernels
def test_a_prefills_tokens_as_rows_of_their_slots_equal_them_decoded_one_at_a_time():
    """Rows may share a slot: a prefill's tokens, each at its own position past the slot's cached
    prefix, each attending to the prefix and the tokens before it. Decoding them one by one (each a
    call of one row, its keys written before the next) computes the same, to the bit."""
    tokens = 7
    x, layers, (keys, values), cos, sin, _ = model_case(tokens, torch.float32)  # the random cache: the prefixes
    slots = torch.tensor([3, 3, 3, 3, 6, 6, 6])  # 4 tokens past slot 3's prefix, 3 of a fresh prompt in slot 6
    positions = torch.tensor([5, 6, 7, 8, 0, 1, 2])
    keys_ref, values_ref = list(keys.clone()), list(values.clone())
    out = decode_layers(x, *layers, list(keys), list(values), cos, sin, slots, positions, HEADS, KV_HEADS, SCALE, EPS)
    one_by_one = [
        decode_layers(
            x[r : r + 1],
            *layers,
            keys_ref,
            values_ref,
            cos[r : r + 1],
            sin[r : r + 1],
            slots[r : r + 1],
            positions[r : r + 1],
            HEADS,
            KV_HEADS,
            SCALE,
            EPS,
        )
        for r in range(tokens)
    ]
    assert torch.equal(out, torch.cat(one_by_one))
    assert torch.equal(keys, torch.stack(keys_ref)) and torch.equal(values, torch.stack(values_ref))


@needs_kernels
def test_a_slot_outside_the_cache_is_refused():
    x, layers, (keys, values), cos, sin, positions = model_case(2, torch.float32)
    with pytest.raises(RuntimeError, match="slot is outside the cache"):
        decode_layers(
            x, *layers, list(keys), list(values), cos, sin, torch.tensor([0, 8]), positions, HEADS, KV_HEADS, SCALE, EPS
        )


@needs_kernels
@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])
def test_deltas_added_inside_the_one_call_equal_the_kernels_then_the_deltas(values_dtype):
    """Each thread adds the deltas of the outputs it computed: with k and v starting mid-vector (q is
    120 wide) and several threads over a wide input, thread boundaries cut the projections' vectors,
    and every sum must still be mixed_delta_add_'s, to the bit."""
    heads, kv_heads, head_dim, hidden, inter, slots_n = 5, 1, 24, 2048, 200, 4
    g = torch.Generator().manual_seed(0)
    widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim, hidden, inter, inter, hidden]
    ins = [hidden, hidden, hidden, heads * head_dim, hidden, hidden, inter]
    w = {n: torch.randn(o, i, generator=g) / i**0.5 for n, o, i in zip(PROJECTIONS, widths, ins)}
    B = 3
    rows = torch.tensor([2, 0, 1])  # a row without an adapter
    deltas = []
    for n, o, i in zip(PROJECTIONS, widths, ins):
        if n == "up":
            deltas.append(None)  # its own forward: gate wrapped alone
            continue
        bound = []
        for k in (1, 5) if n in ("k", "down") else (3,):  # two index sets on k and down
            indices = torch.randint(0, i, (k, o), generator=g, dtype=torch.int32)
            values = (torch.randn(slots_n, k, o, generator=g) * 0.1).to(values_dtype)
            values[0] = 0
            bound.append((indices, values, rows))
        deltas.append(bound)
    norms = [1 + 0.1 * torch.randn(hidden, generator=g) for _ in range(2)]
    qkv = torch.cat([w["q"], w["k"], w["v"]])
    keys, values_cache = torch.zeros(1, 4, kv_heads, 16, head_dim), torch.zeros(1, 4, kv_heads, 16, head_dim)
    angles = torch.randn(B, head_dim // 2, generator=g).repeat(1, 2)
    cos, sin, positions, slots = angles.cos(), angles.sin(), torch.tensor([3, 5, 0]), torch.tensor([0, 1, 2])
    x = torch.randn(B, hidden, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        layer = ([norms[0]], [qkv], [w["o"]], [norms[1]], [w["gate"]], [w["up"]], [w["down"]])
        out = decode_layers(
            x,
            *layer,
            [keys[0].clone()],
            [values_cache[0].clone()],
            cos,
            sin,
            slots,
            positions,
            heads,
            kv_heads,
            head_dim**-0.5,
            EPS,
            [deltas],
        )

        def added(y: torch.Tensor, inp: torch.Tensor, name: str) -> torch.Tensor:
            for indices, vals, r in deltas[PROJECTIONS.index(name)] or []:
                add_mixed_delta_(y, inp, indices, vals, r, check_ranges=False)
            return y

        normed = rms_norm(x, norms[0], EPS)
        q, k, v = (added(linear(normed, w[n]), normed, n) for n in "qkv")
        shape = (B, -1, head_dim)
        attended = decode_attention(
            q.reshape(shape),
            k.reshape(shape),
            v.reshape(shape),
            cos,
            sin,
            keys[0],
            values_cache[0],
            0,
            positions,
            head_dim**-0.5,
        ).reshape(B, -1)
        h = x + added(linear(attended, w["o"]), attended, "o")
        post = rms_norm(h, norms[1], EPS)
        gated = torch.nn.functional.silu(added(linear(post, w["gate"]), post, "gate")) * linear(post, w["up"])
        expected = h + added(linear(gated, w["down"]), gated, "down")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, expected)
