"""NeuroAda: sparse bypass fine-tuning (arXiv 2510.18940) and its adapter format.

The Python API mirrors the CLI: `select_topk`, `attach` / `detach`, `train`, `export`, and
`save_adapter` / `load_adapter`.
"""

from neuroada.config import NeuroAdaConfig
from neuroada.errors import AdapterError
from neuroada.format import SparseAdapter, load_adapter, read_adapter, save_adapter, validate_adapter
from neuroada.model import attach, detach, export
from neuroada.selection import select_topk
from neuroada.trainer import TrainConfig, train

__all__ = [
    "AdapterError",
    "NeuroAdaConfig",
    "SparseAdapter",
    "TrainConfig",
    "attach",
    "detach",
    "export",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "select_topk",
    "train",
    "validate_adapter",
]
