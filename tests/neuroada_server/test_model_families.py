"""Every supported model family end to end: `neuroada train` with its default targets, then the
server's engine serves the adapter merged (alone) and mixed (beside the base), each output equal
to offline generation with the adapter merged by the per-layer kernels."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from neuroada.cli import main as neuroada
from neuroada.data import build_prompt
from neuroada.format import read_adapter
from neuroada.inplace import apply_adapter_
from neuroada_server.engine import Engine
from neuroada_server.generation import Failed, Finished, GenerationRequest, SamplingParams
from tests.helpers import FAMILIES, synthetic_examples, tiny_family, tiny_tokenizer
from tests.neuroada_server.conftest import make_settings

PROMPT = build_prompt({"instruction": "What does the cow say?", "input": ""})  # the training template
NEW_TOKENS = 10


def _offline(folder, adapter_path, ids: list[int]) -> tuple[str, torch.Tensor]:
    """Greedy text, and the prompt's next-token logits [V]."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if adapter_path is not None:
        apply_adapter_(model, read_adapter(adapter_path))
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
        logits = model(torch.tensor([ids])).logits[0, -1]
    return tiny_tokenizer().decode(out[0, len(ids) :], skip_special_tokens=True), logits


def _serve(engine: Engine, requests: list[tuple[str | None, list[int]]]) -> list[str]:
    """Submit all requests before the worker starts: they are admitted into one batch."""
    results: list[Finished | Failed | None] = [None] * len(requests)
    done = threading.Semaphore(0)

    def listener(i):
        def on_event(event):
            if isinstance(event, (Finished, Failed)):
                results[i] = event
                done.release()

        return on_event

    for i, (adapter, ids) in enumerate(requests):
        engine.submit(GenerationRequest(ids, adapter, SamplingParams(max_new_tokens=NEW_TOKENS), listener(i)))
    engine.start()
    for _ in requests:
        assert done.acquire(timeout=120)
    engine.stop()
    assert all(isinstance(r, Finished) for r in results), results
    return [r.text for r in results]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_trains_with_its_default_targets_and_serves_merged_and_mixed(family, tmp_path):
    folder, store = tmp_path / "model", tmp_path / "adapters"
    tiny_family(family).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(synthetic_examples(32)))
    adapter_path = store / "task.safetensors"
    argv = ["train", "--model", str(folder), "--data", str(data), "--out", str(adapter_path)]
    argv += ["--top-k", "2", "--max-steps", "8", "--batch-size", "8", "--lr", "5e-2", "--max-length", "200"]
    assert neuroada(argv) == 0
    trained = read_adapter(adapter_path)
    assert len(trained.layers) == 2 * (4 if family == "phi3" else 7)

    ids = tiny_tokenizer()(PROMPT, add_special_tokens=False).input_ids
    expected, adapted = _offline(folder, adapter_path, ids)
    base_text, base = _offline(folder, None, ids)
    # The adapter changes the model (random tiny Gemmas repeat one token whatever the weights,
    # so the check is on the logits).
    assert not torch.allclose(adapted, base, rtol=1e-3, atol=1e-3)
    # Pinned: resident from start-up, so `_serve`'s requests are all ready when the worker starts
    # (a lazily loaded adapter could land after the base request has finished alone).
    settings = make_settings(folder, store, pin="task")
    engine = Engine(settings)
    assert _serve(engine, [("task", ids)]) == [expected]
    assert engine.metrics.steps.labels(path="merged")._value.get() > 0
    engine = Engine(settings)
    assert _serve(engine, [("task", ids), (None, ids)]) == [expected, base_text]
    assert engine.metrics.steps.labels(path="mixed")._value.get() > 0
    assert engine.base_weights_intact()
