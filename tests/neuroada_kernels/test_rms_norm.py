"""RMSNorm on the C++ pass against torch's, and where it hands over."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from neuroada_kernels import cpu_kernels, rms_norm


@pytest.mark.skipif(cpu_kernels() is None, reason="the C++ CPU kernels could not be built here")
@pytest.mark.parametrize("shape", [(1, 576), (4, 1, 576), (3, 7, 13), (2, 1)])
def test_the_kernel_equals_torch(shape):
    g = torch.Generator().manual_seed(len(shape))
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(cpu_kernels().rms_norm(x, w, 1e-5), F.rms_norm(x, (shape[-1],), w, 1e-5))


def test_non_contiguous_inputs_and_other_dtypes_give_torch_results():
    x = torch.randn(8, 6).t()  # [6, 8], not contiguous
    w = torch.randn(8)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), F.rms_norm(x, (8,), w, 1e-6))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert rms_norm(xb, wb, 1e-6).dtype == torch.bfloat16


def test_gradients_flow_through_torch():
    x = torch.randn(3, 8, requires_grad=True)
    rms_norm(x, torch.ones(8), 1e-6).sum().backward()
    assert x.grad is not None and x.grad.shape == (3, 8)
