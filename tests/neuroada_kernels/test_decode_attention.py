"""A decode step's attention: the C++ pass against its torch twin, the cache writes, refusals."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from neuroada_kernels import cpu_kernels, decode_attention, triton_available
from neuroada_kernels.decode_attention import decode_attention_ref, decode_attention_triton, triton_fits

attention_module = importlib.import_module("neuroada_kernels.decode_attention")  # the package's name is the function
needs_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="the C++ CPU kernels could not be built here")


def case(B: int, heads: int, kv_heads: int, head_dim: int, positions: list[int], slots: int = 8, capacity: int = 64):
    g = torch.Generator().manual_seed(B * 100 + heads * 10 + head_dim)
    q = torch.randn(B, heads, head_dim, generator=g)
    k, v = torch.randn(2, B, kv_heads, head_dim, generator=g)
    angles = torch.randn(B, head_dim // 2, generator=g).repeat(1, 2)  # rotary's halves share angles
    keys, values = torch.randn(2, slots, kv_heads, capacity, head_dim, generator=g)
    return q, k, v, angles.cos(), angles.sin(), keys, values, torch.tensor(positions)


@needs_kernels
@pytest.mark.parametrize("B,positions", [(1, [0]), (1, [37]), (3, [5, 0, 20]), (4, [63, 1, 9, 30])])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 6)])
def test_the_kernel_equals_the_torch_twin(B, positions, heads, kv_heads, head_dim):
    q, k, v, cos, sin, keys, values, at = case(B, heads, kv_heads, head_dim, positions)
    first = 2
    keys_ref, values_ref = keys.clone(), values.clone()
    out = cpu_kernels().decode_attention(q, k, v, cos, sin, keys, values, first, at, 0.125)
    expected = decode_attention_ref(q, k, v, cos, sin, keys_ref, values_ref, first, at, 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, keys_ref, rtol=1e-6, atol=1e-6)  # the rotated keys, where the twin put them
    torch.testing.assert_close(values, values_ref, rtol=0, atol=0)


@needs_kernels
def test_the_kernel_writes_only_each_rows_new_position():
    q, k, v, cos, sin, keys, values, at = case(2, 4, 2, 8, [3, 10])
    before_keys, before_values = keys.clone(), values.clone()
    cpu_kernels().decode_attention(q, k, v, cos, sin, keys, values, 5, at, 1.0)
    changed = (keys != before_keys).any(-1) | (values != before_values).any(-1)  # [slots, kv, capacity]
    expected = torch.zeros_like(changed)
    expected[5, :, 3] = expected[6, :, 10] = True
    assert torch.equal(changed, expected)


@needs_kernels
def test_the_kernel_never_reads_past_a_rows_position():
    q, k, v, cos, sin, keys, values, at = case(2, 4, 2, 8, [3, 10])
    clean = cpu_kernels().decode_attention(q, k, v, cos, sin, keys.clone(), values.clone(), 0, at, 1.0)
    keys[0, :, 4:], values[0, :, 4:] = float("nan"), float("nan")  # what a failed request may leave
    out = cpu_kernels().decode_attention(q, k, v, cos, sin, keys, values, 0, at, 1.0)
    assert torch.equal(out, clean)


@needs_kernels
@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(first=7), "outside the cache"),
        (lambda a: a.update(positions=torch.tensor([3, 64])), "capacity"),
        (lambda a: a.update(positions=torch.tensor([3, 1], dtype=torch.int32)), "int64"),
        (lambda a: a.update(k=a["k"][:, :1].contiguous(), v=a["v"][:, :1].contiguous()), "keys and values"),
        (lambda a: a.update(cos=a["cos"][:, :4].contiguous()), "cos"),
    ],
)
def test_the_kernel_refuses_inconsistent_arguments(change, message):
    q, k, v, cos, sin, keys, values, at = case(2, 4, 2, 8, [3, 10])
    args = dict(q=q, k=k, v=v, cos=cos, sin=sin, keys=keys, values=values, first=0, positions=at, scale=1.0)
    change(args)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels().decode_attention(*args.values())


def test_other_dtypes_run_the_twin():
    q, k, v, cos, sin, keys, values, at = case(2, 4, 2, 8, [3, 10])
    expected = decode_attention_ref(q, k, v, cos, sin, keys.clone(), values.clone(), 0, at, 0.5)
    bf16 = [t.bfloat16() for t in (q, k, v, cos, sin, keys, values)]
    out = decode_attention(*bf16[:5], bf16[5], bf16[6], 0, at, 0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("extra", [0, 7])
def test_the_twin_given_the_length_on_the_host_equals_reading_it_from_the_positions(extra):
    """A caller that knows the longest row's length passes it (no device read); longer still masks."""
    q, k, v, cos, sin, keys, values, at = case(3, 4, 2, 8, [5, 0, 20], capacity=40)
    found = decode_attention_ref(q, k, v, cos, sin, keys.clone(), values.clone(), 1, at, 0.5)
    doubles = [t.double() for t in (q, k, v, cos, sin, keys, values)]  # float64: the twin, not the kernel
    given = decode_attention(*doubles, 1, at, 0.5, length=21 + extra)
    torch.testing.assert_close(given.float(), found, rtol=1e-5, atol=1e-5)


needs_triton = pytest.mark.skipif(not triton_available(), reason="no triton")


@needs_triton
@pytest.mark.parametrize("B,positions", [(1, [0]), (1, [37]), (3, [5, 0, 20]), (4, [63, 1, 9, 16])])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_kernel_equals_the_torch_twin(B, positions, heads, kv_heads, head_dim, dtype):
    tensors = case(B, heads, kv_heads, head_dim, positions)
    q, k, v, cos, sin, keys, values, at = (t.to(dtype) if t.is_floating_point() else t for t in tensors)
    before, keys_ref, values_ref = keys.clone(), keys.clone(), values.clone()
    out = decode_attention_triton(q, k, v, cos, sin, keys, values, 2, at, 0.125)
    expected = decode_attention_ref(q, k, v, cos, sin, keys_ref, values_ref, 2, at, 0.125)
    # The kernel rotates and sums in float32; the twin rounds each of its ops to bf16.
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(keys, keys_ref, rtol=tolerance, atol=tolerance)  # rotated, where the twin put them
    torch.testing.assert_close(values, values_ref, rtol=0, atol=0)
    written = torch.zeros(keys.shape[:3], dtype=torch.bool)  # [slots, kv_heads, capacity]
    written[torch.arange(2, 2 + B), :, at] = True
    assert torch.equal((keys != before).any(-1), written)  # each row's new position, nothing else


@needs_triton
def test_the_triton_kernel_never_reads_past_a_rows_position():
    q, k, v, cos, sin, keys, values, at = case(2, 4, 2, 8, [3, 10])
    clean = decode_attention_triton(q, k, v, cos, sin, keys.clone(), values.clone(), 0, at, 1.0)
    keys[0, :, 4:], values[0, :, 4:] = float("nan"), float("nan")  # what a failed request may leave
    assert torch.equal(decode_attention_triton(q, k, v, cos, sin, keys, values, 0, at, 1.0), clean)


@needs_triton
@torch.inference_mode()
def test_inside_a_compiled_graph_the_triton_kernel_is_one_node_writing_the_cache_as_eager(monkeypatch):
    """On CUDA a compiled step's attention is the kernel as a registered op, not the twin (which
    would read every row's whole capacity): here on CPU tensors through Triton's interpreter."""
    q, k, v, cos, sin, keys, values, at = case(3, 8, 2, 8, [5, 0, 20])
    keys_eager, values_eager = keys.clone(), values.clone()
    expected = decode_attention_triton(q, k, v, cos, sin, keys_eager, values_eager, 1, at, 0.5)
    monkeypatch.setattr(attention_module, "use_triton", lambda t: True)  # as on CUDA tensors
    graphs = []

    def backend(graph, example_inputs):  # keeps the graph; aot_eager functionalizes the cache writes as inductor does
        graphs.append(graph)
        return lookup_backend("aot_eager")(graph, example_inputs)

    step = torch.compile(decode_attention, backend=backend, fullgraph=True)
    out = step(q, k, v, cos, sin, keys, values, 1, at, 0.5)
    assert torch.equal(out, expected) and torch.equal(keys, keys_eager) and torch.equal(values, values_eager)
    [graph] = graphs
    ops = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    assert ops == [torch.ops.neuroada.decode_attention]  # the whole call, one node


def test_the_triton_kernel_takes_what_its_layout_allows():
    q, k, _, _, _, keys, values, _ = case(2, 4, 2, 8, [3, 10])
    assert triton_fits(q, k, keys, values)
    q6, k6, _, _, _, keys6, values6, _ = case(2, 4, 2, 6, [3, 10])  # half a head is 3: no power of two
    assert not triton_fits(q6, k6, keys6, values6)
    assert not triton_fits(q, k, keys.transpose(2, 3), values)
