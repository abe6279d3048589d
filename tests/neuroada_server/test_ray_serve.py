"""`neuroada serve --replicas 2` on a real local Ray instance: affinity, one shared store, faults.

One server for the module (Ray and two engines take a minute to start on two cores). The tests
reach single replicas through a deployment handle from a driver attached to the same Ray
instance: through HTTP, Ray's router decides which replica answers.
"""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import time

import httpx
import pytest

from neuroada.format import save_adapter
from neuroada_server.ray_serve import APP_NAME, merge_metrics, requested_adapter
from tests.helpers import random_adapter, tiny_llama
from tests.neuroada_server.conftest import PROMPTS, ROOT, generate, offline_greedy, spawn_serve

ray = pytest.importorskip("ray")
import yaml  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Adapter files for the tiny model: a, b and s in the store at start (s for the affinity test
    alone), u0-u2 to upload."""
    folder = tmp_path_factory.mktemp("ray-files")
    model = tiny_llama(seed=0)
    paths = {}
    for i, name in enumerate(["a", "b", "u0", "u1", "u2", "s"]):
        paths[name] = folder / f"{name}.safetensors"
        save_adapter(random_adapter(model, k=2, seed=500 + i, scale=0.3), paths[name])
    return paths


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, adapters, tmp_path_factory):
    """The server as a user starts it, and a Ray driver attached to its Ray instance."""
    store = tmp_path_factory.mktemp("ray-store")
    for name in "abs":
        (store / f"{name}.safetensors").write_bytes(adapters[name].read_bytes())
    env = {
        "NEUROADA_REPLICAS": "2",
        "NEUROADA_MODEL": str(tiny_model_dir),
        "NEUROADA_ADAPTER_DIR": str(store),
        "NEUROADA_MAX_BATCH_SIZE": "8",
        "NEUROADA_MAX_NEW_TOKENS": "20000",
    }
    proc, url = spawn_serve(env, timeout=600)
    try:
        ray.init(address="auto", namespace="serve", log_to_driver=False)
        deadline = time.monotonic() + 300
        while serve.status().applications[APP_NAME].status != "RUNNING":  # both replicas up
            assert time.monotonic() < deadline, serve.status()
            time.sleep(1)
        yield url
    finally:
        ray.shutdown()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)


def _replica_outputs(prompt: str, adapter: str | None, n: int = 8, replicas: int = 2) -> dict[str, tuple[int, str]]:
    """(status, text or error) from each replica: requests with no multiplexed id, which Ray
    spreads, until every replica has answered once."""
    handle = serve.get_deployment_handle("Replica", app_name=APP_NAME).options(stream=True)
    params = {"prompt": prompt, "max_new_tokens": n, "adapter": adapter}
    request = {"method": "POST", "path": "/generate", "query_string": b"", "body": json.dumps(params).encode()}
    request["headers"] = [(b"content-type", b"application/json")]
    seen = {}
    for _ in range(60):
        parts = list(handle.forward.remote(request))
        head, body = parts[0], json.loads(b"".join(parts[1:]))
        replica = dict(head["headers"])[b"x-replica"].decode()
        seen[replica] = (head["status"], body["text"] if head["status"] == 200 else body["error"]["code"])
        if len(seen) == replicas:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered")


def test_outputs_equal_the_single_process_servers_and_name_their_replica(cluster, adapters):
    with httpx.Client(base_url=cluster, timeout=120) as c:
        for prompt in PROMPTS[:2]:
            assert generate(c, prompt, None, 8) == offline_greedy(None, prompt, 8)
            assert generate(c, prompt, "a", 8) == offline_greedy(adapters["a"], prompt, 8)
        r = c.post("/v1/completions", json={"model": "b", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-replica"]
        assert r.json()["choices"][0]["text"] == offline_greedy(adapters["b"], PROMPTS[0], 8)
        streamed = c.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 8, "stream": True})
        data = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        events = [json.loads(d) for d in data[:-1]]
        assert "".join(e["text"] for e in events) == offline_greedy(None, PROMPTS[0], 8)
        assert events[-1]["finish_reason"] == "length"


def test_adapter_requests_stay_on_the_replica_that_holds_the_adapter_and_base_requests_spread(cluster):
    with httpx.Client(base_url=cluster, timeout=120) as c:

        def replica(adapter):
            params = {"adapter": adapter} if adapter else {}
            r = c.post("/generate", params=params, json={"prompt": "hi", "max_new_tokens": 2})
            assert r.status_code == 200, r.text
            return r.headers["x-replica"]

        # An adapter no request named before: a second request within the beat before its replica tells
        # Ray's router (every 0.1 s) could load it elsewhere too, as one that another test named last can.
        replica("s")  # loaded somewhere
        time.sleep(1)  # its replica has told the router
        assert len({replica("s") for _ in range(12)}) == 1
        assert len({replica(None) for _ in range(30)}) == 2


def test_uploads_replacements_and_deletes_reach_both_replicas(cluster, adapters):
    prompt = PROMPTS[1]
    with httpx.Client(base_url=cluster, timeout=120) as c:
        r = c.put("/adapters/up", content=adapters["u0"].read_bytes())
        assert r.status_code == 201, r.text
        expected = offline_greedy(adapters["u0"], prompt, 8)
        assert {v for v in _replica_outputs(prompt, "up").values()} == {(200, expected)}
        for name in ("u1", "u2", "u1"):
            assert c.put("/adapters/up", content=adapters[name].read_bytes()).status_code == 200
            expected = offline_greedy(adapters[name], prompt, 8)
            assert generate(c, prompt, "up", 8) == expected  # through Ray's router, at once
            assert {v for v in _replica_outputs(prompt, "up").values()} == {(200, expected)}
        assert c.delete("/adapters/up").status_code == 200
        assert {v for v in _replica_outputs(prompt, "up").values()} == {(404, "adapter_not_found")}
        r = c.post("/generate", params={"adapter": "up"}, json={"prompt": prompt, "max_new_tokens": 2})
        assert r.status_code == 404, r.text


def test_metrics_of_every_replica_in_one_page(cluster):
    with httpx.Client(base_url=cluster, timeout=120) as c:
        _replica_outputs("hi", None, 2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = c.get("/metrics").text
            replicas = {line.split('replica="')[1].split('"')[0] for line in text.splitlines() if "replica=" in line}
            if len(replicas) == 2:
                break
            time.sleep(1)
        assert len(replicas) == 2, text[:2000]
        assert "# TYPE neuroada_requests_total counter" in text


def test_a_client_that_hangs_up_stops_its_generation_on_its_replica(cluster):
    with httpx.Client(base_url=cluster, timeout=120) as c:
        body = {"prompt": "abc", "max_new_tokens": 20000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/generate", json=body) as r:
            replica = r.headers["x-replica"]
            next(line for line in r.iter_lines() if line.startswith("data: "))
        # Hung up: the replica's batch empties (its metrics reach the ingress every 2 s).
        series = f'neuroada_running_requests{{replica="{replica}"}}'
        deadline = time.monotonic() + 60
        while True:
            running = [line for line in c.get("/metrics").text.splitlines() if line.startswith(series)]
            if running == [f"{series} 0.0"]:
                break
            assert time.monotonic() < deadline, running
            time.sleep(1)


def test_a_killed_replica_fails_only_its_own_requests_and_comes_back(cluster):
    with httpx.Client(base_url=cluster, timeout=120) as c:
        body = {"prompt": "abc", "max_new_tokens": 20000, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/generate", json=body) as doomed:
            victim = doomed.headers["x-replica"]
            lines = doomed.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            [actor] = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(victim)]
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            # Its stream is cut: no final event. Requests meanwhile go to the other replica.
            data = [line[6:] for line in lines if line.startswith("data: ")]
            assert "[DONE]" not in data and not any("finish_reason" in json.loads(d) for d in data)
        for _ in range(6):
            r = c.post("/generate", json={"prompt": "hi", "max_new_tokens": 2})
            assert r.status_code == 200 and r.headers["x-replica"] != victim, r.text
        # Ray starts a new replica in its place.
        deadline = time.monotonic() + 240
        while True:
            try:
                replicas = set(_replica_outputs("hi", None, 2))
                if victim not in replicas:
                    break
            except AssertionError:  # its replacement is still starting
                assert time.monotonic() < deadline, "no replica replaced the killed one"
            time.sleep(2)
        assert len(replicas) == 2


def test_the_serve_config_file_builds_the_application(tmp_path):
    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "ray_serve.yaml").read_text()))
    [app] = config.applications
    module, builder = app.import_path.split(":")
    application = getattr(importlib.import_module(module), builder)({**app.args, "adapter_dir": str(tmp_path)})
    assert isinstance(application, serve.Application)
    with pytest.raises(ValueError, match="replicas"):
        getattr(importlib.import_module(module), builder)({"replicas": 0})


def test_the_router_reads_the_adapter_where_each_route_names_it():
    body = json.dumps({"prompt": "x", "adapter": "a"}).encode()
    assert requested_adapter("/generate", b"", body, "base") == "a"
    assert requested_adapter("/generate", b"adapter=q", b"{}", "base") == "q"
    assert requested_adapter("/v1/chat/completions", b"", b'{"model": "c"}', "base") == "c"
    assert requested_adapter("/v1/completions", b"", b'{"model": "base"}', "base") is None
    assert requested_adapter("/v1/completions", b"", b"not json", "base") is None
    assert requested_adapter("/adapters/a", b"", body, "base") is None


def test_merged_metrics_label_each_replicas_samples():
    page = (
        '# HELP x_total things\n# TYPE x_total counter\nx_total{adapter="a b{"} 2.0\n'
        "# HELP y up\n# TYPE y gauge\ny 1.0\n"
    )
    merged = merge_metrics({"r1": page, "r2": page.replace("2.0", "5.0")})
    assert merged.splitlines() == [
        "# HELP x_total things",
        "# TYPE x_total counter",
        'x_total{replica="r1",adapter="a b{"} 2.0',
        'x_total{replica="r2",adapter="a b{"} 5.0',
        "# HELP y up",
        "# TYPE y gauge",
        'y{replica="r1"} 1.0',
        'y{replica="r2"} 1.0',
    ]


def test_without_replicas_serve_runs_no_ray(tiny_model_dir, tmp_path):
    proc, url = spawn_serve({"NEUROADA_MODEL": str(tiny_model_dir), "NEUROADA_ADAPTER_DIR": str(tmp_path)})
    try:
        r = httpx.get(f"{url}/health")
        assert r.status_code == 200 and "x-replica" not in r.headers
        assert "_raylet" not in open(f"/proc/{proc.pid}/maps").read()  # Ray was never imported
    finally:
        proc.terminate()
        proc.wait(timeout=60)
