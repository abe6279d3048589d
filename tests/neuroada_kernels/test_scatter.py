import pytest
import torch

from neuroada_kernels import (
    apply_delta_,
    apply_delta_flat_,
    flat_offsets,
    reapply_delta_flat_,
    restore_,
    restore_flat_,
    triton_available,
)
from neuroada_kernels.reference import apply_delta_flat_ref_, restore_flat_ref_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = [
    "torch",
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton")),
]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


def unique_indices(d_out: int, d_in: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(d_out, d_in, generator=g).argsort(dim=1)[:, :k].to(torch.int16)


def test_reference_hand_computed_example():
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    indices = torch.tensor([[2, 0], [0, 1]], dtype=torch.int16)
    values = torch.tensor([[0.5, -1.0], [-1.0, 0.25]], dtype=torch.bfloat16)
    saved = torch.empty(2, 2)
    apply_delta_(weight, indices, values, saved, backend="torch")
    assert torch.equal(weight, torch.tensor([[0.0, 2.0, 3.5], [3.0, 5.25, 6.0]]))
    assert torch.equal(saved, torch.tensor([[3.0, 1.0], [4.0, 5.0]]))
    restore_(weight, indices, saved, backend="torch")
    assert torch.equal(weight, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))


def test_bf16_sum_is_rounded_once_to_nearest_even():
    # The bf16 ulp at 1 is 2^-7, so 1 + 2^-8 and 1 + 3 * 2^-8 are exact midpoints: the float32 sum
    # is rounded once, ties to even, never accumulated in bf16.
    weight = torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)
    values = torch.tensor([[2.0**-8, 3 * 2.0**-8]], dtype=torch.float32)
    saved = torch.empty(1, 2, dtype=torch.bfloat16)
    apply_delta_(weight, torch.tensor([[0, 1]], dtype=torch.int16), values, saved, backend="torch")
    expected = (torch.tensor([[1.0, 1.0]]) + values).to(torch.bfloat16)
    assert torch.equal(weight, expected)
    assert weight[0, 0].item() == 1.0  # tie -> even
    assert weight[0, 1].item() == 1.015625


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 3, 20, "d_in"])
@pytest.mark.parametrize("shape", [(7, 33), (64, 96), (130, 40)])
def test_triton_matches_reference(dtype, k, shape):
    if not triton_available():
        pytest.skip("no triton")
    d_out, d_in = shape
    k = d_in if k == "d_in" else min(k, d_in)
    g = torch.Generator().manual_seed(d_out * 1000 + k)
    weight = torch.randn(d_out, d_in, generator=g).to(dtype)
    indices = unique_indices(d_out, d_in, k, seed=k)
    values = (torch.randn(d_out, k, generator=g) * 0.05).to(torch.bfloat16)

    w_ref, w_tri = weight.clone(), weight.clone()
    s_ref = torch.empty(d_out, k, dtype=dtype)
    s_tri = torch.empty(d_out, k, dtype=dtype)
    apply_delta_(w_ref, indices, values, s_ref, backend="torch")
    apply_delta_(w_tri, indices, values, s_tri, backend="triton")

    assert torch.equal(bits(s_tri), bits(s_ref))
    ulps = (bits(w_tri).int() - bits(w_ref).int()).abs()
    if dtype == torch.float32 or torch.cuda.is_available():
        assert int(ulps.max()) == 0
    else:  # the interpreter rounds 16-bit stores differently from torch (see DEVELOPERS.md)
        assert int(ulps.max()) <= 1
    untouched = torch.ones_like(weight, dtype=torch.bool)
    untouched.scatter_(1, indices.long(), False)
    assert torch.equal(bits(w_tri)[untouched], bits(weight)[untouched])

    restore_(w_tri, indices, s_tri, backend="triton")
    assert torch.equal(bits(w_tri), bits(weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_restore_is_bit_exact_including_overflow_and_underflow(backend, dtype):
    d_out, d_in = 6, 16
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(d_out, d_in, generator=g).to(dtype)
    weight[0, 0] = torch.finfo(dtype).max  # + a large delta overflows to inf
    weight[1, :] = torch.finfo(dtype).tiny  # + a tiny negative delta underflows / goes subnormal
    indices = unique_indices(d_out, d_in, k=d_in, seed=2)  # every row has k = d_in
    values = torch.randn(d_out, d_in, generator=g).to(torch.bfloat16)
    values[0, (indices[0] == 0).nonzero()] = float(torch.finfo(torch.bfloat16).max)
    values[1] = -1e-30
    original = weight.clone()
    saved = torch.empty(d_out, d_in, dtype=dtype)

    apply_delta_(weight, indices, values, saved, backend=backend)
    assert torch.isinf(weight[0, 0])
    assert not torch.equal(bits(weight), bits(original))
    restore_(weight, indices, saved, backend=backend)
    assert torch.equal(bits(weight), bits(original))


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_cycles_do_not_drift(backend):
    weight = torch.randn(32, 48).to(torch.bfloat16)
    original = weight.clone()
    saved = torch.empty(32, 4, dtype=torch.bfloat16)
    for cycle in range(50):
        indices = unique_indices(32, 48, 4, seed=cycle)
        values = torch.randn(32, 4).to(torch.bfloat16) * 1e-3
        apply_delta_(weight, indices, values, saved, backend=backend)
        restore_(weight, indices, saved, backend=backend)
    assert torch.equal(bits(weight), bits(original))


def test_flat_offsets_are_row_major_positions():
    indices = torch.tensor([[2, 0], [1, 3]], dtype=torch.int16)
    assert flat_offsets(indices, d_in=4, start=10).tolist() == [12, 10, 15, 17]


def test_flat_form_equals_reference_directly():
    buffer = torch.arange(10, dtype=torch.float32)
    offsets = torch.tensor([9, 0, 4])
    values = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    saved = torch.empty(3)
    apply_delta_flat_(buffer, offsets, values, saved)
    assert buffer.tolist() == [2, 1, 2, 3, 7, 5, 6, 7, 8, 10]
    ref = torch.arange(10, dtype=torch.float32)
    apply_delta_flat_ref_(ref, offsets, values, torch.empty(3))
    assert torch.equal(buffer, ref)
    restore_flat_(buffer, offsets, saved)
    restore_flat_ref_(ref, offsets, saved)
    assert torch.equal(buffer, torch.arange(10, dtype=torch.float32)) and torch.equal(ref, buffer)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(weight=a["weight"].to(torch.float64)), "weight dtype"),
        (lambda a: a.update(weight=a["weight"].t()), "contiguous"),
        (lambda a: a.update(indices=a["indices"][:3]), "rows"),
        (lambda a: a.update(values=a["values"][:, :1]), "values shape"),
        (lambda a: a.update(saved=torch.empty(4, 2, dtype=torch.float16)), "saved dtype"),
        (lambda a: a.update(indices=a["indices"].float()), "indices dtype"),
        (lambda a: a.update(values=a["values"].to("meta")), "one device"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_error(mutate, message):
    args = dict(
        weight=torch.zeros(4, 8),
        indices=torch.zeros(4, 2, dtype=torch.int16) + torch.tensor([0, 1], dtype=torch.int16),
        values=torch.zeros(4, 2, dtype=torch.bfloat16),
        saved=torch.empty(4, 2),
    )
    mutate(args)
    with pytest.raises(ValueError, match=message):
        apply_delta_(args["weight"], args["indices"], args["values"], args["saved"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reapply_over_saved_originals_equals_restore_then_apply(backend, dtype):
    g = torch.Generator().manual_seed(4)
    buffer = torch.randn(500, generator=g).to(dtype)
    original = buffer.clone()
    offsets = torch.randperm(500, generator=g)[:120]
    first = (torch.randn(120, generator=g) * 0.1).to(torch.bfloat16)
    second = (torch.randn(120, generator=g) * 0.1).to(torch.bfloat16)
    saved = torch.empty(120, dtype=dtype)
    apply_delta_flat_(buffer, offsets, first, saved, backend=backend)
    reapply_delta_flat_(buffer, offsets, second, saved, backend=backend)  # switch first -> second

    expected = original.clone()
    apply_delta_flat_(expected, offsets, second, torch.empty(120, dtype=dtype), backend="torch")
    ulps = (bits(buffer).int() - bits(expected).int()).abs()
    exact = dtype == torch.float32 or backend == "torch" or torch.cuda.is_available()
    assert int(ulps.max()) <= (0 if exact else 1)
    restore_flat_(buffer, offsets, saved, backend=backend)
    assert torch.equal(bits(buffer), bits(original))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("values_dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
def test_cpu_kernel_equals_the_torch_twin_bit_for_bit(dtype, values_dtype):
    d_out, d_in, k = 130, 96, 20  # n = 2600 entries: several of the C++ loop's chunks
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(d_out, d_in, generator=g).to(dtype)
    weight[0, :] = torch.finfo(dtype).max  # overflow to inf on the way, as the twin does
    indices = unique_indices(d_out, d_in, k, seed=7)
    offsets = flat_offsets(indices, d_in)
    first = (torch.randn(d_out * k, generator=g) * 0.05).to(values_dtype)
    second = (torch.randn(d_out * k, generator=g) * 0.05).to(values_dtype)
    first[:k] = float(torch.finfo(torch.bfloat16).max)
    results = {}
    for backend in ("torch", "cpu"):
        buffer = weight.clone().view(-1)
        saved = torch.empty(d_out * k, dtype=dtype)
        apply_delta_flat_(buffer, offsets, first, saved, backend=backend)
        after_apply = buffer.clone()
        reapply_delta_flat_(buffer, offsets, second, saved, backend=backend)
        after_switch = buffer.clone()
        restore_flat_(buffer, offsets, saved, backend=backend)
        results[backend] = (after_apply, after_switch, saved.clone(), buffer.clone())
    for ours, twin in zip(results["cpu"], results["torch"]):
        assert torch.equal(bits(ours), bits(twin))
    assert torch.equal(bits(results["cpu"][3]), bits(weight.view(-1)))


def test_cpu_kernel_checks_offsets_unless_told_not_to():
    buffer = torch.zeros(10)
    offsets = torch.tensor([3, 10])
    with pytest.raises(RuntimeError, match=r"offsets must lie in \[0, 10\)"):
        apply_delta_flat_(buffer, offsets, torch.ones(2), torch.empty(2), backend="cpu")
    assert torch.equal(buffer, torch.zeros(10))
