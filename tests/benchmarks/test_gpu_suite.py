"""The GPU suite runs end to end on tiny shapes (`--smoke`), so a lent GPU's minutes go to numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_suite_runs_its_smoke_shapes_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_suite.json"
    command = [sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--decode-batch", "1", "4"]
    command += ["--mixed-decode-batch", "4", "--out", str(out)]
    env = os.environ | {"TRITON_INTERPRET": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["checks"] and all(check["ok"] for check in result["checks"])
    measured = {(r["batch"], r["compiled"], r["mixed_k"]) for r in result["decode"]}
    plain = {(1, False, None), (1, True, None), (4, False, None), (4, True, None)}
    assert measured == plain | {(4, False, 20), (4, True, 20)}  # mixed: adapters of the largest --k
    assert all(r["step_ms"] > 0 and 0 < r["floor_fraction"] for r in result["decode"])
    compiled = [r["vs_eager"] for r in result["decode"] if r["compiled"]]  # each graph's step against eager's
    assert len(compiled) == 3 and all(c["max_abs_logit_diff"] < 0.1 for c in compiled)
