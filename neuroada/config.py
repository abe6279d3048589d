"""NeuroAda's configuration: which layers get a sparse bypass, and how its k inputs are chosen."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuroada.format import SELECTIONS

SAVED_INPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class NeuroAdaConfig:
    k: int = 1  # inputs selected per output neuron (row) of each target weight
    targets: tuple[str, ...] = LLAMA_TARGETS  # module-name suffixes to adapt
    selection: str = "magnitude"  # magnitude (top-k |w|, the method) | random | reverse (ablations)
    seed: int = 0  # for selection="random"
    # dtype of the layer inputs kept for the values' gradient (CPU float32 training): "bfloat16"
    # halves the bypass's activation memory, rounding x in grad_values only
    saved_inputs: str = "float32"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.saved_inputs not in SAVED_INPUT_DTYPES:
            raise ValueError(f"saved_inputs must be one of {tuple(SAVED_INPUT_DTYPES)}, got {self.saved_inputs!r}")
        if not self.targets:
            raise ValueError("targets must name at least one module suffix")

    def is_target(self, module_name: str) -> bool:
        return module_name.rsplit(".", 1)[-1] in self.targets
