"""Adapter management over HTTP: uploads, replacement, deletion, rejection, restart, integrity."""

from __future__ import annotations

import threading

import pytest
import torch

from neuroada.fingerprint import BaseModelSpec
from neuroada.format import adapter_to_bytes, read_adapter
from tests.helpers import MALFORMED, malformed_layers, random_adapter, tiny_llama, write_raw
from tests.neuroada_server.conftest import (
    LONG_TOKENS,
    RunningServer,
    generate,
    long_request,
    make_settings,
    offline_greedy,
    wait_for,
)


def store_state(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def fresh_state_dict():
    return tiny_llama(seed=0).state_dict()


def assert_base_weights_pristine(server):
    assert server.engine.base_weights_intact()
    server.engine.restore_base()
    for name, tensor in fresh_state_dict().items():
        assert torch.equal(server.engine.model.state_dict()[name], tensor), name


def test_list_and_inspect_adapters(server):
    with server.client() as c:
        listing = c.get("/adapters").json()
        assert [a["name"] for a in listing["adapters"]] == ["a", "b", "c", "d"]
        a = c.get("/adapters/a").json()
        assert a["k"] == 2 and a["layers"] == 6 and a["fingerprint_match"] is True
        assert a["parameters"] == 640 and a["bytes"] == 640 * 4
        assert a["index_hash"].startswith("sha256:")
        # Listed from its header alone until a request needs it: then it is placed, fidelity measured.
        assert (a["tier"], a["path"], a["fidelity"]) == ("disk", None, None)
        generate(c, "hi", "a")
        a = c.get("/adapters/a").json()
        assert a["tier"] == "resident" and a["path"] == "merged" and a["fidelity"]["survived"] == 1.0
        assert listing["total"] == 4
        assert [x["name"] for x in c.get("/adapters", params={"limit": 2, "offset": 1}).json()["adapters"]] == [
            "b",
            "c",
        ]
        assert [x["name"] for x in c.get("/adapters", params={"prefix": "d"}).json()["adapters"]] == ["d"]
        assert c.get("/adapters/nope").status_code == 404
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert models[1:] == ["a", "b", "c", "d"]


def test_upload_while_serving_is_used_at_once_and_survives_restart(server, store, tiny_model_dir, tmp_path):
    new = adapter_to_bytes(random_adapter(tiny_llama(seed=0), k=3, seed=11, scale=0.3))
    (tmp_path / "new.safetensors").write_bytes(new)
    expected = offline_greedy(tmp_path / "new.safetensors", "hello there", 12)
    with server.client() as c:
        background = threading.Thread(target=lambda: [generate(c, "abc", "a") for _ in range(10)])
        background.start()
        r = c.put("/adapters/fresh", content=new)
        assert r.status_code == 201, r.text
        assert generate(c, "hello there", "fresh") == expected
        background.join()
        assert c.put("/adapters/fresh", content=new).status_code == 200  # replaced
    assert (store / "fresh.safetensors").read_bytes() == new
    server.__exit__(None, None, None)
    with RunningServer(make_settings(tiny_model_dir, store)) as restarted, restarted.client() as c:
        assert generate(c, "hello there", "fresh") == expected


def test_replacing_an_applied_adapter_serves_the_new_version_next(server, store, tmp_path):
    replacement = adapter_to_bytes(random_adapter(tiny_llama(seed=0), k=2, seed=21, scale=0.3))
    (tmp_path / "r.safetensors").write_bytes(replacement)
    original = offline_greedy(store / "a.safetensors", "hello there", 12)
    with server.client() as c:
        before = generate(c, "hello there", "a")
        assert server.engine.applied == "a"
        assert c.put("/adapters/a", content=replacement).status_code == 200
        after = generate(c, "hello there", "a")
    assert before == original
    assert after == offline_greedy(tmp_path / "r.safetensors", "hello there", 12)
    assert after != before
    assert_base_weights_pristine(server)


def test_deleting_the_applied_adapter_reverts_it_first(server, store):
    with server.client() as c:
        generate(c, "hi", "b")
        assert server.engine.applied == "b"
        assert c.delete("/adapters/b").status_code == 200
        assert server.engine.applied is None
        assert server.engine.packed.checksum() == server.engine.base_checksum
        assert not (store / "b.safetensors").exists()
        r = c.post("/generate", params={"adapter": "b"}, json={"prompt": "hi"})
        assert r.status_code == 404 and "'b'" in r.json()["error"]["message"]
        assert c.delete("/adapters/b").status_code == 404


@pytest.mark.parametrize("case", MALFORMED)
def test_each_malformed_upload_is_refused_and_changes_nothing(case, server, store, tmp_path):
    spec = BaseModelSpec.from_model(tiny_llama(seed=0), "tiny")
    layers, _, fragment = malformed_layers(case)
    data = write_raw(tmp_path / "bad.safetensors", layers, k=next(iter(layers.values()))[0].shape[1], spec=spec)
    _assert_upload_refused(server, store, "a", data, 422, fragment)


@pytest.mark.parametrize(
    "name, body, status, fragment",
    [
        ("x", b"not a safetensors file at all", 422, "safetensors"),
        ("x", b"", 400, "empty body"),
        ("..", b"abc", 404, None),  # normalised away by the HTTP stack: never reaches the store
        ("..evil", b"abc", 400, "invalid adapter name"),
        ("a..b", b"abc", 400, "invalid adapter name"),
        ("-lead", b"abc", 400, "invalid adapter name"),
        ("x" * 65, b"abc", 400, "invalid adapter name"),
    ],
)
def test_bad_names_and_bodies_are_refused(name, body, status, fragment, server, store):
    _assert_upload_refused(server, store, name, body, status, fragment)


def test_path_traversal_and_pickle_are_refused(server, store, tmp_path):
    import pickle

    _assert_upload_refused(server, store, "p", pickle.dumps({"w": torch.zeros(2)}), 422, "safetensors")
    with server.client() as c:
        for path in ["/adapters/..%2Fescape", "/adapters/%2Fetc%2Fpasswd", "/adapters/a%2F..%2F..%2Fx"]:
            r = c.put(path, content=b"abc")
            assert r.status_code in (400, 404), (path, r.status_code)
    assert not list(tmp_path.parent.glob("escape*"))


def test_wrong_base_and_too_large_uploads_are_refused(server, store, tiny_model_dir):
    other = adapter_to_bytes(random_adapter(tiny_llama(seed=5), k=2, seed=1))
    _assert_upload_refused(server, store, "a", other, 422, "fingerprint")
    with RunningServer(make_settings(tiny_model_dir, store, max_upload_bytes=1000)) as small:
        data = (store / "a.safetensors").read_bytes()
        assert len(data) > 1000
        _assert_upload_refused(small, store, "big", data, 413, "limit")


def _assert_upload_refused(server, store, name, data, status, fragment):
    before_disk = store_state(store)
    before_served = {a["name"]: a["version"] for a in server.engine.catalog.page()[1]}
    with server.client() as c:
        r = c.put(f"/adapters/{name}", content=data)
        assert r.status_code == status, r.text
        body = r.json()
        assert "error" in body and body["error"]["message"]
        if fragment:
            assert fragment.lower() in body["error"]["message"].lower(), body
    assert store_state(store) == before_disk
    assert {a["name"]: a["version"] for a in server.engine.catalog.page()[1]} == before_served
    assert server.engine.base_weights_intact()


def test_invalid_file_in_store_is_reported_and_skipped(store, tiny_model_dir):
    (store / "broken.safetensors").write_bytes(b"garbage")
    (store / "foreign.safetensors").write_bytes(adapter_to_bytes(random_adapter(tiny_llama(seed=9))))
    with RunningServer(make_settings(tiny_model_dir, store)) as s, s.client() as c:
        listing = c.get("/adapters").json()
        assert [a["name"] for a in listing["adapters"]] == ["a", "b", "c", "d"]
        errors = {e["name"]: e["error"] for e in listing["invalid"]}
        assert set(errors) == {"broken", "foreign"} and "fingerprint" in errors["foreign"]
        assert generate(c, "hi", "a")


def test_admin_token_guards_management(store, tiny_model_dir):
    with RunningServer(make_settings(tiny_model_dir, store, admin_token="s3cret")) as s, s.client() as c:
        assert c.get("/adapters").status_code == 401
        assert c.delete("/adapters/a", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert (store / "a.safetensors").exists()
        ok = c.get("/adapters", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_long_mixed_sequence_leaves_base_weights_bit_identical(server, store):
    model = tiny_llama(seed=0)
    uploads = [adapter_to_bytes(random_adapter(model, k=k, seed=100 + k, scale=0.3)) for k in (1, 2, 5)]
    names = ["a", "b", "c", "d", None]
    with server.client() as c:
        for i in range(120):
            name = names[i % len(names)]
            if name is not None and not server.engine.catalog.servable(name):
                name = None
            if i % 17 == 0:
                c.put(f"/adapters/u{i % 3}", content=uploads[i % 3])
            if i % 29 == 0:
                c.put("/adapters/a", content=b"corrupt")  # rejected
            if i % 41 == 40:
                c.delete("/adapters/u1")
            if i % 13 == 0:  # a stream the client abandons after its first event
                with c.stream(
                    "POST",
                    "/generate",
                    json={"prompt": "abc", "max_new_tokens": 50, "stream": True},
                    params={"adapter": "u0"} if server.engine.catalog.servable("u0") else {},
                ) as r:
                    next(r.iter_lines())
            body = {"prompt": f"p{i}", "max_new_tokens": 3, "temperature": 0.7 if i % 2 else 0.0, "seed": i}
            r = c.post("/generate", params={"adapter": name} if name else {}, json=body)
            assert r.status_code == 200, r.text
    assert_base_weights_pristine(server)


def test_metrics_count_what_happened(server):
    with server.client() as c:
        generate(c, "hi", "a")
        generate(c, "hi", None)
        c.post("/generate", params={"adapter": "zzz"}, json={"prompt": "hi"})
        text = c.get("/metrics").text
    assert 'neuroada_requests_total{adapter="a",status="200"} 1.0' in text
    assert 'neuroada_requests_total{adapter="base",status="200"} 1.0' in text
    assert "neuroada_adapter_switches_total" in text and "neuroada_adapter_switch_seconds_bucket" in text
    assert "neuroada_time_to_first_token_seconds_count 2.0" in text
    assert 'neuroada_adapters{tier="disk"} 4.0' in text
    assert 'neuroada_adapters{tier="resident"} 1.0' in text  # only "a" was asked for
    assert 'neuroada_adapter_lookups_total{result="miss"} 1.0' in text
    assert 'neuroada_generated_tokens_total{adapter="a"} 12.0' in text


def test_errors_are_json_with_the_right_status(server):
    with server.client() as c:
        r = c.post("/generate", json={"prompt": "hi", "temperature": -1})
        assert r.status_code == 422 and "temperature" in r.json()["error"]["message"]
        r = c.post("/generate", json={"prompt": "hi", "max_new_tokens": 10 * LONG_TOKENS})
        assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]["message"]
        r = c.post("/generate", json={"prompt": "x" * 3000})
        assert r.status_code == 413 and "max_prompt_tokens" in r.json()["error"]["message"]
        r = c.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = c.post("/v1/completions", json={"model": "nope", "prompt": "hi"})
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]


def test_overload_gets_429_with_retry_after(store, tiny_model_dir):
    settings = make_settings(tiny_model_dir, store, max_queued_requests=1, max_batch_size=1)
    with RunningServer(settings) as s, s.client() as c:
        results = []

        def one():
            results.append(c.post("/generate", json={"prompt": "hi", "max_new_tokens": 40}))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r.status_code for r in results)
        assert 429 in statuses and 200 in statuses
        limited = next(r for r in results if r.status_code == 429)
        assert limited.headers["retry-after"] and "overloaded" in limited.json()["error"]["message"]


def test_request_bodies_over_the_limit_are_refused(store, tiny_model_dir):
    with RunningServer(make_settings(tiny_model_dir, store, max_request_bytes=2000)) as s, s.client() as c:
        big = {"prompt": "x" * 5000, "max_new_tokens": 2}
        r = c.post("/generate", json=big)
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]

        def chunked():
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'", "max_new_tokens": 2}'

        r = c.post("/generate", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert c.post("/generate", json={"prompt": "ok", "max_new_tokens": 2}).status_code == 200
        # Uploads have their own, larger limit.
        data = (store / "a.safetensors").read_bytes()
        assert len(data) > 2000
        assert c.put("/adapters/a2", content=data).status_code == 201


def test_api_token_guards_generation_only(store, tiny_model_dir):
    with RunningServer(make_settings(tiny_model_dir, store, api_token="gen-key")) as s, s.client() as c:
        body = {"prompt": "hi", "max_new_tokens": 2}
        assert c.post("/generate", json=body).status_code == 401
        assert c.post("/v1/completions", json={"model": "a", "prompt": "hi"}).status_code == 401
        ok = c.post("/generate", json=body, headers={"Authorization": "Bearer gen-key"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200


def test_concurrent_put_delete_put_of_one_name_leaves_one_consistent_version(server, store):
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_llama(seed=0)
    versions = [adapter_to_bytes(random_adapter(model, k=2, seed=200 + i, scale=0.3)) for i in range(6)]

    def hammer(i):
        with server.client() as c:
            for j in range(6):
                if (i + j) % 3 == 2:
                    c.delete("/adapters/race")
                else:
                    c.put("/adapters/race", content=versions[(i + j) % 6])

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(hammer, range(6)))
    path = store / "race.safetensors"
    served = server.engine.catalog.describe("race")
    if served is None:
        assert not path.exists()
    else:
        on_disk = path.read_bytes()
        assert on_disk in versions
        metadata = read_adapter(on_disk).metadata
        assert (served["index_hash"], served["created"]) == (metadata.index_hash, metadata.created)
        with server.client() as c:
            assert generate(c, "hello", "race") == offline_greedy(path, "hello", 12)
    assert not [p for p in store.iterdir() if p.name.startswith(".")]  # no temp file left
    assert_base_weights_pristine(server)


def test_a_request_past_its_deadline_in_the_queue_gets_408_or_504(store, tiny_model_dir):
    settings = make_settings(tiny_model_dir, store, max_batch_size=1, request_timeout_s=0.2)
    with RunningServer(settings) as s, s.client() as c:
        with long_request(c):  # holds the only batch row
            own = c.post("/generate", params={"adapter": "a"}, json={"prompt": "hi", "timeout_s": 0.05})
            servers = c.post("/generate", params={"adapter": "a"}, json={"prompt": "hi", "max_new_tokens": 2})
        # Its own timeout_s passed: the client's deadline (408). The server's default passed: 504.
        assert own.status_code == 408 and "timeout_s" in own.json()["error"]["message"]
        assert servers.status_code == 504 and "request_timeout_s" in servers.json()["error"]["message"]
        assert c.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_an_adapter_on_the_tied_lm_head_is_refused_at_upload_and_listed_invalid_at_start(store, tiny_model_dir):
    tied = adapter_to_bytes(random_adapter(tiny_llama(seed=0), k=1, seed=3, targets=("lm_head", "q_proj")))
    with RunningServer(make_settings(tiny_model_dir, store)) as s, s.client() as c:
        r = c.put("/adapters/head", content=tied)
        assert r.status_code == 422 and "lm_head" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "TiedWeightError"
    assert not (store / "head.safetensors").exists() and not list(store.glob(".*.tmp"))
    (store / "head.safetensors").write_bytes(tied)
    with RunningServer(make_settings(tiny_model_dir, store)) as s, s.client() as c:  # starts anyway
        listing = c.get("/adapters").json()
        assert [a["name"] for a in listing["adapters"]] == ["a", "b", "c", "d"]
        assert [e["name"] for e in listing["invalid"]] == ["head"] and "tied" in listing["invalid"][0]["error"]


def test_uploads_beyond_the_concurrency_bound_get_429(store, tiny_model_dir):
    data = (store / "b.safetensors").read_bytes()
    holding, release = threading.Event(), threading.Event()

    def slow_body():
        yield data[:100]
        holding.set()
        release.wait(30)
        yield data[100:]

    with RunningServer(make_settings(tiny_model_dir, store, max_concurrent_uploads=1)) as s, s.client() as c:
        first = threading.Thread(target=lambda: c.put("/adapters/slow", content=slow_body()))
        first.start()
        assert holding.wait(30)
        # The server makes the temp file once it holds the upload slot, then streams the body into it.
        streamed_so_far = wait_for(lambda: list(store.glob(".slow.safetensors.*.tmp")))
        r = c.put("/adapters/other", content=data)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        release.set()
        first.join(timeout=30)
        assert c.put("/adapters/other", content=data).status_code == 201
    assert len(streamed_so_far) == 1  # the body went to a temp file in the store, not to memory
    assert (store / "slow.safetensors").read_bytes() == data and not list(store.glob(".*.tmp"))


def test_fidelity_is_measured_against_the_base_whatever_is_applied(tiny_model_dir, tmp_path):
    """Two bf16-served adapters share one index set: the second's fidelity must not depend on
    whether the first is merged into the weights when it is uploaded."""
    store = tmp_path / "bf16"
    model = tiny_llama(seed=0)
    first = adapter_to_bytes(random_adapter(model, k=2, seed=5, scale=0.02))
    second = adapter_to_bytes(random_adapter(model, k=2, seed=5, scale=0.004))  # same indices
    settings = make_settings(tiny_model_dir, store, dtype="bfloat16", fidelity_threshold=0.0)
    fidelities = []
    with RunningServer(settings) as s, s.client() as c:
        assert c.put("/adapters/first", content=first).status_code == 201
        for applied in (None, "first"):
            params = {"adapter": applied} if applied else {}
            assert c.post("/generate", params=params, json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
            assert s.engine.applied == applied
            fidelities.append(c.put("/adapters/second", content=second).json()["fidelity"])
    assert fidelities[0] == fidelities[1]
    assert 0 < fidelities[0]["survived"] < 1  # bf16 rounds some of these deltas away: the check has teeth
