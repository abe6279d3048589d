"""A server killed with SIGKILL mid-upload loses nothing that was committed and serves no partial file."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import httpx

from tests.neuroada_server.conftest import spawn_serve, wait_for


def start(model_dir: Path, store: Path) -> tuple[subprocess.Popen, str]:
    return spawn_serve({"NEUROADA_MODEL": str(model_dir), "NEUROADA_ADAPTER_DIR": str(store)}, timeout=120)


def test_sigkill_during_upload_then_restart(tiny_model_dir, store):
    stale = store / ".a.safetensors.x1y2.tmp"  # left by an earlier crash mid-write
    stale.write_bytes(b"half an adapter")
    before = {p.name: p.read_bytes() for p in store.iterdir() if not p.name.startswith(".")}
    proc, url = start(tiny_model_dir, store)
    assert not stale.exists()
    data = (store / "b.safetensors").read_bytes()
    sent_half = threading.Event()

    def slow_body():
        yield data[: len(data) // 2]
        sent_half.set()
        time.sleep(5)
        yield data[len(data) // 2 :]

    def upload():
        try:
            httpx.put(f"{url}/adapters/new", content=slow_body(), timeout=30)
        except httpx.HTTPError:
            pass

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert sent_half.wait(10)
    assert wait_for(lambda: list(store.glob(".new.*.tmp")))  # the server is streaming it to disk
    proc.kill()  # SIGKILL: no shutdown code runs
    proc.wait(timeout=30)
    uploader.join(timeout=30)

    after = {p.name: p.read_bytes() for p in store.iterdir() if not p.name.startswith(".")}
    assert after == before  # nothing partial under a final name, nothing lost
    # The upload was streaming into a temp file in the store: the next start sweeps it away.
    assert [p.name for p in store.glob(".*")] and all(p.name.startswith(".new.") for p in store.glob(".*"))

    proc, url = start(tiny_model_dir, store)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == before
    try:
        listing = httpx.get(f"{url}/adapters").json()
        assert [a["name"] for a in listing["adapters"]] == ["a", "b", "c", "d"] and listing["invalid"] == []
        r = httpx.post(f"{url}/generate", params={"adapter": "a"}, json={"prompt": "hi", "max_new_tokens": 3})
        assert r.status_code == 200
        assert httpx.get(f"{url}/health", params={"deep": 1}).json()["base_weights_intact"] is True
    finally:
        proc.terminate()
        proc.wait(timeout=30)
