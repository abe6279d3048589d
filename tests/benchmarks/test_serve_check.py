"""The one-command server check (for a lent GPU) runs end to end, here on the CPU with a tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuroada.format import save_adapter
from tests.helpers import random_adapter, tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_server_check_passes_on_the_cpu(tmp_path, compiled):
    model_dir, out = tmp_path / "model", tmp_path / "serve_check.json"
    model = tiny_llama(seed=0)
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    adapters = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for seed, path in enumerate(adapters):
        save_adapter(random_adapter(model, k=2 + seed, seed=seed, scale=0.3), path)
    command = [sys.executable, "benchmarks/serve_check.py", "--model", str(model_dir), "--new-tokens", "8"]
    command += ["--adapters", *map(str, adapters), "--out", str(out)]
    env = dict(os.environ)
    if compiled:  # the torch twins: our C++ kernels are not traceable
        command += ["--compile-decode", "1,4"]
        env["NEUROADA_CPU_KERNELS"] = "0"
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = {c["check"]: c for c in json.loads(out.read_text())["checks"]}
    assert all(c["ok"] for c in checks.values()), checks
    assert checks["mixed batch equals alone"]["required"]  # float32 on the CPU: equality is required
    assert checks["mixed batch equals alone"]["detail"].startswith("9/9 equal")
    assert checks["base burst (reported)"]["detail"].startswith("512 tokens")  # 16 requests of 32
    assert ("compiled decode ran" in checks) == compiled
