"""Finding target layers and swapping bypasses in and out; exporting the trained deltas.

`attach` replaces each target nn.Linear with a NeuroAdaLinear (selection runs here, once);
`detach` puts the original layers back; `export` turns the trained values into a SparseAdapter.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from neuroada.config import SAVED_INPUT_DTYPES, NeuroAdaConfig
from neuroada.fingerprint import BaseModelSpec, linear_layers, untied_linear_layers
from neuroada.format import LayerDelta, SparseAdapter, build_adapter
from neuroada.layer import NeuroAdaLinear
from neuroada.selection import select_topk

log = logging.getLogger(__name__)


def attach(model: nn.Module, config: NeuroAdaConfig) -> dict[str, NeuroAdaLinear]:
    """Freeze the model and give every target linear layer a zero-initialised sparse bypass."""
    model.requires_grad_(False)
    linears = linear_layers(model)
    targets = {name: m for name, m in linears.items() if config.is_target(name)}
    if not targets:
        raise ValueError(f"no nn.Linear in the model matches targets {config.targets}")
    tied = sorted(targets.keys() - untied_linear_layers(model).keys())
    if tied:
        raise ValueError(
            f"targets {config.targets} include {', '.join(tied)}, whose weight is tied to another parameter "
            "(the input embedding): a delta there would change both, and the server cannot serve it; "
            "leave it out of --targets"
        )
    _warn_left_out(model, linears.keys() - targets.keys())
    bypasses = {}
    for position, (name, linear) in enumerate(targets.items()):
        indices = select_topk(linear.weight, config.k, config.selection, seed=config.seed * 1_000_003 + position)
        bypass = NeuroAdaLinear(linear, indices, SAVED_INPUT_DTYPES[config.saved_inputs])
        _set_module(model, name, bypass)
        bypasses[name] = bypass
    return bypasses


def _warn_left_out(model: nn.Module, left_out: set[str]) -> None:
    """Name the linear layers the targets miss (the output head aside), one pattern per kind:
    a family whose projections have other names must not train half its layers silently."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    missed = [n for n in left_out if model.get_submodule(n) is not head]
    if missed:
        patterns = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in missed})
        log.warning(
            "the targets leave out %d linear layers: %s (pass --targets to adapt them)",
            len(missed),
            ", ".join(patterns),
        )


def bypasses(model: nn.Module) -> dict[str, NeuroAdaLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, NeuroAdaLinear)}


def detach(model: nn.Module) -> None:
    """Remove every bypass, putting the untouched original nn.Linear layers back."""
    for name, bypass in bypasses(model).items():
        _set_module(model, name, bypass.base_layer)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [m.values for m in bypasses(model).values()]


def export(
    model: nn.Module,
    base: BaseModelSpec,
    selection: str,
    training: dict[str, Any] | None = None,
) -> SparseAdapter:
    """The attached bypasses' (indices, values) as an adapter for `base` (values rounded to bf16)."""
    layers = {name: LayerDelta(m.indices, m.values) for name, m in bypasses(model).items()}
    if not layers:
        raise ValueError("the model has no attached NeuroAda bypasses to export")
    return build_adapter(layers, base=base, selection=selection, training=training)


def load_into_bypasses_(model: nn.Module, adapter: SparseAdapter) -> None:
    """Copy an adapter's values into attached bypasses with the same indices (resume or fine-tune)."""
    found = bypasses(model)
    for name, d in adapter.layers.items():
        if name not in found or not torch.equal(found[name].indices.cpu(), d.indices.long()):
            raise ValueError(f"layer {name}: no attached bypass with the adapter's indices")
        found[name].values.data.copy_(d.values.float())


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
