"""Choosing, once before training, the k input positions of each output neuron.

magnitude (the NeuroAda method): the k largest |w| of the row. reverse: the k smallest. random:
k distinct positions from a seeded generator. Ties are broken by the lower input position, so
the same weights always give the same indices on any device.
"""

from __future__ import annotations

import torch


def select_topk(weight: torch.Tensor, k: int, selection: str = "magnitude", seed: int = 0) -> torch.Tensor:
    """Per row of `weight` [d_out, d_in], k distinct input positions -> [d_out, k] int64, sorted."""
    d_out, d_in = weight.shape
    if not 1 <= k <= d_in:
        raise ValueError(f"k must be in [1, d_in={d_in}], got {k}")
    if selection == "random":
        g = torch.Generator().manual_seed(seed)
        scores = torch.rand(d_out, d_in, generator=g)
    elif selection in ("magnitude", "reverse"):
        scores = weight.detach().float().abs().cpu()
        if selection == "reverse":
            scores = -scores
    else:
        raise ValueError(f"unknown selection {selection!r}")
    # A stable descending sort breaks ties by position; topk's tie order is unspecified.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values.to(weight.device)
