import pytest
import torch

from neuroada_kernels import sparse_delta, triton_available
from neuroada_kernels.cpu import cpu_kernels

BACKENDS = [
    "torch",
    "csr",
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton")),
]


def dense_reference(x, indices, values, d_in):
    """(P * Theta) x with a dense mask: the definition the sparse op must equal."""
    theta = torch.zeros(indices.shape[0], d_in, dtype=values.dtype).scatter(1, indices, values)
    return x @ theta.t()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("lead_shape", [(7,), (2, 9), (5, 14)])  # 70 tokens: several C++ tiles, with a tail
def test_forward_and_both_gradients_equal_the_dense_reference(backend, k, lead_shape):
    d_in, d_out = 40, 70
    g = torch.Generator().manual_seed(k)
    indices = torch.rand(d_out, d_in, generator=g).argsort(dim=1)[:, :k]
    x = torch.randn(*lead_shape, d_in, generator=g, requires_grad=True)
    values = torch.randn(d_out, k, generator=g, requires_grad=True)
    grad_y = torch.randn(*lead_shape, d_out, generator=g)

    y = sparse_delta(x, indices, values, backend=backend)
    y.backward(grad_y)
    x_ref = x.detach().clone().requires_grad_()
    v_ref = values.detach().clone().requires_grad_()
    y_ref = dense_reference(x_ref, indices, v_ref, d_in)
    y_ref.backward(grad_y)

    assert y.shape == (*lead_shape, d_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad, v_ref.grad, rtol=1e-5, atol=1e-5)


def test_autograd_saves_only_x_indices_and_values():
    d_in, d_out, k = 32, 48, 8
    x = torch.randn(4, 16, d_in, requires_grad=True)
    indices = torch.rand(d_out, d_in).argsort(dim=1)[:, :k]
    values = torch.zeros(d_out, k, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        sparse_delta(x, indices, values).sum().backward()
    # Nothing of shape [tokens, d_out, k] (or any dense [d_out, d_in]) is kept for backward.
    assert sorted(saved) == sorted([torch.Size([64, d_in]), torch.Size([d_out, k]), torch.Size([d_out, k])])


def test_bf16_input_gives_bf16_output_with_float32_accumulation():
    d_in, d_out, k = 64, 16, 64
    x = torch.randn(3, d_in).to(torch.bfloat16)
    indices = torch.arange(d_in).repeat(d_out, 1)
    values = torch.randn(d_out, k)
    y = sparse_delta(x, indices, values)
    assert y.dtype == torch.bfloat16
    expected = (x.float() @ values.t()).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="d_out, k"):
        sparse_delta(torch.randn(2, 8), torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="int32 or int64"):
        sparse_delta(torch.randn(2, 8), torch.zeros(4, 2, dtype=torch.int16), torch.zeros(4, 2))


def test_csr_layout_handles_unsorted_rows_and_is_reusable():
    from neuroada_kernels.sparse_csr import csr_layout

    d_in, d_out, k = 24, 10, 4
    indices = torch.rand(d_out, d_in).argsort(dim=1)[:, :k].contiguous()  # rows not sorted
    layout = csr_layout(indices, d_in)
    for seed in range(2):
        x = torch.randn(6, d_in, requires_grad=True)
        values = torch.randn(d_out, k, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        y = sparse_delta(x, indices, values, backend="csr", layout=layout)
        y.sum().backward()
        x_ref, v_ref = x.detach().clone().requires_grad_(), values.detach().clone().requires_grad_()
        dense_reference(x_ref, indices, v_ref, d_in).sum().backward()
        torch.testing.assert_close(y, dense_reference(x, indices, values, d_in), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values.grad, v_ref.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_cpu_kernels_are_built_here_and_chosen_by_auto():
    # CI's machines have a compiler: a build failure must fail here, not fall back silently.
    assert cpu_kernels() is not None
    x = torch.randn(40, 24)
    indices = torch.randint(0, 24, (16, 3))
    values = torch.randn(16, 3)
    assert torch.equal(sparse_delta(x, indices, values), sparse_delta(x, indices, values, backend="cpu"))


def test_cpu_kernels_take_int32_indices_and_refuse_out_of_range_ones():
    x = torch.randn(33, 24, requires_grad=True)
    indices = torch.randint(0, 24, (16, 3))
    values = torch.randn(16, 3, requires_grad=True)
    y64 = sparse_delta(x, indices, values, backend="cpu")
    y32 = sparse_delta(x, indices.int(), values, backend="cpu")
    torch.testing.assert_close(y32, y64, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 24\)"):
        sparse_delta(x, torch.full((16, 3), 24), values, backend="cpu")


def test_without_the_cpu_kernels_auto_uses_the_torch_path(monkeypatch):
    x = torch.randn(9, 24)
    indices = torch.randint(0, 24, (16, 5))
    values = torch.randn(16, 5)
    fast = sparse_delta(x, indices, values)
    monkeypatch.setenv("NEUROADA_CPU_KERNELS", "0")
    cpu_kernels.cache_clear()
    try:
        assert cpu_kernels() is None
        torch.testing.assert_close(sparse_delta(x, indices, values), fast, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="C\\+\\+ kernels are unavailable"):
            sparse_delta(x, indices, values, backend="cpu")
    finally:
        monkeypatch.delenv("NEUROADA_CPU_KERNELS")
        cpu_kernels.cache_clear()


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("k", [1, 6])
def test_sparse_linear_equals_the_dense_bypassed_layer_with_gradients(with_bias, k):
    from neuroada_kernels import sparse_linear

    d_in, d_out = 40, 72
    g = torch.Generator().manual_seed(k)
    weight = torch.randn(d_out, d_in, generator=g)
    bias = torch.randn(d_out, generator=g) if with_bias else None
    indices = torch.rand(d_out, d_in, generator=g).argsort(dim=1)[:, :k]
    x = torch.randn(3, 25, d_in, generator=g, requires_grad=True)  # 75 tokens: several C++ tiles
    values = torch.randn(d_out, k, generator=g, requires_grad=True)
    grad_y = torch.randn(3, 25, d_out, generator=g)
    weight_before = weight.clone()

    y = sparse_linear(x, weight, bias, indices, values)
    y.backward(grad_y)
    x_ref, v_ref = x.detach().clone().requires_grad_(), values.detach().clone().requires_grad_()
    y_ref = torch.nn.functional.linear(x_ref, weight, bias) + dense_reference(x_ref, indices, v_ref, d_in)
    y_ref.backward(grad_y)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad, v_ref.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(weight, weight_before)  # the CPU path merges into W and takes it out again


def test_sparse_linear_keeps_only_its_inputs_for_backward_and_refuses_a_trainable_base():
    from neuroada_kernels import sparse_linear

    d_in, d_out, k = 32, 48, 8
    weight = torch.randn(d_out, d_in)
    x = torch.randn(4, 16, d_in, requires_grad=True)
    indices = torch.rand(d_out, d_in).argsort(dim=1)[:, :k]
    values = torch.zeros(d_out, k, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        sparse_linear(x, weight, None, indices, values).sum().backward()
    # x for grad_values, and the pattern; the frozen weight is the layer's own, never a copy
    assert sorted(saved) == sorted([torch.Size([64, d_in]), torch.Size([d_out, k]), torch.Size([d_out, k])])
    with pytest.raises(ValueError, match="freeze the base weight"):
        sparse_linear(x, weight.requires_grad_(), None, indices, values)


def test_sparse_linear_used_twice_in_one_graph_and_with_a_column_listed_twice():
    # A layer applied twice merges into its weight twice before either backward runs, and a row
    # may name a column twice (two deltas on one weight): both must still give the reference
    # gradients and leave the weight's bits as they were.
    from neuroada_kernels import sparse_linear

    d = 24
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(d, d, generator=g)
    indices = torch.rand(d, d, generator=g).argsort(dim=1)[:, :3]
    indices[:, 2] = indices[:, 0]
    values = torch.randn(d, 3, generator=g, requires_grad=True)
    x = torch.randn(2, 9, d, generator=g, requires_grad=True)
    grad_y = torch.randn(2, 9, d, generator=g)
    weight_before = weight.clone()

    sparse_linear(sparse_linear(x, weight, None, indices, values), weight, None, indices, values).backward(grad_y)
    x_ref, v_ref = x.detach().clone().requires_grad_(), values.detach().clone().requires_grad_()
    layer = lambda h: h @ (weight + torch.zeros(d, d).scatter_add(1, indices, v_ref)).t()  # noqa: E731
    layer(layer(x_ref)).backward(grad_y)

    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad, v_ref.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(weight, weight_before)


def test_sparse_linear_can_keep_its_input_in_bfloat16_one_copy_per_input():
    # q/k/v (and gate/up) take the same x: in bfloat16 they keep one narrow copy between them,
    # as in float32 they share x itself; only grad_values sees the rounding.
    from neuroada_kernels import sparse_linear

    d_in, k = 48, 5
    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(d_out, d_in, generator=g) for d_out in (48, 16, 16)]
    indices = [torch.rand(w.shape[0], d_in, generator=g).argsort(dim=1)[:, :k] for w in weights]
    x = torch.randn(3, 20, d_in, generator=g, requires_grad=True)
    grads = [torch.randn(3, 20, w.shape[0], generator=g) for w in weights]

    def run(saved_input_dtype):
        xs = x.detach().clone().requires_grad_()
        values = [
            torch.randn(w.shape[0], k, generator=torch.Generator().manual_seed(1)).requires_grad_() for w in weights
        ]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            ys = [
                sparse_linear(xs, w, None, i, v, saved_input_dtype=saved_input_dtype)
                for w, i, v in zip(weights, indices, values)
            ]
        torch.autograd.backward(ys, grads)
        kept = [t for t in saved if t.shape == (60, d_in)]
        return ys, xs.grad, [v.grad for v in values], kept

    ys32, gx32, gv32, kept32 = run(torch.float32)
    ys16, gx16, gv16, kept16 = run(torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in kept16) and len({t.data_ptr() for t in kept16}) == 1
    assert len({t.data_ptr() for t in kept32}) == 1
    for a, b in zip(ys32, ys16):
        assert torch.equal(a, b)
    assert torch.equal(gx32, gx16)
    for a, b in zip(gv32, gv16):
        assert not torch.equal(a, b)  # the narrow copy really is what grad_values read
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(cpu_kernels() is None, reason="needs the C++ CPU kernels (a compiler)")
@pytest.mark.parametrize("with_grad_x", [False, True])
def test_cpu_backward_reads_bfloat16_inputs_as_their_exact_float32_values(with_grad_x):
    d_in, d_out, k, T = 40, 70, 6, 75  # a partial token tile
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, d_in, generator=g).bfloat16()
    indices = torch.rand(d_out, d_in, generator=g).argsort(dim=1)[:, :k].contiguous()
    values, grad_y = torch.randn(d_out, k, generator=g), torch.randn(T, d_out, generator=g)
    gx_narrow, gx_wide = (torch.zeros(T, d_in), torch.zeros(T, d_in)) if with_grad_x else (None, None)
    narrow = cpu_kernels().sparse_bwd_add_(grad_y, x, indices, values, gx_narrow, True)
    wide = cpu_kernels().sparse_bwd_add_(grad_y, x.float(), indices, values, gx_wide, True)
    assert torch.equal(narrow, wide)
    if with_grad_x:
        assert torch.equal(gx_narrow, gx_wide)
    with pytest.raises(RuntimeError, match="x must be"):
        cpu_kernels().sparse_fwd_add_(torch.zeros(T, d_out), x, indices, values)  # the forward takes float32 only


def test_sparse_linear_failing_mid_product_leaves_the_weight_untouched():
    from neuroada_kernels import sparse_linear

    weight = torch.randn(16, 8)
    bias = torch.randn(15)  # wrong size: the GEMM raises after the deltas went into the weight
    indices = torch.rand(16, 8).argsort(dim=1)[:, :2]
    values = torch.randn(16, 2, requires_grad=True)
    weight_before = weight.clone()
    with pytest.raises(RuntimeError):
        sparse_linear(torch.randn(4, 8), weight, bias, indices, values)
    assert torch.equal(weight, weight_before)


def test_cpu_backward_with_many_rows_sharing_a_few_columns():
    # Magnitude selection piles rows onto a few outlier input columns; grad_x sums long column lists.
    d_in, d_out, k = 64, 300, 2
    g = torch.Generator().manual_seed(3)
    indices = torch.rand(d_out, 3, generator=g).argsort(dim=1)[:, :k] * 7  # columns 0, 7, 14 only
    x = torch.randn(70, d_in, generator=g, requires_grad=True)
    values = torch.randn(d_out, k, generator=g, requires_grad=True)
    grad_y = torch.randn(70, d_out, generator=g)
    sparse_delta(x, indices, values, backend="cpu").backward(grad_y)
    x_ref, v_ref = x.detach().clone().requires_grad_(), values.detach().clone().requires_grad_()
    dense_reference(x_ref, indices, v_ref, d_in).backward(grad_y)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(values.grad, v_ref.grad, rtol=1e-5, atol=1e-4)
    assert torch.equal(x.grad[:, 1:7], torch.zeros(70, 6))  # columns nobody selected get nothing
