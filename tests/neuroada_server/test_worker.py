"""The worker's guarantee: whatever one request or adapter does, only that request fails, and
every request beside it gets exactly the tokens it gets alone."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from neuroada.fingerprint import BaseModelSpec
from neuroada.format import LayerDelta, adapter_to_bytes, build_adapter
from neuroada_server.batch_adapters import SparseDeltaAdapters
from neuroada_server.generation import RunningBatch
from tests.helpers import TINY_NAME, random_adapter, tiny_llama
from tests.neuroada_server.conftest import metric

LONG = 150  # tokens of the long request: it runs through every hostile request below
BODY = {"prompt": "hello there", "max_new_tokens": LONG, "ignore_eos": True, "stream": True}


def _overflowing_adapter() -> bytes:
    """Valid by every check (finite bf16 values near bf16's largest), but its deltas overflow
    the activations to infinity, and the attention scores to NaN."""
    model = tiny_llama(seed=0)
    adapter = random_adapter(model, k=2, seed=9, targets=("q_proj", "k_proj", "v_proj"))
    layers = {n: LayerDelta(d.indices, d.values.float().sign() * 3e38) for n, d in adapter.layers.items()}
    return adapter_to_bytes(build_adapter(layers, base=BaseModelSpec.from_model(model, TINY_NAME), selection="random"))


def _streamed_text(client, adapter: str, started: threading.Event | None = None) -> str:
    text = []
    with client.stream("POST", "/generate", params={"adapter": adapter}, json=BODY) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            payload = json.loads(line[6:])
            assert "error" not in payload, payload
            text.append(payload["text"])
            if started is not None:
                started.set()
    return "".join(text)


def _hostile(client) -> list[tuple[int, str]]:
    """Each hostile request once; their statuses and error messages."""
    prompt = {"prompt": "hi", "max_new_tokens": 8}
    results = []
    for params, body in [
        ({"adapter": "huge"}, prompt | {"temperature": 1.0}),  # overflowing deltas, sampled
        ({"adapter": "huge"}, prompt),  # overflowing deltas, greedy
        ({}, prompt | {"temperature": 1e-40}),  # the old overflow trigger: now refused up front
        ({}, prompt | {"stop": ["\x00" * 64] * 8, "max_new_tokens": 30, "ignore_eos": True}),
        ({"adapter": "c"}, prompt | {"prompt": "\ufffd" * 300}),  # 900 byte tokens of replacement characters
        ({}, prompt | {"prompt": "y" * 200, "max_new_tokens": 20_000}),  # past the context length
    ]:
        r = client.post("/generate", params=params, json=body)
        results.append((r.status_code, r.json().get("error", {}).get("message", "")))
    return results


def test_hostile_requests_fail_alone_beside_a_long_stream(server):
    with server.client() as c:
        assert c.put("/adapters/huge", content=_overflowing_adapter()).status_code == 201
        solo = _streamed_text(c, "a")
        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(_streamed_text, c, "a", started)
            assert started.wait(60)
            statuses = _hostile(c)
            assert not long.done()  # the hostile requests really ran beside it
            assert long.result() == solo
        assert c.get("/health").status_code == 200
    assert [s for s, _ in statuses] == [500, 500, 422, 200, 200, 422]
    assert "not finite" in statuses[0][1] and "not finite" in statuses[1][1]
    assert "temperature" in statuses[2][1] and "context length" in statuses[5][1]
    assert server.engine.base_weights_intact()
    failed = server.engine.metrics.requests.labels(adapter="huge", status="500")._value.get()
    assert failed == 2  # each counted once


def test_a_forward_that_raises_for_one_adapter_fails_only_its_request(server, monkeypatch):
    real_bind = SparseDeltaAdapters.bind
    bound = {"rows": []}

    def recording_bind(self, rows):  # the rows of the coming forward call
        bound["rows"] = rows
        return real_bind(self, rows)

    def fails_with_c(module, inputs):
        # Decode steps only (one token per row): the requests on c join the batch, then its steps
        # raise, mid-model (the first layer has written the step's keys and values by now).
        if inputs[0].shape[1] == 1 and any(r.adapter == "c" for r in bound["rows"]):
            raise RuntimeError("kernel fault on adapter c")

    with server.client() as c:
        solo = _streamed_text(c, "a")
        monkeypatch.setattr(SparseDeltaAdapters, "bind", recording_bind)
        hook = server.engine.model.model.layers[1].mlp.register_forward_pre_hook(fails_with_c)
        started = threading.Event()
        with ThreadPoolExecutor(4) as pool:
            long = pool.submit(_streamed_text, c, "a", started)
            assert started.wait(60)
            bad = [
                pool.submit(c.post, "/generate", params={"adapter": "c"}, json={"prompt": f"tell me {p}"})
                for p in "xyz"
            ]
            good = pool.submit(c.post, "/generate", params={"adapter": "b"}, json={"prompt": "hi", "max_new_tokens": 9})
            for r in bad:
                r.result()
            assert not long.done()  # the failing steps ran with the long request in the batch
            assert long.result() == solo
            for r in bad:
                assert (
                    r.result().status_code == 500
                    and "kernel fault on adapter c" in r.result().json()["error"]["message"]
                )
            assert good.result().status_code == 200
        hook.remove()
        alone = c.post("/generate", params={"adapter": "b"}, json={"prompt": "hi", "max_new_tokens": 9})
        assert good.result().json()["text"] == alone.json()["text"]
        # The failing steps were split until the requests on c ran alone, and counted.
        assert metric(c, 'neuroada_split_batches_total{stage="decode"}') >= 1
        assert metric(c, 'neuroada_split_batches_total{stage="prefill"}') == 0
    assert server.engine.base_weights_intact()


@pytest.mark.parametrize("stage", ["join", "step"])
def test_a_lone_request_whose_step_raises_fails_and_the_worker_serves_on(server, monkeypatch, stage):
    real = getattr(RunningBatch, stage)
    calls = {"n": 0}

    def fails_once(self, *args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("out of memory")
        return real(self, *args)

    monkeypatch.setattr(RunningBatch, stage, fails_once)
    with server.client() as c:
        first = c.post("/generate", json={"prompt": "hi", "max_new_tokens": 4})
        assert first.status_code == 500 and "out of memory" in first.json()["error"]["message"]
        assert c.post("/generate", json={"prompt": "hi", "max_new_tokens": 4}).status_code == 200
