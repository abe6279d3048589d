"""Imports point one way: neuroada_kernels <- neuroada <- neuroada_server; the server never imports the trainer."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("neuroada_kernels", {"neuroada", "neuroada_server"}),
        ("neuroada.format", {"neuroada_server"}),
        ("neuroada.cli", {"neuroada_server"}),
        ("neuroada_server.app", {"neuroada.trainer", "neuroada.layer", "neuroada.model"}),
    ],
)
def test_imports_point_one_way(module, forbidden):
    loaded = loaded_after_import(module)
    assert not {m for m in loaded if m in forbidden or any(m.startswith(f + ".") for f in forbidden)}
