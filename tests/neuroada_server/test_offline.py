"""Offline generation through an in-process engine: the server's answers, in order, bounded."""

from __future__ import annotations

import pytest

from neuroada_server.engine import Engine
from neuroada_server.generation import SamplingParams
from neuroada_server.offline import GenerationFailed, generate_offline
from tests.helpers import tiny_tokenizer
from tests.neuroada_server.conftest import PROMPTS, make_settings, offline_greedy


@pytest.mark.parametrize("adapter", [None, "a"])
def test_every_prompt_gets_the_greedy_text_in_order_through_a_window_smaller_than_the_prompts(
    tiny_model_dir, store, adapter
):
    engine = Engine(make_settings(tiny_model_dir, store, max_batch_size=2))
    engine.start()
    try:
        prompts = PROMPTS * 2
        ids = [tiny_tokenizer()(p, add_special_tokens=False)["input_ids"] for p in prompts]
        seen = []
        finished = generate_offline(
            engine, ids, adapter, SamplingParams(max_new_tokens=10), in_flight=3, stall_s=60, on_finished=seen.append
        )
    finally:
        engine.stop()
    adapter_path = store / f"{adapter}.safetensors" if adapter else None
    assert [f.text for f in finished] == [offline_greedy(adapter_path, p, 10) for p in prompts]
    assert sorted(seen) == list(range(len(prompts)))
    assert all(f.prompt_tokens == len(i) and f.completion_tokens <= 10 for f, i in zip(finished, ids))
    assert engine.base_weights_intact()


def test_an_engine_that_never_answers_fails_the_call_after_the_stall_time(tiny_model_dir, store):
    engine = Engine(make_settings(tiny_model_dir, store))  # never started: nothing is decoded
    try:
        with pytest.raises(GenerationFailed, match=r"no generation finished in 0\.2 s"):
            generate_offline(engine, [[1, 2, 3]], None, SamplingParams(max_new_tokens=4), in_flight=1, stall_s=0.2)
    finally:
        engine.stop()


def test_a_failed_generation_names_its_prompt(tiny_model_dir, store):
    engine = Engine(make_settings(tiny_model_dir, store))
    engine.start()
    try:
        # An out-of-vocabulary token id fails its row in the forward pass.
        with pytest.raises(GenerationFailed, match="prompt 1: "):
            generate_offline(
                engine, [[1, 2], [1, 10_000]], None, SamplingParams(max_new_tokens=4), in_flight=1, stall_s=60
            )
    finally:
        engine.stop()
