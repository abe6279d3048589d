"""What `pip install .` installs (the Dockerfile's install): every package, whole, under a name of its own."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name != "tests")


def test_every_package_is_named_for_the_project():
    # A top-level `kernels` of ours once shadowed the Hub package transformers imports under that name.
    assert PACKAGES == ["neuroada", "neuroada_kernels", "neuroada_server"]


def test_the_wheel_holds_every_module_and_kernel_source(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    # setuptools is already here (torch depends on it), so the build needs no network.
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", "./source"]
    subprocess.run(build, cwd=tmp_path, check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        p.relative_to(source).as_posix()
        for package in PACKAGES
        for p in (source / package).rglob("*")
        if p.suffix in {".py", ".cpp", ".h"}
    }
    assert len(sources) > 50
    assert sources - files == set()
