"""Adapter tiers through a real server: lazy loads, budgets, eviction, pins, stale versions."""

from __future__ import annotations

import hashlib
import json
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from neuroada.format import adapter_to_bytes, save_adapter
from neuroada_server.engine import Engine
from tests.helpers import random_adapter, tiny_llama
from tests.neuroada_server.conftest import (
    RunningServer,
    generate,
    long_request,
    make_settings,
    offline_greedy,
    wait_for,
)

ADAPTER_BYTES = 640 * 4  # random_adapter(k=2) on the tiny model: 640 int16 indices and 640 bf16 values
DEVICE_BYTES = 640 * 2 + 640 * (8 + 4)  # values, plus its own index set: int64 offsets, fp32 base weights


def _store(folder, n: int, k: int = 2):
    model = tiny_llama(seed=0)
    for i in range(n):
        save_adapter(random_adapter(model, k=k, seed=10 + i, scale=0.3), folder / f"t{i:03d}.safetensors")
    return folder


def _metric(text: str, name: str, **labels) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = f"{name}{{{selector}}}" if labels else name
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _tiers(client) -> dict[str, str]:
    return {a["name"]: a["tier"] for a in client.get("/adapters", params={"limit": 1000}).json()["adapters"]}


def test_a_store_of_hundreds_starts_from_headers_without_reading_bodies(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "many", 300, k=1)
    # Damage every body after its header: a start-up that read bodies would list them invalid.
    for path in store.iterdir():
        header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        data = bytearray(path.read_bytes())
        data[header_end:] = bytes(len(data) - header_end)
        path.write_bytes(bytes(data))
    with RunningServer(make_settings(tiny_model_dir, store)) as s, s.client() as c:
        listing = c.get("/adapters", params={"limit": 1000}).json()
        assert listing["total"] == 300 and not listing["invalid"]
        assert {a["tier"] for a in listing["adapters"]} == {"disk"}
        assert _metric(c.get("/metrics").text, "neuroada_adapter_scan_seconds") > 0
        # The first request reads the body, finds the damage, and the adapter is listed invalid.
        r = c.post("/generate", params={"adapter": "t007"}, json={"prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 404 and "invalid" in r.json()["error"]["message"], r.text
        assert [x["name"] for x in c.get("/adapters").json()["invalid"]] == ["t007"]
        assert c.get("/adapters/t007").status_code == 404
        assert s.engine.base_weights_intact()


def test_eviction_spares_pinned_adapters_and_those_with_running_requests(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "s", 6)
    settings = make_settings(tiny_model_dir, store, max_resident_adapters=3, pin="t000")
    with RunningServer(settings) as s, s.client() as c:
        assert _tiers(c)["t000"] == "resident"  # pinned: loaded at start-up
        with long_request(c, adapter="t001") as long:
            for name in ["t002", "t003", "t004", "t005", "t002"]:  # one free slot, taken in turn
                assert generate(c, "hello", name, n=4) == offline_greedy(store / f"{name}.safetensors", "hello", 4)
                tiers = _tiers(c)
                assert tiers["t000"] == tiers["t001"] == tiers[name] == "resident"
                assert list(tiers.values()).count("resident") == 3
            assert json.loads(next(line for line in long if line.startswith("data: "))[6:])["text"] is not None
        text = c.get("/metrics").text
        assert _metric(text, "neuroada_adapter_evictions_total", tier="resident") == 4
        assert _metric(text, "neuroada_adapters", tier="resident") == 3
        assert s.engine.base_weights_intact()


def test_a_request_cancelled_while_queued_lets_go_of_its_adapter(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "s", 4)
    settings = make_settings(tiny_model_dir, store, max_batch_size=1, max_resident_adapters=2)
    with RunningServer(settings) as s, s.client() as c:
        with long_request(c):  # holds the one batch row: t001's request waits in the queue
            with pytest.raises(httpx.TimeoutException):  # its client hangs up while it waits
                httpx.post(f"{s.url}/generate?adapter=t001", json={"prompt": "hi", "max_new_tokens": 4}, timeout=1.0)
            cancelled = wait_for(
                lambda: _metric(c.get("/metrics").text, "neuroada_requests_total", adapter="t001", status="499") >= 1
            )
            assert cancelled, "the cancelled request never ended"
        for name in ["t002", "t003"]:  # two loads into two resident slots: t001 must make room
            assert generate(c, "hello", name, n=4) == offline_greedy(store / f"{name}.safetensors", "hello", 4)
        assert _tiers(c)["t001"] != "resident"


def test_a_cold_adapter_waits_for_its_load_while_resident_streams_keep_decoding(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "s", 2)
    with RunningServer(make_settings(tiny_model_dir, store, pin="t000")) as s, s.client() as c:
        loader = s.engine.catalog.loader
        reads = []
        fast_read = loader.read

        def slow_read(name, source):
            reads.append(name)
            time.sleep(2.0)  # a large adapter on a slow disk
            return fast_read(name, source)

        loader.read = slow_read
        with long_request(c, adapter="t000") as long:
            with ThreadPoolExecutor(4) as pool:
                cold = [pool.submit(generate, c, "hello", "t001", 4) for _ in range(4)]
                stamps = []
                while not all(f.done() for f in cold):
                    next(long)
                    stamps.append(time.monotonic())
                    assert len(stamps) < 1_000_000
                texts = [f.result() for f in cold]
        assert texts == [offline_greedy(store / "t001.safetensors", "hello", 4)] * 4
        assert reads == ["t001"]  # four requests for one cold adapter: one load
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        assert sum(gaps) >= 2.0 and max(gaps) < 0.5, max(gaps)  # decoding went on through the load
        text = c.get("/metrics").text
        assert _metric(text, "neuroada_adapter_lookups_total", result="miss") >= 1
        assert _metric(text, "neuroada_adapter_load_seconds_count") == 2  # the pin at start-up, then t001


def test_a_replaced_or_deleted_adapter_is_never_served_from_a_stale_tier(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "s", 3)
    model = tiny_llama(seed=0)
    versions = [adapter_to_bytes(random_adapter(model, k=2, seed=90 + i, scale=0.3)) for i in range(3)]
    # One resident slot, host room for two: "x" moves between tiers as the others come and go.
    settings = make_settings(tiny_model_dir, store, max_resident_adapters=1, max_host_adapter_bytes=2 * ADAPTER_BYTES)
    with RunningServer(settings) as s, s.client() as c:
        for i, data in enumerate(versions):
            assert c.put("/adapters/x", content=data).status_code == (201 if i == 0 else 200)
            expected = offline_greedy(store / "x.safetensors", "hello", 6)
            assert generate(c, "hello", "x", n=6) == expected  # resident
            generate(c, "hello", "t000", n=2)  # x leaves the resident tier, stays in the host tier
            assert _tiers(c)["x"] == "host"
            assert generate(c, "hello", "x", n=6) == expected
            generate(c, "hello", "t001", n=2)
            generate(c, "hello", "t002", n=2)  # x leaves the host tier too
            assert _tiers(c)["x"] == "disk"
            assert generate(c, "hello", "x", n=6) == expected
        assert c.delete("/adapters/x").status_code == 200
        r = c.post("/generate", params={"adapter": "x"}, json={"prompt": "hello", "max_new_tokens": 2})
        assert r.status_code == 404
        assert c.put("/adapters/x", content=versions[0]).status_code == 201
        assert generate(c, "hello", "x", n=6) == offline_greedy(store / "x.safetensors", "hello", 6)
        assert s.engine.base_weights_intact()


def test_budgets_hold_under_churn_and_outputs_stay_exact(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "s", 12)
    settings = make_settings(
        tiny_model_dir,
        store,
        max_resident_adapters=3,
        max_resident_adapter_bytes=3 * DEVICE_BYTES,
        max_host_adapter_bytes=5 * ADAPTER_BYTES,
        max_batch_size=4,
    )
    names = sorted(p.name.removesuffix(".safetensors") for p in store.iterdir())
    expected = {n: offline_greedy(store / f"{n}.safetensors", "hello", 4) for n in names}
    jobs = [random.Random(i).choice(names) for i in range(60)]
    with RunningServer(settings) as s, s.client() as c:
        samples = []
        done = threading.Event()

        def watch():
            while not done.is_set():
                samples.append(c.get("/metrics").text)
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(6) as pool:
                results = list(pool.map(lambda n: (n, generate(c, "hello", n, 4)), jobs))
        finally:
            done.set()
            watcher.join()
        for name, text in results:
            assert text == expected[name], name
        assert len(samples) > 5
        for text in samples:
            assert _metric(text, "neuroada_adapters", tier="resident") <= 3
            assert _metric(text, "neuroada_adapter_bytes", tier="resident") <= 3 * DEVICE_BYTES
            assert _metric(text, "neuroada_adapter_bytes", tier="host") <= 5 * ADAPTER_BYTES
        final = c.get("/metrics").text
        assert _metric(final, "neuroada_adapter_evictions_total", tier="resident") > 0
        assert _metric(final, "neuroada_adapter_evictions_total", tier="host") > 0
        assert s.engine.base_weights_intact()


def test_an_adapter_larger_than_a_tier_is_refused_at_upload_and_listed_invalid_at_start(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "s", 1, k=2)
    model = tiny_llama(seed=0)
    big = adapter_to_bytes(random_adapter(model, k=4, seed=1, scale=0.3))  # twice t000's bytes
    settings = make_settings(tiny_model_dir, store, max_host_adapter_bytes=ADAPTER_BYTES)
    with RunningServer(settings) as s, s.client() as c:
        r = c.put("/adapters/big", content=big)
        assert r.status_code == 413 and "max_host_adapter_bytes" in r.json()["error"]["message"], r.text
        assert sorted(p.name for p in store.iterdir()) == ["t000.safetensors"]
    (store / "big.safetensors").write_bytes(big)
    with RunningServer(settings) as s, s.client() as c:
        invalid = c.get("/adapters").json()["invalid"]
        assert [i["name"] for i in invalid] == ["big"] and "max_host_adapter_bytes" in invalid[0]["error"]
        assert generate(c, "hi", "t000", n=2) is not None


def test_a_pin_of_an_unknown_adapter_or_pins_over_budget_stop_start_up(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "s", 3)
    for overrides, fragment in [
        (dict(pin="nope"), "not in the store"),
        (dict(pin="t000,t001", max_resident_adapters=1), "do not fit"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            Engine(make_settings(tiny_model_dir, store, **overrides))


def test_lora_requests_info_names_running_and_waiting_adapters(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "s", 2)
    with RunningServer(make_settings(tiny_model_dir, store, max_resident_adapters=7)) as s, s.client() as c:
        with long_request(c, adapter="t001"):
            for _ in range(100):  # the worker records its batch's adapters after the step that sent the event
                text = c.get("/metrics").text
                info = next(line for line in text.splitlines() if line.startswith("neuroada_lora_requests_info{"))
                if 'running_lora_adapters="t001"' in info:
                    break
                time.sleep(0.02)
        assert 'running_lora_adapters="t001"' in info and 'max_lora="7"' in info
        assert 'waiting_lora_adapters=""' in info


def test_responses_say_which_tier_their_adapter_was_in_when_queued(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "s", 1)
    with RunningServer(make_settings(tiny_model_dir, store)) as s, s.client() as c:
        body = {"prompt": "hi", "max_new_tokens": 2}
        tiers = [c.post("/generate", params={"adapter": "t000"}, json=body).headers["x-adapter-tier"] for _ in "ab"]
        assert tiers == ["disk", "resident"]
        assert "x-adapter-tier" not in c.post("/generate", json=body).headers
        stream = {"model": "t000", "prompt": "hi", "max_tokens": 2, "stream": True}
        with c.stream("POST", "/v1/completions", json=stream) as r:
            assert r.status_code == 200 and r.headers["x-adapter-tier"] == "resident"


def test_servers_sharing_a_store_serve_each_others_uploads_replacements_and_deletes(tiny_model_dir, tmp_path):
    store = _store(tmp_path / "shared", 1)
    model = tiny_llama(seed=0)
    files = []
    for i in range(3):
        files.append(tmp_path / f"v{i}.safetensors")
        save_adapter(random_adapter(model, k=2, seed=300 + i, scale=0.3), files[-1])
    expected = [offline_greedy(f, "hello there", 8) for f in files]
    shared = dict(shared_store=True)
    with (
        RunningServer(make_settings(tiny_model_dir, store, **shared)) as a,
        RunningServer(make_settings(tiny_model_dir, store, **shared)) as b,
        a.client() as ca,
        b.client() as cb,
    ):
        # Uploaded through one: listed and served by the other, which had never seen it.
        assert ca.put("/adapters/new", content=files[0].read_bytes()).status_code == 201
        assert {x["name"] for x in cb.get("/adapters").json()["adapters"]} == {"t000", "new"}
        assert generate(cb, "hello there", "new", 8) == expected[0]
        assert cb.get("/adapters/new").json()["sha256"] == hashlib.sha256(files[0].read_bytes()).hexdigest()
        # Once a replacement through either has returned, both serve it, while a request that
        # started on the old version finishes on it.
        with long_request(cb, "new") as running:
            for i in (1, 2, 0, 1):
                writer = ca if i % 2 else cb
                assert writer.put("/adapters/new", content=files[i].read_bytes()).status_code == 200
                assert generate(ca, "hello there", "new", 8) == expected[i]
                assert generate(cb, "hello there", "new", 8) == expected[i]
            assert json.loads(next(line for line in running if line.startswith("data: "))[6:])["text"] is not None
        # Deleted through one: 404 on the other.
        assert ca.delete("/adapters/new").status_code == 200
        r = cb.post("/generate", params={"adapter": "new"}, json={"prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found", r.text
        assert cb.get("/adapters/new").status_code == 404
        assert [x["name"] for x in cb.get("/adapters").json()["adapters"]] == ["t000"]
        assert a.engine.base_weights_intact() and b.engine.base_weights_intact()
