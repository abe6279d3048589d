"""The decode-sized linear against F.linear: rows x shapes x bias x weight dtype, and where it hands over.

A bf16 weight meets float32 rows: the expected result is F.linear over the weight widened to float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuroada_kernels import cpu_kernels
from neuroada_kernels.decode_linear import (
    DECODE_MAX_ROWS,
    ONEDNN_AVAILABLE,
    DecodeLinear,
    gated_silu,
    linear,
    prefill_gemm,
    use_decode_linears,
    use_prefill_gemm,
)

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


def test_gated_silu_off_the_kernels_reads_gate_and_up_given_back_to_back_in_one_product():
    gate_up = torch.randn(20, 24, dtype=torch.bfloat16)
    gate, up = gate_up[:10], gate_up[10:]  # back to back, as a packed layer holds them
    x = torch.randn(3, 24, dtype=torch.bfloat16)  # bf16 rows: no CPU kernel (a GPU's path)
    expected = gated_silu(x, gate, up)  # two products
    torch.testing.assert_close(gated_silu(x, gate, up, gate_up), expected)
    assert not torch.equal(gated_silu(x, gate, up, gate_up.flip(0)), expected)  # the one product is what it reads


@pytest.mark.parametrize("rows", [2, DECODE_MAX_ROWS + 8])  # the kernel's rows, and a prefill's
def test_gradients_still_flow_through_f_linear(rows):
    x = torch.randn(rows, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(0).expand(rows, 8))
    torch.testing.assert_close(w.grad, x.detach().sum(0).expand(4, 8))


GEMMS = ["torch"] + (["onednn"] if ONEDNN_AVAILABLE else [])


@pytest.fixture(params=GEMMS)
def gemm(request):
    """Each prefill GEMM in turn, the default restored after."""
    default = prefill_gemm()
    use_prefill_gemm(request.param)
    yield request.param
    use_prefill_gemm(default)


@pytest.mark.parametrize("lead", [(DECODE_MAX_ROWS + 1,), (3, 40), (1, 300)])  # prefill-sized
@pytest.mark.parametrize("shape", [(64, 48), (13, 7), (250, 577)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_dtype", WEIGHT_DTYPES)
def test_a_prefills_products_equal_f_linear_on_each_gemm(gemm, lead, shape, bias, weight_dtype):
    g = torch.Generator().manual_seed(len(lead))
    d_out, d_in = shape
    x, w = torch.randn(*lead, d_in, generator=g), torch.randn(d_out, d_in, generator=g).to(weight_dtype)
    b = torch.randn(d_out, generator=g) if bias else None
    with torch.inference_mode():
        out = linear(x, w, b)
        gated = gated_silu(x, w, w.flip(0))
    torch.testing.assert_close(out, F.linear(x, w.float(), b), rtol=1e-5, atol=1e-4)
    expected = F.silu(F.linear(x, w.float())) * F.linear(x, w.flip(0).float())
    torch.testing.assert_close(gated, expected, rtol=1e-5, atol=1e-4 * 2 * d_in**0.5)


@pytest.mark.parametrize("rows", [1, DECODE_MAX_ROWS, DECODE_MAX_ROWS + 1])
def test_only_a_prefills_products_run_on_the_chosen_gemm(gemm, rows):
    x, w = torch.randn(rows, 24), torch.randn(10, 24)
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        linear(x, w)
    on_onednn = "mkldnn::_linear_pointwise" in {e.key for e in prof.key_averages()}
    # a decode step's rows are our kernel's wherever it is built
    assert on_onednn == (gemm == "onednn" and (rows > DECODE_MAX_ROWS or cpu_kernels() is None))


def test_a_prefill_sized_linear_compiles(gemm):
    """The compiler traces `linear` at a prefill's rows (a compiled decode step of many rows)."""
    x, w = torch.randn(DECODE_MAX_ROWS + 8, 24), torch.randn(10, 24)
    with torch.inference_mode():
        out = torch.compile(linear, fullgraph=True)(x, w)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-4)


def test_the_default_prefill_gemm_is_mkls_on_intel_cpus_and_onednns_elsewhere():
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in cpuinfo.splitlines())
    assert prefill_gemm() == ("torch" if intel or not ONEDNN_AVAILABLE else "onednn")


def test_use_prefill_gemm_refuses_an_unknown_gemm():
    with pytest.raises(ValueError, match="'mkl' is not one of"):
        use_prefill_gemm("mkl")


def test_use_decode_linears_keeps_every_parameter_tensor():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    before = [p.data_ptr() for p in model.parameters()]
    x = torch.randn(3, 8)
    expected = model(x)
    assert use_decode_linears(model) == 2
    assert all(isinstance(m, DecodeLinear) for m in (model[0], model[2]))
    assert [p.data_ptr() for p in model.parameters()] == before
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
