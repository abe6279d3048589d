"""A decode step's decoder layers in one call on the CPU (`neuroada_kernels/csrc/decode_layers.cpp`).

Each layer of a Llama-shaped decoder is a dozen calls from Python (two RMSNorms, the q/k/v product,
attention, the output projection, the gated MLP, two residual adds, views); at a small batch their
dispatch and argument checks are a sizeable part of the step (benchmarks/RESULTS.md). The C++ loop makes the same kernel
calls in the same order (the result is the Python loop's to the bit) without returning to Python
between them, and without the GIL; with the mixed path's per-row deltas too.

A short prefill runs here as well: each of its tokens a row, at its slot and position, attending to
the positions before it in its slot (the cached prefix and the tokens before it in the call).
"""

from __future__ import annotations

import torch

from neuroada_kernels.cpu import cpu_kernels

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")  # a layer's entries in `deltas`, in order
Delta = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # indices, values, slots


def decode_layers(
    x: torch.Tensor,  # [B, hidden] float32: the step's embedded tokens
    input_norms: list[torch.Tensor],  # per layer [hidden]
    qkv: list[torch.Tensor],  # per layer [(heads + 2 kv_heads) * head_dim, hidden]: q, k, v back to back
    o: list[torch.Tensor],  # per layer [hidden, heads * head_dim]
    post_norms: list[torch.Tensor],  # per layer [hidden]
    gate: list[torch.Tensor],  # per layer [inter, hidden]
    up: list[torch.Tensor],  # per layer [inter, hidden]
    down: list[torch.Tensor],  # per layer [hidden, inter]
    keys: list[torch.Tensor],  # per layer [slots, kv_heads, capacity, head_dim]
    values: list[torch.Tensor],  # like keys
    cos: torch.Tensor,  # [B, head_dim]
    sin: torch.Tensor,  # [B, head_dim]
    slots: torch.Tensor,  # [B] int64: each row's cache slot (rows of one slot: a prefill's tokens)
    positions: torch.Tensor,  # [B] int64: each row's new position
    heads: int,
    kv_heads: int,
    scale: float,
    eps: float,
    deltas: list[list[list[Delta] | None]] = (),  # per layer, per projection: None, or the bound deltas
) -> torch.Tensor | None:
    """The hidden states [B, hidden] after the last layer (each row's key and value written into its
    slot at its position), or None where the C++ kernels are not built: the caller runs its own loop.

    `deltas` (none, or per layer one entry per projection in PROJECTIONS order) are the mixed
    path's: None for a projection on its own weights, else the deltas its wrapped forward would add,
    each (indices [k, d_out], values [slots, k, d_out], slots [B]); a layer whose gate or up is
    wrapped runs its MLP as the model's own code does (silu(gate) * up, apart)."""
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
        slots.cpu(),
        positions.cpu(),
        heads,
        kv_heads,
        scale,
        eps,
        list(deltas),
    )
