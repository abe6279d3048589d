"""Generation through a real server equals offline generation; adapters switch exactly; the prefix
cache serves a prompt's blocks to later prompts of the same adapter version only."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from neuroada.format import adapter_to_bytes, save_adapter
from tests.helpers import random_adapter, tiny_llama
from tests.neuroada_server.conftest import (
    LONG_TOKENS,
    PROMPTS,
    RunningServer,
    generate,
    long_request,
    make_settings,
    metric,
    offline_greedy,
    wait_for,
)


def test_greedy_output_equals_offline_merged_generation(server, store):
    with server.client() as c:
        for adapter in [None, "a", "b"]:
            path = None if adapter is None else store / f"{adapter}.safetensors"
            for prompt in PROMPTS[:2]:
                assert generate(c, prompt, adapter) == offline_greedy(path, prompt, 12), (adapter, prompt)
        # Adapters really change the output (otherwise the test above proves little).
        assert generate(c, PROMPTS[0], "a") != generate(c, PROMPTS[0], None)


def test_concurrent_requests_over_four_adapters_and_base_each_match_offline(server, store):
    jobs = [(adapter, prompt) for adapter in [None, "a", "b", "c", "d"] for prompt in PROMPTS]
    expected = {
        job: offline_greedy(None if job[0] is None else store / f"{job[0]}.safetensors", job[1], 10) for job in jobs
    }
    with server.client() as c, ThreadPoolExecutor(max_workers=12) as pool:
        interleaved = jobs[::2] + jobs[1::2]
        results = list(pool.map(lambda job: (job, generate(c, job[1], job[0], n=10)), interleaved * 2))
    for job, text in results:
        assert text == expected[job], job
    served = {a["name"]: a["requests_served"] for a in server.engine.catalog.page()[1]}
    assert served == {"a": 8, "b": 8, "c": 8, "d": 8}
    assert server.engine.base_weights_intact()


def test_switching_is_lazy_between_batches_of_the_same_adapter(server):
    with server.client() as c:
        generate(c, "x", "a")
        switches = server.engine.metrics.switches._value.get()
        for _ in range(3):
            generate(c, "x", "a")
        assert server.engine.metrics.switches._value.get() == switches
        generate(c, "x", "b")
        assert server.engine.metrics.switches._value.get() == switches + 1


def test_stream_sends_text_deltas_that_add_up_to_the_full_text(server):
    with server.client() as c:
        full = generate(c, "hello there", "a", n=16)
        with c.stream(
            "POST",
            "/generate",
            params={"adapter": "a"},
            json={"prompt": "hello there", "max_new_tokens": 16, "stream": True},
        ) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert "".join(p["text"] for p in payloads) == full
    assert payloads[-1]["finish_reason"] in ("length", "stop")
    assert payloads[-1]["usage"]["completion_tokens"] >= 1


def test_sampling_is_seeded_and_stop_strings_cut_the_text(server):
    body = {"prompt": "hello", "max_new_tokens": 20, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7}
    with server.client() as c:
        first = c.post("/generate", json=body).json()["text"]
        assert c.post("/generate", json=body).json()["text"] == first
        greedy = generate(c, "hello", None, n=20)
        stop = greedy[3:5]
        cut = c.post("/generate", json={"prompt": "hello", "max_new_tokens": 20, "stop": [stop]}).json()
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == greedy[: greedy.find(stop)]


def test_a_client_that_disconnects_stops_its_generation(server):
    with server.client() as c, long_request(c):
        pass  # generation is running; now hang up
    with server.client() as c:
        cancelled = 'neuroada_requests_total{adapter="base",status="499"}'
        wait_for(lambda: metric(c, cancelled) >= 1)
        assert metric(c, cancelled) == 1
        assert metric(c, 'neuroada_generated_tokens_total{adapter="base"}') < LONG_TOKENS


def test_a_failing_step_fails_only_its_requests_and_reverts(server, monkeypatch):
    from neuroada_server.generation import RunningBatch

    real = RunningBatch.step

    def flaky(self, adapters):
        if any(r.adapter == "c" for r in self.requests):
            raise RuntimeError("device fell over")
        return real(self, adapters)

    monkeypatch.setattr(RunningBatch, "step", flaky)
    with server.client() as c:
        r = c.post("/generate", params={"adapter": "c"}, json={"prompt": "hi", "max_new_tokens": 4})
        assert r.status_code == 500 and "device fell over" in r.json()["error"]["message"]
        assert server.engine.applied is None  # reverted
        assert generate(c, "hello there", "a") == generate(c, "hello there", "a")
    assert server.engine.base_weights_intact()


def test_adapters_sharing_an_index_set_switch_exactly(tiny_model_dir, tmp_path):
    store = tmp_path / "shared"
    model = tiny_llama(seed=0)
    save_adapter(random_adapter(model, k=3, seed=5, scale=0.3), store / "x.safetensors")
    save_adapter(random_adapter(model, k=3, seed=5, scale=0.6), store / "y.safetensors")  # same indices
    with RunningServer(make_settings(tiny_model_dir, store)) as s, s.client() as c:
        for name in ["x", "y", "x", None, "y"]:
            path = store / f"{name}.safetensors" if name else None
            assert generate(c, "hello there", name) == offline_greedy(path, "hello there", 12)
        x, y = s.engine.catalog.resident("x"), s.engine.catalog.resident("y")
        assert x.delta.offsets is y.delta.offsets  # one copy of the shared index set
        assert s.engine.base_weights_intact()


LONG_PROMPT = "Tom has 3 apples and buys 5 more; Ann has twice as many. How many do they have?"  # 81 bytes


def usage_of(client, prompt: str, adapter: str | None) -> tuple[str, dict]:
    params = {"adapter": adapter} if adapter else {}
    r = client.post("/generate", params=params, json={"prompt": prompt, "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    return r.json()["text"], r.json()["usage"]


def test_a_repeated_prompt_reuses_its_prefix_only_on_the_same_adapter_version(server, store, tmp_path):
    replacement = adapter_to_bytes(random_adapter(tiny_llama(seed=0), k=2, seed=21, scale=0.3))
    (tmp_path / "r.safetensors").write_bytes(replacement)
    blocks = (len(LONG_PROMPT) - 1) // 16 * 16  # the full blocks before the last token
    with server.client() as c:
        assert c.get("/health").json()["prefix_cache"]["entries"] == 0  # on, and empty
        for adapter in [None, "a", "b"]:
            path = None if adapter is None else store / f"{adapter}.safetensors"
            first, usage = usage_of(c, LONG_PROMPT, adapter)
            assert usage["prompt_tokens_details"]["cached_tokens"] == 0, adapter  # no other key's blocks
            again, usage = usage_of(c, LONG_PROMPT, adapter)
            assert usage["prompt_tokens_details"]["cached_tokens"] == blocks
            assert first == again == offline_greedy(path, LONG_PROMPT, 8), adapter
        assert c.put("/adapters/a", content=replacement).status_code == 200
        text, usage = usage_of(c, LONG_PROMPT, "a")  # a new version: its own blocks
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert text == offline_greedy(tmp_path / "r.safetensors", LONG_PROMPT, 8)
        assert metric(c, "neuroada_prefix_cache_hits_total") == 3 * blocks
        assert metric(c, "neuroada_prefix_cache_queries_total") == 7 * len(LONG_PROMPT)
        described = c.get("/health").json()["prefix_cache"]
        assert metric(c, "neuroada_prefix_cache_bytes") == described["bytes"] > 0
        assert described["entries"] == 4 * (blocks // 16)  # base, a, b, and a's new version
    assert server.engine.base_weights_intact()


def test_mixed_batches_of_cached_and_new_prompts_match_offline(server, store):
    """Many adapters at once (the mixed path), each prompt sent twice: the second time its prefix
    comes from the cache while other rows of its prefill compute theirs whole."""
    prompts = [LONG_PROMPT, LONG_PROMPT[:40] + " And Bob?", "short"]
    jobs = [(adapter, prompt) for adapter in [None, "a", "b", "c"] for prompt in prompts]
    expected = {
        job: offline_greedy(None if job[0] is None else store / f"{job[0]}.safetensors", job[1], 8) for job in jobs
    }
    with server.client() as c, ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda job: (job, usage_of(c, job[1], job[0])), jobs + jobs[::-1]))
        assert metric(c, "neuroada_prefix_cache_hits_total") > 0
    for job, (text, _) in results:
        assert text == expected[job], job


def test_the_prefix_cache_can_be_turned_off(tiny_model_dir, store):
    with RunningServer(make_settings(tiny_model_dir, store, prefix_cache_bytes=0)) as s, s.client() as c:
        for _ in range(2):
            _, usage = usage_of(c, LONG_PROMPT, None)
            assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert metric(c, "neuroada_prefix_cache_hits_total") == 0
        assert c.get("/health").json()["prefix_cache"] is None
