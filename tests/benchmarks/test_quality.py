"""The quality benchmark's statistics and its learning-rate search's ranking."""

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
quality = sys.modules["quality"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up
spec.loader.exec_module(quality)


@pytest.mark.parametrize(
    "correct, total, expected",
    [(0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)), (10, 10, (0.7225, 1.0)), (194, 500, (0.3463, 0.4314))],
)
def test_wilson_interval_matches_the_textbook_values(correct, total, expected):
    lo, hi = quality.wilson(correct, total)
    assert (round(lo, 4), round(hi, 4)) == expected


def result(correct: int, total: int = 500) -> dict:
    return {"eval": {"val:500": {"correct": correct, "total": total, "accuracy": correct / total}}}


def test_rates_rank_by_validation_accuracy_the_lower_rate_first_on_a_tie():
    records = {1e-2: result(180), 3e-3: result(200), 1e-3: result(200), 3e-4: result(150)}
    assert [lr for lr, _ in quality.ranked_rates(records, "val:500")] == [1e-3, 3e-3, 1e-2, 3e-4]


def test_a_rate_without_that_validation_result_is_left_out():
    records = {3e-3: result(190), 1e-2: {"eval": {"val:all": {"accuracy": 0.9}}}}
    assert [lr for lr, _ in quality.ranked_rates(records, "val:500")] == [3e-3]


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"method": "neuroada", "k": 20, "selection": "random"}, "NeuroAda k = 20, random"),
        ({"method": "lora", "rank": 8}, "LoRA r = 8"),
        ({"method": "base"}, "base"),
        (
            {
                "method": "neuroada",
                "k": 1,
                "selection": "magnitude",
                "adapter": "adapters/gsm8k.safetensors",
                "adapter_sha256": "sha256:fbcee94154d7e385" + "0" * 48,
            },
            "the file gsm8k.safetensors (fbcee941)",
        ),
    ],
)
def test_each_run_is_named_by_what_was_trained_or_by_the_file_evaluated(config, expected):
    assert quality.describe(config) == expected


def test_an_adapter_file_replaced_since_is_another_run(tmp_path):
    path = tmp_path / "gsm8k.safetensors"
    ids = []
    for content in (b"the first file", b"the file that replaced it"):
        path.write_bytes(content)
        ids.append(quality.run_id(argparse.Namespace(task="arithmetic", method="neuroada", adapter=path)))
    assert ids[0] != ids[1]
    assert all(run.startswith("arithmetic-file-gsm8k-") for run in ids)
