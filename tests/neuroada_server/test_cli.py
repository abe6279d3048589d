"""`neuroada eval`, registered by `neuroada_server.cli`: the serving engine's greedy answers, scored."""

from __future__ import annotations

import json

import pytest

from neuroada.cli import main
from neuroada.data import build_prompt
from neuroada.evaluate import is_correct
from neuroada.format import save_adapter
from tests.helpers import random_adapter, synthetic_examples, tiny_llama
from tests.neuroada_server.conftest import offline_greedy


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(synthetic_examples(6)))
    return path


def test_eval_scores_the_greedy_text_of_the_adapter_as_served(tiny_model_dir, store, data, tmp_path, capsys):
    out = tmp_path / "eval.jsonl"
    adapter = store / "b.safetensors"
    args = ["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--data", str(data)]
    # A batch of 2 and 5 prompts: the queue (2 more) refills as rows finish.
    assert main(args + ["--limit", "5", "--max-new-tokens", "8", "--batch-size", "2", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    examples = synthetic_examples(6)[:5]
    assert [r["generation"] for r in records] == [offline_greedy(adapter, build_prompt(e), 8) for e in examples]
    assert [r["correct"] for r in records] == [is_correct(r["generation"], r["answer"]) for r in records]
    correct = sum(r["correct"] for r in records)
    assert f"data.json [b.safetensors]: accuracy {correct / 5:.4f} ({correct}/5)" in capsys.readouterr().out


@pytest.mark.parametrize(("answer", "max_new_tokens"), [("answer2", 32), ("4", 256)])
def test_choice_answers_get_a_short_generation_by_default(tiny_model_dir, tmp_path, capsys, answer, max_new_tokens):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "Which one?", "input": "", "output": "", "answer": answer}]))
    out = tmp_path / "eval.jsonl"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(path), "--out", str(out)]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    prompt = build_prompt({"instruction": "Which one?"})
    assert record["generation"] == offline_greedy(None, prompt, max_new_tokens)
    assert record["generation"] != offline_greedy(None, prompt, 256 if max_new_tokens == 32 else 32)
    assert "data.json [base]" in capsys.readouterr().out


def test_an_adapter_for_another_base_is_refused_by_name(tiny_model_dir, data, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_adapter(random_adapter(tiny_llama(seed=5), k=1, seed=0), other)
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(other), "--data", str(data)]) == 1
    err = capsys.readouterr().err
    assert f"error: {other}: adapter 'adapter' is in the store but invalid" in err


def test_a_prompt_past_the_context_length_is_refused_before_generating(tiny_model_dir, data, capsys):
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--max-new-tokens", "30000"]
    assert main(args) == 1
    assert "exceed the model's context length of 20100" in capsys.readouterr().err


def test_a_missing_file_is_named(tiny_model_dir, data, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(missing), "--data", str(data)]) == 1
    assert f"error: no such file: {missing}" in capsys.readouterr().err
