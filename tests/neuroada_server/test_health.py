"""/health?deep=1 is admin-only, one at a time, and never switches adapters; /metrics can need a token."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.neuroada_server.conftest import RunningServer, make_settings

ADMIN = {"Authorization": "Bearer s3cret"}


def _switches(server) -> float:
    return server.engine.metrics.switches._value.get()


def test_the_deep_check_needs_the_admin_token_and_leaves_the_applied_adapter(store, tiny_model_dir):
    settings = make_settings(tiny_model_dir, store, admin_token="s3cret")
    with RunningServer(settings) as s, s.client() as c:
        assert c.get("/health").status_code == 200  # liveness stays open
        assert c.get("/health", params={"deep": 1}).status_code == 401
        assert (
            c.post("/generate", params={"adapter": "a"}, json={"prompt": "hi", "max_new_tokens": 3}).status_code == 200
        )
        assert s.engine.applied == "a"
        switches = _switches(s)
        for _ in range(5):
            r = c.get("/health", params={"deep": 1}, headers=ADMIN)
            assert r.status_code == 200 and r.json()["base_weights_intact"] is True
        assert _switches(s) == switches and s.engine.applied == "a"


def test_only_one_deep_check_runs_at_a_time(server, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    real = type(server.engine).base_weights_intact

    def slow(engine):
        entered.set()
        release.wait(30)
        return real(engine)

    monkeypatch.setattr(type(server.engine), "base_weights_intact", slow)
    with server.client() as c, ThreadPoolExecutor(1) as pool:
        first = pool.submit(c.get, "/health", params={"deep": 1})
        assert entered.wait(30)
        second = c.get("/health", params={"deep": 1})
        assert second.status_code == 429 and "already running" in second.json()["error"]["message"]
        release.set()
        assert first.result().status_code == 200


def test_metrics_can_need_a_token(store, tiny_model_dir):
    with RunningServer(make_settings(tiny_model_dir, store, metrics_token="m3")) as s, s.client() as c:
        assert c.get("/metrics").status_code == 401
        assert "neuroada_requests" in c.get("/metrics", headers={"Authorization": "Bearer m3"}).text


def test_a_deleted_adapters_metric_series_are_removed(server):
    with server.client() as c:
        assert (
            c.post("/generate", params={"adapter": "b"}, json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
        )
        assert 'adapter="b"' in c.get("/metrics").text
        assert c.delete("/adapters/b").status_code == 200
        assert 'adapter="b"' not in c.get("/metrics").text
