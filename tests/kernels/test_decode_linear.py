"""The decode-sized linear against F.linear: rows x shapes x bias x weight dtype, and where it hands over.

A bf16 weight meets float32 rows: the expected result is F.linear over the weight widened to float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kernels import cpu_kernels
from kernels.decode_linear import DECODE_MAX_ROWS, DecodeLinear, gated_silu, linear, use_decode_linears

WEIGHT_DTYPES = [torch.float32, torch.bfloat16]
needs_cpu_kernels = pytest.mark.skipif(cpu_kernels() is None, reason="the C++ CPU kernels could not be built here")


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, DECODE_MAX_ROWS])
@pytest.mark.parametrize(
    "shape", [(64, 48), (13, 7), (250, 577), (1, 16), (5, 0)]
)  # odd sizes: vector tails; no inputs
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
def test_the_kernel_equals_f_linear(rows, shape, bias, weight_dtype):
    g = torch.Generator().manual_seed(rows)
    d_out, d_in = shape
    x, w = torch.randn(rows, d_in, generator=g), torch.randn(d_out, d_in, generator=g).to(weight_dtype)
    b = torch.randn(d_out, generator=g) if bias else None
    expected = F.linear(x, w.float(), b)
    torch.testing.assert_close(cpu_kernels().decode_linear(x, w, b), expected, rtol=1e-5, atol=1e-4)


@needs_cpu_kernels
@pytest.mark.parametrize("rows", [1, 4, 6, 9, 13, DECODE_MAX_ROWS])
@pytest.mark.parametrize("shape", [(64, 48), (13, 7), (250, 577)])
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
def test_the_gated_kernel_equals_silu_of_gate_times_up(rows, shape, weight_dtype):
    g = torch.Generator().manual_seed(rows)
    d_out, d_in = shape
    x = torch.randn(rows, d_in, generator=g)
    gate, up = torch.randn(2, d_out, d_in, generator=g).to(weight_dtype)
    expected = F.silu(F.linear(x, gate.float())) * F.linear(x, up.float())
    # a product of two sums that each match F.linear to 1e-4, and are each up to ~sqrt(d_in) in size
    atol = 1e-4 * 2 * d_in**0.5
    torch.testing.assert_close(cpu_kernels().decode_gated_silu(x, gate, up), expected, rtol=1e-5, atol=atol)


@needs_cpu_kernels
def test_the_kernel_refuses_what_it_cannot_compute():
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels().decode_linear(torch.randn(2, 8).bfloat16(), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_kernels().decode_linear(torch.randn(2, 8), torch.randn(4, 8).half(), None)
    with pytest.raises(RuntimeError, match="one dtype"):
        cpu_kernels().decode_gated_silu(torch.randn(2, 8), torch.randn(4, 8), torch.randn(4, 8).bfloat16())
    with pytest.raises(RuntimeError, match="K"):
        cpu_kernels().decode_linear(torch.randn(2, 8), torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="gate and up"):
        cpu_kernels().decode_gated_silu(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5, 8))


@pytest.mark.parametrize("lead", [(3,), (2, 1), (1, 40)])  # decode rows, [B, 1], and a prefill past the kernel
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
def test_linear_keeps_leading_dims_whichever_path_it_takes(lead, weight_dtype):
    x, w, b = torch.randn(*lead, 24), torch.randn(10, 24).to(weight_dtype), torch.randn(10)
    out = linear(x, w, b)
    assert out.shape == (*lead, 10) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w.float(), b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lead", [(3,), (2, 1), (1, 40)])
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
def test_gated_silu_keeps_leading_dims_whichever_path_it_takes(lead, weight_dtype):
    x, gate, up = torch.randn(*lead, 24), torch.randn(10, 24).to(weight_dtype), torch.randn(10, 24).to(weight_dtype)
    out = gated_silu(x, gate, up)
    assert out.shape == (*lead, 10) and out.dtype == torch.float32
    expected = F.silu(F.linear(x, gate.float())) * F.linear(x, up.float())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_gradients_still_flow_through_f_linear():
    x = torch.randn(2, 8, requires_grad=True)
    w = torch.randn(4, 8)
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, 8))


def test_use_decode_linears_keeps_every_parameter_tensor():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    before = [p.data_ptr() for p in model.parameters()]
    x = torch.randn(3, 8)
    expected = model(x)
    assert use_decode_linears(model) == 2
    assert all(isinstance(m, DecodeLinear) for m in (model[0], model[2]))
    assert [p.data_ptr() for p in model.parameters()] == before
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
