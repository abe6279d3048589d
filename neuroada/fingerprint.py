"""What an adapter is checked against: a base model's linear layers and its fingerprint.

The fingerprint hashes each linear layer's name, shape and a fixed strided sample of its weight
rounded to bf16, so one checkpoint gives the same fingerprint in fp32 on a CPU and in bf16 on a
GPU, in any process. It reads a few hundred values per layer: milliseconds even for 7B models.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

SAMPLES_PER_LAYER = 256


@dataclass(frozen=True)
class BaseModelSpec:
    """The facts about a base model that adapter validation needs."""

    name: str
    fingerprint: str
    linear_shapes: dict[str, tuple[int, int]]  # module name -> (d_out, d_in)
    module_names: frozenset[str]

    @classmethod
    def from_model(cls, model: nn.Module, name: str) -> BaseModelSpec:
        linears = linear_layers(model)
        return cls(
            name=name,
            fingerprint=fingerprint(model),
            linear_shapes={n: tuple(m.weight.shape) for n, m in linears.items()},
            module_names=frozenset(n for n, _ in model.named_modules()),
        )


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the model by module path, in a stable (sorted) order."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return dict(sorted(found.items()))


def untied_linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers whose weight no other module shares (a tied lm_head is the input embedding too)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {n: m for n, m in linear_layers(model).items() if owners[id(m.weight)] == 1}


def fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, layer in linear_layers(model).items():
        weight = layer.weight.detach()
        h.update(f"{name}:{tuple(weight.shape)};".encode())
        h.update(weight_sample(weight).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def weight_sample(weight: torch.Tensor) -> torch.Tensor:
    """A fixed strided sample of the weight, rounded to bf16, as int16 bits on the CPU."""
    flat = weight.reshape(-1)
    stride = max(1, flat.numel() // SAMPLES_PER_LAYER)
    sample = flat[::stride][:SAMPLES_PER_LAYER]
    return sample.to(torch.bfloat16).cpu().view(torch.int16)
