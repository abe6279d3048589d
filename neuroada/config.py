"""NeuroAda's configuration: which layers get a sparse bypass, and how its k inputs are chosen."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuroada.format import SELECTIONS

SAVED_INPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # q/k/v and gate/up fused

# Every attention and MLP projection of a decoder layer, by `config.model_type`: what `neuroada
# train` adapts when no --targets is given (the paper's setting). The output head is left out:
# in most small models it is tied to the input embedding, and a delta there cannot be served.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": LLAMA_TARGETS,  # SmolLM2 too
    "mistral": LLAMA_TARGETS,
    "qwen2": LLAMA_TARGETS,
    "qwen3": LLAMA_TARGETS,
    "gemma": LLAMA_TARGETS,
    "gemma2": LLAMA_TARGETS,
    "gemma3_text": LLAMA_TARGETS,
    "olmo": LLAMA_TARGETS,
    "olmo2": LLAMA_TARGETS,
    "phi3": PHI3_TARGETS,
}


def default_targets(model_type: str) -> tuple[str, ...]:
    """The family's projections; Llama's names for a family not in the table (`attach` then
    warns about every linear layer they leave out)."""
    return DEFAULT_TARGETS.get(model_type, LLAMA_TARGETS)


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
