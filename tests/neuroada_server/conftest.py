"""A real neuroada HTTP server (uvicorn on a free loopback port) around a tiny model, per test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from neuroada.format import read_adapter, save_adapter
from neuroada.inplace import apply_adapter_
from neuroada_server.app import create_app
from neuroada_server.engine import round_linear_weights_
from neuroada_server.settings import ServerSettings
from tests.helpers import random_adapter, tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float = 30):
    """`condition()`'s first truthy value, polled until `timeout` s (then its last value): for state
    another thread or process reaches in its own time, which a loaded machine may stretch."""
    deadline = time.monotonic() + timeout
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def spawn_serve(env_overrides: dict[str, str], timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """`neuroada serve` in its own process on a free port, as a user starts it; waits for /health."""
    port = free_port()
    env = dict(os.environ, NEUROADA_PORT=str(port), **env_overrides)
    # Its output goes to a file, not a pipe: a pipe no one reads fills up (Ray forwards every
    # replica's log to its driver, this process) and the server then blocks on a write.
    output = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuroada.cli", "serve"], env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            output.seek(0)
            raise RuntimeError(f"neuroada serve exited: {output.read().decode()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("neuroada serve did not become ready")
        time.sleep(0.2)


class RunningServer:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.app = create_app(settings)
        self.url = f"http://127.0.0.1:{settings.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=settings.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self._thread.start()
        deadline = time.monotonic() + 120
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(seed=0).save_pretrained(folder)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def store(tmp_path, tiny_model_dir) -> Path:
    """An adapter store holding four adapters for the tiny model: a, b, c (k=2, 4, 1) and d."""
    folder = tmp_path / "adapters"
    model = tiny_llama(seed=0)
    for name, k, seed in [("a", 2, 1), ("b", 4, 2), ("c", 1, 3), ("d", 2, 4)]:
        save_adapter(random_adapter(model, k=k, seed=seed, scale=0.3), folder / f"{name}.safetensors")
    return folder


LONG_TOKENS = 20_000  # a long request: far longer than any test waits; it is cancelled, never finished


@contextmanager
def long_request(client: httpx.Client, adapter: str | None = None):
    """A streamed request that is generating when the block starts, and hangs up when it ends."""
    params = {"adapter": adapter} if adapter else {}
    body = {"prompt": "abc", "max_new_tokens": LONG_TOKENS, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/generate", params=params, json=body) as response:
        lines = response.iter_lines()
        next(lines)  # its first event arrived: it holds a batch row
        yield lines


def metric(client: httpx.Client, sample: str) -> float:
    """A sample of `/metrics`, named with its labels (`neuroada_requests_total{adapter="a",status="200"}`);
    0 where it is not there yet."""
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


def make_settings(model_dir: Path, store: Path, **overrides) -> ServerSettings:
    values = dict(
        model=str(model_dir),
        adapter_dir=store,
        port=free_port(),
        max_batch_size=8,
        max_wait_ms=50,
        max_new_tokens=LONG_TOKENS,
    )
    values.update(overrides)
    return ServerSettings(**values)


@pytest.fixture
def server(tiny_model_dir, store):
    with RunningServer(make_settings(tiny_model_dir, store)) as running:
        yield running


PROMPTS = ["hello there", "what does the cow say?", "1 + 2 =", "a"]


def adapted_model(adapter_path, weight_dtype: torch.dtype = torch.float32):
    """A fresh copy of the model, the adapter merged with the per-layer kernels, in float32. With a
    `weight_dtype`, the linear weights are rounded to it first (the adapter merged into them there,
    as the server merges it), then widened back."""
    model = tiny_llama(seed=0)
    round_linear_weights_(model, weight_dtype)
    if adapter_path is not None:
        apply_adapter_(model, read_adapter(adapter_path))
    return model.float()


def offline_greedy(adapter_path, prompt: str, max_new_tokens: int, weight_dtype: torch.dtype = torch.float32) -> str:
    """HF generate() on `adapted_model`."""
    model = adapted_model(adapter_path, weight_dtype)
    tokenizer = tiny_tokenizer()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def generate(client, prompt: str, adapter: str | None, n: int = 12) -> str:
    params = {"adapter": adapter} if adapter else {}
    r = client.post("/generate", params=params, json={"prompt": prompt, "max_new_tokens": n})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == adapter
    return r.json()["text"]
