"""A decode step's decoder layers in one call on the CPU (`kernels/csrc/decode_layers.cpp`).

Each layer of a Llama-shaped decoder is a dozen calls from Python (two RMSNorms, the q/k/v product,
attention, the output projection, the gated MLP, two residual adds, views); at a small batch their
dispatch and argument checks cost about a sixth of the step. The C++ loop makes the same kernel
calls in the same order (the result is the Python loop's to the bit) without returning to Python
between them, and without the GIL.
"""

from __future__ import annotations

import torch

from kernels.cpu import cpu_kernels


def decode_layers(
    x: torch.Tensor,  # [B, hidden] float32: the step's embedded tokens
    input_norms: list[torch.Tensor],  # per layer [hidden]
    qkv: list[torch.Tensor],  # per layer [(heads + 2 kv_heads) * head_dim, hidden]: q, k, v back to back
    o: list[torch.Tensor],  # per layer [hidden, heads * head_dim]
    post_norms: list[torch.Tensor],  # per layer [hidden]
    gate: list[torch.Tensor],  # per layer [inter, hidden]
    up: list[torch.Tensor],  # per layer [inter, hidden]
    down: list[torch.Tensor],  # per layer [hidden, inter]
    keys: list[torch.Tensor],  # per layer [slots, kv_heads, capacity, head_dim]; row b is slot first + b
    values: list[torch.Tensor],  # like keys
    cos: torch.Tensor,  # [B, head_dim]
    sin: torch.Tensor,  # [B, head_dim]
    positions: torch.Tensor,  # [B] int64: each row's new position
    first: int,
    heads: int,
    kv_heads: int,
    scale: float,
    eps: float,
) -> torch.Tensor | None:
    """The hidden states [B, hidden] after the last layer (each row's key and value written into its
    slot), or None where the C++ kernels are not built: the caller runs its own loop."""
    kernels = cpu_kernels()
    if kernels is None:
        return None
    cos, sin = cos.contiguous(), sin.contiguous()
    return kernels.decode_layers(
        x,
        input_norms,
        qkv,
        o,
        post_norms,
        gate,
        up,
        down,
        keys,
        values,
        cos,
        sin,
        positions.cpu(),
        first,
        heads,
        kv_heads,
        scale,
        eps,
    )
