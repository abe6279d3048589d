"""Cancellation: a client that hangs up stops its generation, streamed or not; SIGTERM is bounded."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.neuroada_server.conftest import LONG_TOKENS, metric, spawn_serve, wait_for

CANCELLED = 'neuroada_requests_total{adapter="base",status="499"}'
TOKENS = 'neuroada_generated_tokens_total{adapter="base"}'


def test_a_non_streamed_client_that_times_out_stops_its_generation(server):
    body = {"prompt": "abc", "max_new_tokens": LONG_TOKENS, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/generate", json=body, timeout=1.0)
    with server.client() as c:
        wait_for(lambda: metric(c, CANCELLED) >= 1)
        assert metric(c, CANCELLED) == 1
        tokens = metric(c, TOKENS)
        assert tokens < LONG_TOKENS
        assert server.engine.metrics.running._value.get() == 0  # it left the batch
        time.sleep(0.5)
        assert metric(c, TOKENS) == tokens  # and nothing more was generated for it


def test_sigterm_with_long_requests_running_exits_within_the_drain_time(tiny_model_dir, store):
    proc, url = spawn_serve(
        {
            "NEUROADA_MODEL": str(tiny_model_dir),
            "NEUROADA_ADAPTER_DIR": str(store),
            "NEUROADA_MAX_NEW_TOKENS": str(LONG_TOKENS),
            "NEUROADA_SHUTDOWN_DRAIN_S": "1",
        },
        timeout=120,
    )
    body = {"prompt": "abc", "max_new_tokens": LONG_TOKENS, "ignore_eos": True}
    started = threading.Event()
    outcomes = []

    def streamed():
        try:
            with httpx.stream("POST", f"{url}/generate", json=body | {"stream": True}, timeout=60) as r:
                for _ in r.iter_lines():
                    started.set()
        except httpx.HTTPError as e:
            outcomes.append(type(e).__name__)
        outcomes.append("stream ended")

    def plain():
        try:
            outcomes.append(httpx.post(f"{url}/generate", params={"adapter": "a"}, json=body, timeout=60).status_code)
        except httpx.HTTPError as e:
            outcomes.append(type(e).__name__)

    clients = [threading.Thread(target=streamed), threading.Thread(target=plain)]
    try:
        for t in clients:
            t.start()
        assert started.wait(30)
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)  # drain 1 s, then running requests are cancelled
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    for t in clients:
        t.join(timeout=30)
    # uvicorn exits by re-raising the signal it handled; its own backstop would take drain + 5 s.
    assert proc.returncode in (0, -signal.SIGTERM) and took < 5, (proc.returncode, took)
    assert "stream ended" in outcomes and len(outcomes) == 2, outcomes


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(server, monkeypatch):
    engine = server.engine
    calls = []
    real = engine.tokenizer.__class__.__call__
    monkeypatch.setattr(
        engine.tokenizer.__class__, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    )
    longest = engine.settings.max_prompt_tokens * engine.max_token_chars
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": engine.model_name, "prompt": "z" * (longest + 1)})
        assert r.status_code == 413 and "max_prompt_tokens" in r.json()["error"]["message"]
        assert not calls
        r = c.post("/generate", json={"prompt": "z" * 4000, "max_new_tokens": 1})  # fits the cap, not the limit
        assert r.status_code == 413 and calls
