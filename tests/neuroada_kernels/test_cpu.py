"""The C++ kernels' build directory and lock: one build per environment, and a build killed half-way never
blocks the processes after it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from neuroada_kernels import cpu_kernels
from neuroada_kernels.cpu import build_directory, build_lock

ROOT = Path(__file__).resolve().parents[2]

# A builder in its own process: takes the lock, makes torch's lock file as a build does, says so,
# then holds both until its stdin closes.
HOLDER = """
import sys
from pathlib import Path
from neuroada_kernels.cpu import build_lock
d = Path(sys.argv[1])
with build_lock(d):
    (d / "lock").touch()
    print("held", flush=True)
    sys.stdin.read()
    (d / "lock").unlink()
"""


def start_holder(build_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(build_dir)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def acquire_in_thread(build_dir: Path) -> threading.Event:
    """Takes the lock on a thread, notes whether torch's lock file was gone inside it, lets go."""
    acquired = threading.Event()

    def take() -> None:
        with build_lock(build_dir):
            if not (build_dir / "lock").exists():
                acquired.set()

    threading.Thread(target=take, daemon=True).start()
    return acquired


def test_a_lock_file_left_by_a_dead_build_is_removed(tmp_path: Path):
    (tmp_path / "lock").touch()  # as fresh as a build killed a moment ago
    with build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_a_live_build_is_waited_for(tmp_path: Path):
    holder = start_holder(tmp_path)
    try:
        acquired = acquire_in_thread(tmp_path)
        assert not acquired.wait(1.0)  # its lock file stays while it builds
        assert (tmp_path / "lock").exists()
        holder.stdin.close()
        assert acquired.wait(30)
    finally:
        holder.kill()
        holder.wait()


def test_a_build_killed_while_holding_the_lock_releases_it(tmp_path: Path):
    holder = start_holder(tmp_path)
    acquired = acquire_in_thread(tmp_path)
    assert not acquired.wait(0.5)
    assert (tmp_path / "lock").exists()  # torch's own lock would wait on this forever once its maker is gone
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert acquired.wait(30)


@pytest.mark.skipif(cpu_kernels() is None, reason="the C++ CPU kernels could not be built here")
def test_the_kernels_load_beside_a_lock_file_a_killed_build_left(tmp_path: Path):
    """The hang this lock exists for: a built module, torch's lock file beside it, a new process."""
    root = tmp_path / "extensions"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(root))
    code = "from neuroada_kernels.cpu import build_directory; print(build_directory())"
    build_dir = Path(
        subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, text=True, capture_output=True, check=True
        ).stdout.strip()
    )
    shutil.copytree(build_directory(), build_dir)  # the build this process made: nothing to rebuild
    (build_dir / "lock").touch()
    code = "from neuroada_kernels import cpu_kernels; print(cpu_kernels() is not None)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
    assert not (build_dir / "lock").exists()


def test_each_environment_builds_in_its_own_directory(monkeypatch):
    """Two environments' builds (different include paths) must not replace each other's."""
    here = build_directory()
    assert build_directory() == here
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv/lib/python3/site-packages/torch/__init__.py")
    assert build_directory() != here and build_directory().parent == here.parent
