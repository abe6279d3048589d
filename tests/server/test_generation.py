"""RunningBatch: a failing row leaves alone, a failing forward changes nothing, split + merge is exact."""

from __future__ import annotations

import pytest
import torch

from server.generation import Failed, Finished, GenerationRequest, RunningBatch, SamplingParams
from tests.helpers import tiny_llama, tiny_tokenizer

PROMPTS = ["hello there", "what does the cow say?", "1 + 2 =", "a"]


def _request(prompt: str, events: dict, n: int = 12, **params) -> GenerationRequest:
    ids = tiny_tokenizer()(prompt, add_special_tokens=False).input_ids
    params = SamplingParams(max_new_tokens=n, ignore_eos=True, **params)
    return GenerationRequest(ids, None, params, lambda e: events.setdefault(prompt, []).append(e))


def _batch() -> RunningBatch:
    tokenizer = tiny_tokenizer()
    return RunningBatch(tiny_llama(seed=0), tokenizer, {tokenizer.eos_token_id}, tokenizer.eos_token_id)


def _run(batch: RunningBatch, events: dict, between_steps=lambda step: None) -> dict[str, Finished | Failed]:
    batch.join([_request(p, events) for p in PROMPTS])
    for step in range(30):
        if not batch:
            break
        between_steps(step)
        batch.step()
    assert not batch
    return {prompt: got[-1] for prompt, got in events.items()}


@pytest.fixture(scope="module")
def solo() -> dict[str, str]:
    return {p: t.text for p, t in _run(_batch(), {}).items()}


def test_a_row_whose_sampling_fails_leaves_alone_and_the_others_keep_their_tokens(solo):
    batch, events = _batch(), {}
    # Logits / 1e-40 overflow to infinity: sampling this row cannot give a token.
    hostile = _request("hi", events, temperature=1e-40)
    batch.join([_request(p, events) for p in PROMPTS[:2]] + [hostile] + [_request(p, events) for p in PROMPTS[2:]])
    assert len(batch) == len(PROMPTS)  # the hostile row never joined
    while batch:
        batch.step()
    failed = events["hi"]
    assert len(failed) == 1 and isinstance(failed[0], Failed) and failed[0].code == "non_finite"
    assert {p: events[p][-1].text for p in PROMPTS} == solo


def test_non_finite_logits_fail_their_row_only(solo, monkeypatch):
    batch, events = _batch(), {}
    real = RunningBatch._forward

    def poisoned(self, *args):  # decode steps only: their rows are the batch's
        logits = real(self, *args)
        for row, r in enumerate(self.requests):
            if r.prompt_ids == tiny_tokenizer()("1 + 2 =", add_special_tokens=False).input_ids:
                logits[row, 5] = float("nan")
        return logits

    def poison_after_three_steps(step):
        if step == 3:
            monkeypatch.setattr(RunningBatch, "_forward", poisoned)

    ended = _run(batch, events, poison_after_three_steps)
    assert isinstance(ended["1 + 2 ="], Failed) and "not finite" in ended["1 + 2 ="].message
    assert sum(isinstance(e, (Finished, Failed)) for e in events["1 + 2 ="]) == 1
    assert {p: ended[p].text for p in PROMPTS if p != "1 + 2 ="} == {p: t for p, t in solo.items() if p != "1 + 2 ="}


def test_a_stop_string_that_raises_fails_its_row_only(solo):
    class Hostile(str):
        def __len__(self):
            raise RuntimeError("no length for you")

    batch, events = _batch(), {}
    tokenizer = tiny_tokenizer()
    bad = GenerationRequest(
        tokenizer("hi", add_special_tokens=False).input_ids,
        None,
        SamplingParams(max_new_tokens=12, stop=(Hostile("x"),)),
        lambda e: events.setdefault("hi", []).append(e),
    )
    with pytest.raises(RuntimeError):
        batch.join([bad])  # the row's state cannot even be built: the batch raises, unchanged
    assert not batch and "hi" not in events
    assert {p: t.text for p, t in _run(batch, events).items()} == solo


def test_a_forward_that_raises_leaves_the_batch_as_it_was(solo, monkeypatch):
    batch, events = _batch(), {}
    real = RunningBatch._forward
    calls = {"n": 0}

    def fails_once_mid_model(self, input_ids, mask, position_ids, cache):
        calls["n"] += 1
        if calls["n"] == 4:  # a decode step: the cache is appended layer by layer, then it raises
            layer = cache.layers[0]
            layer.keys = torch.cat([layer.keys, layer.keys[..., -1:, :]], dim=-2)
            raise RuntimeError("device fell over")
        return real(self, input_ids, mask, position_ids, cache)

    monkeypatch.setattr(RunningBatch, "_forward", fails_once_mid_model)

    def step_with_retry(step):
        if step == 2:
            shape, mask, pending = batch.cache.layers[0].keys.shape, batch.mask.clone(), list(batch.pending)
            with pytest.raises(RuntimeError):
                batch.step()
            assert batch.cache.layers[0].keys.shape == shape
            assert torch.equal(batch.mask, mask) and batch.pending == pending

    ended = _run(batch, events, step_with_retry)
    assert {p: t.text for p, t in ended.items()} == solo


def test_split_then_merge_gives_every_row_its_tokens(solo):
    batch, events = _batch(), {}

    def split_and_step_halves(step):
        if step in (1, 4):
            other = batch.split()
            assert len(batch) == 2 and len(other) == 2
            batch.step()
            other.step()
            batch.merge(other)
            assert not other and len(batch) == 4

    ended = _run(batch, events, split_and_step_halves)
    assert {p: t.text for p, t in ended.items()} == solo
