"""NeuroAda: sparse bypass fine-tuning (arXiv 2510.18940) and its adapter format.

The Python API mirrors the CLI: `select_topk`, `attach` / `detach`, `train`, `export`, and
`save_adapter` / `load_adapter`. Names resolve lazily, so importing `neuroada.format` (as the
server does) does not pull in the trainer.
"""

from importlib import import_module

_API = {
    "AdapterError": "neuroada.errors",
    "NeuroAdaConfig": "neuroada.config",
    "SparseAdapter": "neuroada.format",
    "load_adapter": "neuroada.format",
    "read_adapter": "neuroada.format",
    "save_adapter": "neuroada.format",
    "validate_adapter": "neuroada.format",
    "attach": "neuroada.model",
    "detach": "neuroada.model",
    "export": "neuroada.model",
    "select_topk": "neuroada.selection",
    "TrainConfig": "neuroada.trainer",
    "train": "neuroada.trainer",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'neuroada' has no attribute {name!r}")
