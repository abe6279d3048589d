"""The dense linear of every target layer: a decode step's few rows on our CPU kernel, a prefill's
many on oneDNN's.

A decode step multiplies a handful of token rows by each weight: a pass over the weight's bytes.
On the CPU, `F.linear` (MKL's sgemm) reads the weight at a fraction of the memory bandwidth for
such a skinny product; `neuroada_kernels/csrc/decode_linear.cpp` reads every weight row once for all the
rows. A prefill's product is compute-bound; on the CPU in float32 it goes to the faster GEMM of the
CPU's vendor: MKL's sgemm (which `F.linear` calls) on an Intel CPU, oneDNN's (the one torch's own
compiler uses for CPU linears) elsewhere, where MKL takes a slower path (benchmarks/RESULTS.md,
`benchmarks/prefill.py`). Where oneDNN is missing, a gradient is wanted, a graph is being compiled or
the rows are not float32 on the CPU: `F.linear`.

A float32 input may meet bfloat16 weights (a server's `weight_dtype`): the kernel widens them as it
reads, and a GEMM gets them widened first, so either way the arithmetic is float32's.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from neuroada_kernels.cpu import cpu_kernels

# Past this many rows the product is compute-bound and a GEMM is as fast (benchmarks/RESULTS.md).
DECODE_MAX_ROWS = 32


PrefillGemm = Literal["onednn", "torch"]
ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _cpu_vendor() -> str | None:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


_prefill_gemm: PrefillGemm = "onednn" if ONEDNN_AVAILABLE and _cpu_vendor() != "GenuineIntel" else "torch"


def prefill_gemm() -> PrefillGemm:
    return _prefill_gemm


def use_prefill_gemm(name: PrefillGemm) -> None:
    """Which library computes the float32 CPU products past a decode step's rows: "onednn" (the
    default where torch has it, but on Intel CPUs) or "torch" (`F.linear`: MKL's sgemm; the
    default on Intel CPUs). For benchmarks comparing them."""
    global _prefill_gemm
    if name not in get_args(PrefillGemm):
        raise ValueError(f"prefill GEMM {name!r} is not one of {get_args(PrefillGemm)}")
    if name == "onednn" and not ONEDNN_AVAILABLE:
        raise RuntimeError("this torch build has no oneDNN linear")
    _prefill_gemm = name


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; x [..., K], weight [N, K] -> [..., N]."""
    kernels = _decode_kernels(x, weight, bias=bias)
    if kernels is not None:
        K = x.shape[-1]
        out = kernels.decode_linear(x.reshape(-1, K).contiguous(), weight.contiguous(), bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    weight = _widened(weight, x)
    if _on_onednn(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def gated_silu(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_up: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.silu(F.linear(x, gate)) * F.linear(x, up)` (a gated MLP before its down projection), in
    one call on the CPU kernel; x [..., K], gate and up [N, K] -> [..., N]. Elsewhere, given
    `gate_up` ([2N, K]: gate's rows then up's, the two back to back in memory), one product reads
    both (a GPU's decode step: one larger GEMV where two would each pay a launch)."""
    kernels = _decode_kernels(x, gate, up)
    if kernels is not None:
        K = x.shape[-1]
        out = kernels.decode_gated_silu(x.reshape(-1, K).contiguous(), gate.contiguous(), up.contiguous())
        return out.view(*x.shape[:-1], gate.shape[0])
    if gate_up is not None:
        g, u = linear(x, gate_up).split(gate.shape[0], dim=-1)  # [..., N] each
        return F.silu(g) * u
    return F.silu(linear(x, gate)) * linear(x, up)


def _widened(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return weight if weight.dtype == x.dtype else weight.to(x.dtype)


def _on_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN's GEMM computes this product: rows and weights float32 on the CPU, at least
    one row, no gradient wanted, not inside a graph being compiled (the compiler picks its own)."""
    if torch.compiler.is_compiling():
        return False
    if not (
        _prefill_gemm == "onednn"
        and x.is_cpu
        and x.dtype == weight.dtype == torch.float32
        and x.numel()
        and weight.numel()
    ):
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))


def _decode_kernels(x: torch.Tensor, *weights: torch.Tensor, bias: torch.Tensor | None = None):
    """The C++ module where a product of x with these weights (+ bias) is a decode step's: a few
    float32 rows on the CPU, float32 or bf16 weights of one dtype, no gradient wanted; None otherwise."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if not (0 < rows <= DECODE_MAX_ROWS and x.is_cpu and x.dtype == torch.float32):
        return None
    if {w.dtype for w in weights} not in ({torch.float32}, {torch.bfloat16}):
        return None
    if bias is not None and bias.dtype != torch.float32:
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *weights, bias)):
        return None
    return cpu_kernels()


class DecodeLinear(nn.Linear):
    """An `nn.Linear` whose forward is `linear` above: same parameters, same results to rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def use_decode_linears(model: nn.Module) -> int:
    """Turn the model's plain `nn.Linear`s into `DecodeLinear`s in place (their parameters stay the
    very same tensors, so packed weights and in-place switches are unaffected); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear
            count += 1
    return count
