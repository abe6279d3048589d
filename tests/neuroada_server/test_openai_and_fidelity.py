"""The official openai client against our /v1 endpoints; small deltas on a bf16 base served unmerged."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from neuroada.base_model import load_base_model
from neuroada.config import NeuroAdaConfig
from neuroada.fingerprint import BaseModelSpec
from neuroada.format import LayerDelta, build_adapter, save_adapter
from neuroada.model import attach, bypasses
from tests.helpers import TINY_NAME, tiny_llama, tiny_tokenizer
from tests.neuroada_server.conftest import (
    RunningServer,
    adapted_model,
    generate,
    long_request,
    make_settings,
    metric,
    offline_greedy,
    wait_for,
)


def test_openai_client_completion_and_streamed_chat(server, store):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    completion = client.completions.create(model="a", prompt="hello there", max_tokens=12, temperature=0)
    assert completion.choices[0].text == offline_greedy(store / "a.safetensors", "hello there", 12)
    assert completion.usage.completion_tokens >= 1

    base = client.completions.create(model=server.engine.model_name, prompt="hello there", max_tokens=12, temperature=0)
    assert base.choices[0].text == offline_greedy(None, "hello there", 12)

    messages = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_chat_content_given_as_text_parts_is_their_joined_text(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    asked = dict(model="a", max_tokens=10, temperature=0)
    text = client.chat.completions.create(messages=[{"role": "user", "content": "weather in Oslo?"}], **asked)
    parts = [{"type": "text", "text": "weather in "}, {"type": "text", "text": "Oslo?"}]
    joined = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **asked)
    assert joined.choices[0].message.content == text.choices[0].message.content


def test_openai_logit_bias_and_penalties(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    a = tiny_tokenizer()("a", add_special_tokens=False).input_ids[0]
    asked = dict(model="a", prompt="hello there", max_tokens=6, temperature=0)
    assert client.completions.create(**asked, logit_bias={str(a): 100}).choices[0].text == "aaaaaa"
    # A token that has appeared is pushed down by 2 (presence) + 2 per time (frequency): few repeats.
    plain = client.completions.create(**asked | {"max_tokens": 24}).choices[0].text
    penalised = client.completions.create(**asked | {"max_tokens": 24}, presence_penalty=2, frequency_penalty=2)
    assert len(set(penalised.choices[0].text)) > len(set(plain))


def test_vllms_sampling_extras_through_the_openai_client(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    a = tiny_tokenizer()("a", add_special_tokens=False).input_ids[0]
    asked = dict(model="a", prompt="hello there", max_tokens=8, temperature=0)
    plain = client.completions.create(**asked).choices[0]
    forced = dict(logit_bias={str(a): 100}, extra_body={"stop_token_ids": [a]})
    stopped = client.completions.create(**asked, **forced)
    assert stopped.choices[0].text == "a" and stopped.choices[0].finish_reason == "stop"
    held = client.completions.create(
        **asked, logit_bias={str(a): 100}, extra_body={"stop_token_ids": [a], "min_tokens": 3}
    )
    assert held.usage.completion_tokens == 4 and held.choices[0].finish_reason == "stop"
    assert held.choices[0].text.endswith("a") and "a" not in held.choices[0].text[:-1]
    penalized = client.completions.create(**asked, extra_body={"repetition_penalty": 2.0}).choices[0]
    assert penalized.text != plain.text
    sampled = client.completions.create(**asked | {"temperature": 1.5}, seed=3, extra_body={"min_p": 1.0}).choices[0]
    assert sampled.text == plain.text  # only the most likely token is ever left to sample


def test_openai_stream_options_include_usage_sends_a_last_usage_chunk(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    asked = dict(model="a", prompt=["hello there", "a"], max_tokens=6, temperature=0, n=2)
    whole = client.completions.create(**asked)
    *chunks, usage = client.completions.create(**asked, stream=True, stream_options={"include_usage": True})

    def counts(usage):  # what the prefix cache held varies between the requests
        return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens

    assert usage.choices == [] and counts(usage.usage) == counts(whole.usage)  # each prompt once, every choice
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    messages = [{"role": "user", "content": "hi"}]
    chat = dict(model="b", messages=messages, max_tokens=6, temperature=0)
    *_, usage = client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True})
    assert usage.choices == [] and counts(usage.usage) == counts(client.chat.completions.create(**chat).usage)
    *_, plain = client.chat.completions.create(**chat, stream=True)  # not asked: the last chunk is a choice's
    assert plain.usage is None and plain.choices[0].finish_reason is not None


def test_openai_logprobs_completion_and_chat_streamed_or_not(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    completion = client.completions.create(model="a", prompt="hello there", max_tokens=8, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == completion.usage.completion_tokens
    for logprob, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 2 and logprob <= 0  # two tokens of one text (U+FFFD) share a key
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    stream = client.completions.create(
        model="a", prompt="hello there", max_tokens=8, temperature=0, logprobs=2, stream=True
    )
    chunks = [chunk.choices[0].logprobs for chunk in stream]
    assert [t for c in chunks for t in c.tokens] == logprobs.tokens
    assert [o for c in chunks for o in c.text_offset] == logprobs.text_offset  # counted on across chunks

    messages = [{"role": "user", "content": "hi"}]
    asked = dict(model="b", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    full = client.chat.completions.create(**asked).choices[0].logprobs.content
    streamed = [
        t for chunk in client.chat.completions.create(**asked, stream=True) for t in chunk.choices[0].logprobs.content
    ]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in full]
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in full)
    assert all(t.bytes == list(t.token.encode()) for t in full)
    plain = client.chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


def test_openai_n_choices_each_sample_as_a_request_of_its_own_with_seed_plus_index(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    asked = dict(model="a", prompt="hello there", max_tokens=8, temperature=1.0, seed=5)
    three = client.completions.create(**asked, n=3)
    alone = [client.completions.create(**asked | {"seed": 5 + i}) for i in range(3)]
    texts = [a.choices[0].text for a in alone]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert [c.text for c in three.choices] == texts and len(set(texts)) > 1
    assert three.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert three.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counted once
    # Several prompts: choice i of prompt p is choice p * n + i; each prompt counted once.
    greedy = dict(model="a", max_tokens=8, temperature=0)
    singles = [client.completions.create(**greedy, prompt=p) for p in ("hello there", "1 + 2 =")]
    batched = client.completions.create(**greedy, prompt=["hello there", "1 + 2 ="], n=2)
    assert [c.text for c in batched.choices] == [s.choices[0].text for s in singles for _ in range(2)]
    assert batched.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)

    messages = [{"role": "user", "content": "hi"}]
    chat = dict(model="b", messages=messages, max_tokens=8, temperature=1.0, seed=9, n=2, logprobs=True)
    full = client.chat.completions.create(**chat)
    texts, roles, finishes, tokens = {0: "", 1: ""}, [], [], {0: [], 1: []}
    for chunk in client.chat.completions.create(**chat, stream=True):
        (c,) = chunk.choices
        texts[c.index] += c.delta.content or ""
        roles += [c.index] if c.delta.role else []
        finishes += [c.index] if c.finish_reason else []
        tokens[c.index] += [t.token for t in c.logprobs.content]
    assert sorted(roles) == sorted(finishes) == [0, 1]  # one role and one finish per choice
    assert texts == {c.index: c.message.content for c in full.choices}
    assert tokens == {c.index: [t.token for t in c.logprobs.content] for c in full.choices}


def test_openai_echo_scores_the_prompt_as_lm_evals_loglikelihood_asks(server, store):
    tokenizer = tiny_tokenizer()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    context = tokenizer("what does the cow say?", add_special_tokens=False).input_ids
    continuation = tokenizer(" moo", add_special_tokens=False).input_ids
    with torch.no_grad():  # the adapter's model's distribution after each position
        expected = (
            adapted_model(store / "a.safetensors")(torch.tensor([context + continuation])).logits[0].log_softmax(-1)
        )

    # lm-eval's `local-completions` loglikelihood request: a batch of token-id prompts, echo, one
    # token, logprobs 1; it reads token_logprobs and top_logprobs past the context, the last one left out.
    body = dict(model="a", prompt=[context + continuation, context], echo=True, max_tokens=1, logprobs=1, temperature=0)
    scored = client.completions.create(**body)
    whole, alone = sorted(scored.choices, key=lambda c: c.index)
    assert [c.index for c in scored.choices] == [0, 1]
    assert scored.usage.prompt_tokens == 2 * len(context) + len(continuation)  # each prompt counted once
    logprobs = whole.logprobs
    assert len(logprobs.tokens) == len(context + continuation) + 1
    assert whole.text.startswith(tokenizer.decode(context + continuation))
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    want = expected[:-1].gather(1, torch.tensor(context + continuation)[1:, None])[:, 0].tolist()
    assert logprobs.token_logprobs[1:-1] == pytest.approx(want, abs=1e-4)
    assert [max(top.values()) for top in logprobs.top_logprobs[1:-1]] == pytest.approx(
        expected[:-1].max(-1).values.tolist(), abs=1e-4
    )
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    assert alone.logprobs.token_logprobs[: len(context)] == logprobs.token_logprobs[: len(context)]

    # Streamed: each choice's echo first, with its tokens' logprobs; then its generated text.
    stream = list(client.completions.create(**body | {"prompt": context + continuation, "stream": True}))
    assert stream[0].choices[0].text == tokenizer.decode(context + continuation)
    assert stream[0].choices[0].logprobs.tokens == logprobs.tokens[:-1]
    assert stream[0].choices[0].logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)  # alone: one C++ call
    assert "".join(ch.choices[0].text for ch in stream) == whole.text
    asked = dict(model="a", prompt="hello there", max_tokens=3, temperature=0)
    echoed = list(client.completions.create(**asked, echo=True, stream=True))  # no logprobs: the echo at once
    assert echoed[0].choices[0].text == "hello there" and echoed[0].choices[0].logprobs is None
    assert (
        "".join(ch.choices[0].text for ch in echoed)
        == "hello there" + client.completions.create(**asked).choices[0].text
    )


def test_openai_n_choices_are_queued_all_or_none(tiny_model_dir, store):
    settings = make_settings(tiny_model_dir, store, max_batch_size=1, max_queued_requests=2)
    body = {"model": "a", "prompt": "hi", "max_tokens": 4, "ignore_eos": True}
    with RunningServer(settings) as s, s.client() as c, ThreadPoolExecutor(1) as pool:
        with long_request(c):  # holds the one batch row: nothing leaves the queue meanwhile
            assert c.post("/v1/completions", json=body | {"n": 3}).status_code == 429  # 3 > 2: none queued
            two = pool.submit(c.post, "/v1/completions", json=body | {"n": 2})  # so both of these fit
            wait_for(lambda: metric(c, "neuroada_queue_depth") >= 2)
            assert metric(c, "neuroada_queue_depth") == 2
        assert two.result(timeout=60).status_code == 200  # once the long request hung up
        assert [ch["index"] for ch in two.result().json()["choices"]] == [0, 1]
        assert metric(c, 'neuroada_generated_tokens_total{adapter="a"}') == 2 * 4


@pytest.mark.parametrize(
    "path, fields, named",
    [
        ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/completions", {"frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/completions", {"logit_bias": {"5": 150}}, "logit_bias"),
        ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
        ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"min_p": 1.5}, "min_p"),
        ("/v1/completions", {"min_tokens": 3}, "min_tokens 3 exceeds the 2 tokens"),
        ("/v1/chat/completions", {"stop_token_ids": [10**6]}, "stop_token_ids: token id 1000000"),
        ("/v1/chat/completions", {"logit_bias": {"999999": 1}}, "logit_bias: token id 999999"),
        ("/v1/completions", {"prompt": [[1, 2], [10**6]]}, "token id 1000000"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"n": 17}, "n"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 'tool_choice: "auto"'),
    ],
)
def test_openai_fields_out_of_range_or_not_implemented_are_refused_not_ignored(server, path, fields, named):
    body = {"model": "a", "max_tokens": 2} | (
        {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    )
    with server.client() as c:
        refused = c.post(path, json=body | fields)
        assert refused.status_code == 422 and named in refused.json()["error"]["message"], refused.text
        defaults = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "n": 1}
        defaults |= {"repetition_penalty": 1, "min_p": 0, "min_tokens": 0, "stop_token_ids": []}
        assert c.post(path, json=body | defaults).status_code == 200


def _small_delta_adapter(model, scale: float):
    """Top-1 magnitude positions (the coarsest bf16 grid) with deltas far below one bf16 ulp there."""
    spec = BaseModelSpec.from_model(model, TINY_NAME)
    probe = tiny_llama(seed=0, dtype=torch.bfloat16)
    found = attach(probe, NeuroAdaConfig(k=1, targets=("q_proj", "v_proj", "o_proj", "down_proj")))
    g = torch.Generator().manual_seed(0)
    layers = {n: LayerDelta(m.indices, torch.randn(m.indices.shape, generator=g) * scale) for n, m in found.items()}
    return build_adapter(layers, base=spec, selection="magnitude")


def test_small_deltas_on_a_bf16_base_are_served_unmerged_with_bypass_output(tmp_path, tiny_model_dir):
    bf16 = tiny_llama(seed=0, dtype=torch.bfloat16)
    adapter = _small_delta_adapter(bf16, scale=2e-3)
    store = tmp_path / "store"
    save_adapter(adapter, store / "small.safetensors")

    # The bypass model: frozen bf16 base, the adapter's values beside it (the training forward).
    # Loaded like the server loads it (from_pretrained keeps the rotary buffers in float32).
    reference = load_base_model(str(tiny_model_dir), dtype=torch.bfloat16)
    attach(reference, NeuroAdaConfig(k=1, targets=("q_proj", "v_proj", "o_proj", "down_proj")))
    for name, m in bypasses(reference).items():
        m.values.data = adapter.layers[name].values.float()
    tokenizer = tiny_tokenizer()
    ids = tokenizer("hello there", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = reference.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    # Pinned: placed at start-up, so its fidelity is known before any request.
    with RunningServer(make_settings(tiny_model_dir, store, dtype="bfloat16", pin="small")) as s, s.client() as c:
        info = c.get("/adapters/small").json()
        assert info["path"] == "unmerged" and info["tier"] == "resident" and info["pinned"]
        assert info["fidelity"]["survived"] < 0.9 and info["fidelity"]["relative_error"] > 0.1
        assert generate(c, "hello there", "small") == expected
        text = c.get("/metrics").text
        # Alone, an unmerged adapter still takes the mixed path; the bf16 weights are never merged.
        assert 'neuroada_steps_total{path="mixed"}' in text
        assert 'neuroada_steps_total{path="merged"}' not in text
        assert s.engine.base_weights_intact()
