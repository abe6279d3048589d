"""RunningBatch: a failing row leaves alone, a failing forward changes nothing, split + merge is exact.

Every test runs on both forwards: ours for Llama-shaped models ("auto") and Hugging Face's ("hf").
Faults are injected through the model's own modules, which both forwards call.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from neuroada_server.generation import (
    Failed,
    Finished,
    GenerationRequest,
    PromptLogprobs,
    RunningBatch,
    SamplingParams,
    TokenLogprob,
)
from tests.helpers import tiny_llama, tiny_tokenizer

PROMPTS = ["hello there", "what does the cow say?", "1 + 2 =", "a"]


def _request(prompt: str, events: dict, n: int = 12, **params) -> GenerationRequest:
    ids = tiny_tokenizer()(prompt, add_special_tokens=False).input_ids
    params = SamplingParams(max_new_tokens=n, ignore_eos=True, **params)
    return GenerationRequest(ids, None, params, lambda e: events.setdefault(prompt, []).append(e))


@pytest.fixture(params=["auto", "hf"])
def runner(request) -> str:
    return request.param


def _batch(runner: str = "auto") -> RunningBatch:
    tokenizer = tiny_tokenizer()
    return RunningBatch(tiny_llama(seed=0), tokenizer, {tokenizer.eos_token_id}, tokenizer.eos_token_id, runner)


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
    return {p: t.text for p, t in _run(_batch("hf"), {}).items()}


def test_both_forwards_give_the_same_tokens(solo):
    assert {p: t.text for p, t in _run(_batch("auto"), {}).items()} == solo


def test_a_row_whose_sampling_fails_leaves_alone_and_the_others_keep_their_tokens(solo, runner):
    batch, events = _batch(runner), {}
    # Logits / 1e-40 overflow to infinity: sampling this row cannot give a token.
    hostile = _request("hi", events, temperature=1e-40)
    batch.join([_request(p, events) for p in PROMPTS[:2]] + [hostile] + [_request(p, events) for p in PROMPTS[2:]])
    assert len(batch) == len(PROMPTS)  # the hostile row never joined
    while batch:
        batch.step()
    failed = events["hi"]
    assert len(failed) == 1 and isinstance(failed[0], Failed) and failed[0].code == "non_finite"
    assert {p: events[p][-1].text for p in PROMPTS} == solo


def test_non_finite_logits_fail_their_row_only(solo, runner):
    batch, events = _batch(runner), {}
    poisoned_prompt = tiny_tokenizer()("1 + 2 =", add_special_tokens=False).input_ids

    def poison(module, inputs, logits):  # [B, (1,) V] of a decode step: the batch's rows
        for row, r in enumerate(batch.requests):
            if r.prompt_ids == poisoned_prompt:
                logits[row, ..., 5] = float("nan")

    def poison_after_three_steps(step):
        if step == 3:
            batch.model.lm_head.register_forward_hook(poison)

    ended = _run(batch, events, poison_after_three_steps)
    assert isinstance(ended["1 + 2 ="], Failed) and "not finite" in ended["1 + 2 ="].message
    assert sum(isinstance(e, (Finished, Failed)) for e in events["1 + 2 ="]) == 1
    assert {p: ended[p].text for p in PROMPTS if p != "1 + 2 ="} == {p: t for p, t in solo.items() if p != "1 + 2 ="}


def test_a_stop_string_that_raises_fails_its_row_only(solo, runner):
    class Hostile(str):
        def __len__(self):
            raise RuntimeError("no length for you")

    batch, events = _batch(runner), {}
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


def test_a_forward_that_raises_leaves_the_batch_as_it_was(solo, runner):
    batch, events = _batch(runner), {}
    calls = {"n": 0}

    def fails_in_the_second_layer(module, inputs):
        # The first layer has written this step's keys and values to the cache by now.
        calls["n"] += 1
        if calls["n"] == 4:  # a decode step
            raise RuntimeError("device fell over")

    batch.model.model.layers[1].mlp.register_forward_pre_hook(fails_in_the_second_layer)

    def step_with_retry(step):
        if step == 2:
            rows, pending = batch.requests, list(batch.pending)
            with pytest.raises(RuntimeError):
                batch.step()
            assert batch.requests == rows and batch.pending == pending

    ended = _run(batch, events, step_with_retry)
    assert calls["n"] > 4
    assert {p: t.text for p, t in ended.items()} == solo


def test_split_then_merge_gives_every_row_its_tokens(solo, runner):
    batch, events = _batch(runner), {}

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


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_the_models_log_softmax_at_each_generated_token(runner, temperature):
    batch, events = _batch(runner), {}
    asks = _request("hello there", events, n=6, temperature=temperature, seed=3, logprobs=3)
    beside = _request("1 + 2 =", events, n=6)
    batch.join([asks, beside])
    while batch:
        batch.step()
    done = events["hello there"][-1]
    assert isinstance(done, Finished) and len(done.logprobs) == done.completion_tokens == 6
    # The deltas carry the same tokens, each once, in order.
    streamed = [t for e in events["hello there"][:-1] for t in e.logprobs]
    assert streamed == list(done.logprobs[: len(streamed)])
    assert events["1 + 2 ="][-1].logprobs is None and all(not e.logprobs for e in events["1 + 2 ="][:-1])

    # The model's own distribution at each position (before temperature), from a whole-sequence forward.
    tokens = [t.token for t in done.logprobs]
    ids = torch.tensor([asks.prompt_ids + tokens])
    with torch.no_grad():
        expected = batch.model(ids).logits[0, len(asks.prompt_ids) - 1 : -1].log_softmax(-1)  # [6, V]
    for position, got in enumerate(done.logprobs):
        assert got.logprob == pytest.approx(float(expected[position, got.token]), abs=1e-4)
        top = expected[position].topk(3)
        assert [i for i, _ in got.top] == top.indices.tolist()
        assert [lp for _, lp in got.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        if temperature == 0:
            assert got.token == got.top[0][0]


def test_prompt_logprobs_are_the_models_log_softmax_at_each_prompt_token(runner):
    batch, events = _batch(runner), {}
    asks = _request("what does the cow say?", events, n=3, prompt_logprobs=2)
    short = _request("a", events, n=3, prompt_logprobs=0)  # one token: nothing to score but itself
    beside = _request("1 + 2 =", events, n=3)
    batch.join([asks, short, beside])  # unequal lengths: our forward packs them
    while batch:
        batch.step()
    first, *_, done = events["what does the cow say?"]
    assert isinstance(first, PromptLogprobs) and isinstance(done, Finished)
    assert done.prompt_logprobs == first.logprobs and len(first.logprobs) == len(asks.prompt_ids)
    assert [t.token for t in first.logprobs] == asks.prompt_ids
    assert first.logprobs[0].logprob is None and first.logprobs[0].top == ()
    assert events["a"][0].logprobs == (TokenLogprob(short.prompt_ids[0], None),)
    assert (
        not any(isinstance(e, PromptLogprobs) for e in events["1 + 2 ="])
        and events["1 + 2 ="][-1].prompt_logprobs is None
    )

    with torch.no_grad():
        expected = batch.model(torch.tensor([asks.prompt_ids])).logits[0, :-1].log_softmax(-1)  # [S - 1, V]
    for position, got in enumerate(first.logprobs[1:]):
        assert got.logprob == pytest.approx(float(expected[position, got.token]), abs=1e-4)
        top = expected[position].topk(2)
        assert [i for i, _ in got.top] == top.indices.tolist()
        assert [lp for _, lp in got.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    plain, alone = _batch(runner), {}
    plain.join([_request("what does the cow say?", alone, n=3)])
    while plain:
        plain.step()
    assert done.text == alone["what does the cow say?"][-1].text  # scoring its prompt changes nothing it generates


def test_prompt_logprobs_of_a_long_prompt_are_scored_a_chunk_at_a_time(monkeypatch):
    monkeypatch.setattr("neuroada_server.generation.PROMPT_CHUNK", 3)  # chunks of 3 positions, the last ragged
    batch, events = _batch(), {}
    asks = _request("what does the cow say? it says moo", events, n=1, prompt_logprobs=1)
    batch.join([asks])
    with torch.no_grad():
        expected = batch.model(torch.tensor([asks.prompt_ids])).logits[0, :-1].log_softmax(-1)
    scored = events["what does the cow say? it says moo"][0].logprobs
    assert len(scored) == len(asks.prompt_ids) > 7
    got = [t.logprob for t in scored[1:]]
    assert got == pytest.approx(expected.gather(1, torch.tensor(asks.prompt_ids[1:])[:, None])[:, 0].tolist(), abs=1e-4)


def test_an_eos_tokens_logprob_is_listed_though_its_text_is_not():
    events = {}
    batch = _batch()
    batch.join([_request("hello there", events, n=1, logprobs=0)])
    (first,) = events["hello there"][-1].logprobs  # the greedy first token
    tokenizer, events = tiny_tokenizer(), {}
    ends = RunningBatch(tiny_llama(seed=0), tokenizer, {first.token}, tokenizer.eos_token_id)  # it now ends it
    asks = _request("hello there", events, n=5, logprobs=0)
    ends.join([GenerationRequest(asks.prompt_ids, None, replace(asks.params, ignore_eos=False), asks.on_event)])
    done = events["hello there"][-1]
    assert done.finish_reason == "stop" and done.text == "" and done.completion_tokens == 1
    assert done.logprobs == (first,)  # as vLLM and OpenAI list it: lm-eval drops it as the generated token


def test_logit_bias_and_penalties_change_what_is_sampled_as_openai_defines_them(solo, runner):
    batch, events = _batch(runner), {}
    bias = ((7, 5.0), (9, -100.0))
    adjusted = _request("hello there", events, n=10, logit_bias=bias, frequency_penalty=1.5, presence_penalty=0.5)
    beside = _request("1 + 2 =", events, n=12)  # no adjustment: as alone
    batch.join([replace(adjusted, params=replace(adjusted.params, logprobs=0)), beside])
    while batch:
        batch.step()
    got = [t.token for t in events["hello there"][-1].logprobs]

    # The definition, greedily over whole-sequence forwards: logit + bias - frequency * count - presence.
    ids, counts = list(adjusted.prompt_ids), {}
    with torch.no_grad():
        for _ in range(10):
            logits = batch.model(torch.tensor([ids])).logits[0, -1].float()
            for token, b in bias:
                logits[token] += b
            for token, count in counts.items():
                logits[token] -= 1.5 * count + 0.5
            ids.append(int(logits.argmax()))
            counts[ids[-1]] = counts.get(ids[-1], 0) + 1
    assert got == ids[len(adjusted.prompt_ids) :]
    assert events["hello there"][-1].text != solo["hello there"][: len(events["hello there"][-1].text)]
    assert events["1 + 2 ="][-1].text == solo["1 + 2 ="]


def _generate(batch: RunningBatch, requests: list[GenerationRequest]) -> None:
    batch.join(requests)
    for _ in range(64):
        if not batch:
            return
        batch.step()
    raise AssertionError("the batch did not finish")


def _greedy_reference(model, prompt_ids: list[int], n: int, adjust) -> list[int]:
    """n greedy tokens over whole-sequence forwards, `adjust(logits, generated)` applied at each step."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            adjust(logits, ids[len(prompt_ids) :])
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


def test_repetition_penalty_divides_seen_tokens_positive_logits_and_multiplies_negative_ones(solo, runner):
    batch, events = _batch(runner), {}
    penalized = _request("hello there", events, n=10, repetition_penalty=1.8, logprobs=0)
    beside = _request("1 + 2 =", events, n=12)  # no adjustment: as alone
    batch.join([penalized, beside])
    while batch:
        batch.step()
    got = [t.token for t in events["hello there"][-1].logprobs]

    def penalize(logits, generated):  # the prompt's tokens count as seen, as in vLLM and Hugging Face
        seen = sorted(set(penalized.prompt_ids) | set(generated))
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.8, logits[seen] * 1.8)

    assert got == _greedy_reference(batch.model, penalized.prompt_ids, 10, penalize)
    assert events["hello there"][-1].text != solo["hello there"]
    assert events["1 + 2 ="][-1].text == solo["1 + 2 ="]


def test_min_tokens_masks_eos_and_stop_tokens_until_that_many_are_generated():
    tokenizer = tiny_tokenizer()
    events = {}
    _generate(_batch(), [_request("hello there", events, n=1, logprobs=0)])
    (eos,) = [t.token for t in events["hello there"][-1].logprobs]  # the greedy first token ends the text here
    batch = RunningBatch(tiny_llama(seed=0), tokenizer, {eos}, tokenizer.eos_token_id)
    asks = _request("hello there", events, n=12, logprobs=0)

    def mask(logits, generated):  # min_tokens 3: eos (and the stop token, below) cannot come sooner
        if len(generated) < 3:
            logits[eos] = float("-inf")

    held = _greedy_reference(batch.model, asks.prompt_ids, 12, mask)
    # A stop token the text reaches after the third token and not before: masking it changes nothing sooner.
    stop = next(token for i, token in enumerate(held) if i >= 3 and token not in held[:3] + [eos])
    params = replace(asks.params, ignore_eos=False, min_tokens=3, stop_token_ids=(stop,))
    _generate(batch, [replace(asks, params=params)])
    done = events["hello there"][-1]
    ends = next(i for i, token in enumerate(held) if i >= 3 and token in (eos, stop)) + 1
    assert [t.token for t in done.logprobs] == held[:ends] and done.completion_tokens == ends
    assert done.finish_reason == "stop"
    # A stop token's text stays in the answer (it is no special token here); eos's does not.
    kept = held[:ends] if held[ends - 1] == stop else held[: ends - 1]
    assert done.text == tokenizer.decode(kept, skip_special_tokens=True)


def test_a_stop_token_ends_the_text_and_keeps_its_own(solo):
    events, tokenizer = {}, tiny_tokenizer()
    batch = _batch()
    _generate(batch, [_request("hello there", events, n=6, logprobs=0)])
    greedy = [t.token for t in events["hello there"][-1].logprobs]
    stop_at = next(i for i, token in enumerate(greedy) if token not in greedy[:i])  # its first occurrence
    events = {}
    asks = _request("hello there", events, n=6, stop_token_ids=(greedy[stop_at],))
    _generate(batch, [replace(asks, params=replace(asks.params, ignore_eos=False))])
    done = events["hello there"][-1]
    assert done.finish_reason == "stop" and done.completion_tokens == stop_at + 1
    assert done.text == tokenizer.decode(greedy[: stop_at + 1], skip_special_tokens=True)


def test_min_p_of_one_samples_only_the_most_likely_token(solo, runner):
    batch, events = _batch(runner), {}
    batch.join([_request(p, events, temperature=1.5, seed=7, min_p=1.0) for p in PROMPTS])
    while batch:
        batch.step()
    assert {p: events[p][-1].text for p in PROMPTS} == solo
