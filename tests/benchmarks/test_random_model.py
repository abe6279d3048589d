"""The random stand-in for the embedded model (for a machine it cannot reach) and its adapters fit together."""

import subprocess
import sys
from pathlib import Path

from tests.helpers import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_a_random_model_of_a_folders_shape_takes_its_adapters(tmp_path):
    like, out = tmp_path / "like", tmp_path / "random"
    tiny_llama(seed=0).config.save_pretrained(like)  # config and tokenizer only, as a GPU call carries them
    tiny_tokenizer().save_pretrained(like)
    command = [sys.executable, "benchmarks/random_model.py", str(out), "--like", str(like), "--adapters", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    adapters = sorted((out / "adapters").glob("*.safetensors"))
    assert [a.name for a in adapters] == ["random0-k1.safetensors", "random1-k4.safetensors"]
    for adapter in adapters:
        inspect = [sys.executable, "-m", "neuroada.cli", "inspect", str(adapter), "--model", str(out)]
        checked = subprocess.run(inspect, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert checked.returncode == 0 and "valid for base model" in checked.stdout, checked.stdout + checked.stderr
