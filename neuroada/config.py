"""NeuroAda's configuration: which layers get a sparse bypass, and how its k inputs are chosen."""

from __future__ import annotations

from dataclasses import dataclass

from neuroada.format import SELECTIONS

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class NeuroAdaConfig:
    k: int = 1  # inputs selected per output neuron (row) of each target weight
    targets: tuple[str, ...] = LLAMA_TARGETS  # module-name suffixes to adapt
    selection: str = "magnitude"  # magnitude (top-k |w|, the method) | random | reverse (ablations)
    seed: int = 0  # for selection="random"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not self.targets:
            raise ValueError("targets must name at least one module suffix")

    def is_target(self, module_name: str) -> bool:
        return module_name.rsplit(".", 1)[-1] in self.targets
