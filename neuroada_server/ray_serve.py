"""neuroada on Ray Serve: N replicas of the engine behind one HTTP address, one shared adapter store.

- `Replica` (N of them): one `Engine` and the ordinary app (`create_app`), called in process with
  each forwarded request; its response streams back chunk by chunk. Its catalog follows the
  shared store (`shared_store`), so an upload, replacement or delete made through any replica
  is what every replica serves from the next request on.
- `Ingress` (one, no CPU reserved): every HTTP request arrives here through Ray's proxy on
  `--host`/`--port`. It reads the adapter the request names (`/generate`'s `adapter`, OpenAI's
  `model`) and forwards the request with `name@version` (the file's SHA-256, 16 hex digits) as
  Ray's multiplexed model id: Ray's router prefers a replica that already holds that version and
  falls back to any after a short wait. Base requests and management carry no id and spread
  over all replicas. Generation is never `@serve.batch`ed (Ray splits such batches by model id):
  each replica's continuous batch mixes adapters as the single server's does.
- `ReplicaMetrics` (a named actor): each replica pushes its /metrics text every few seconds, and
  the ingress's `/metrics` serves them all in one page with a `replica` label.

`neuroada serve --replicas N` runs it on a local Ray instance (or `--ray-address` to join a
cluster); `app_builder` is the entry point for `serve run` and Ray Serve config files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import ray
import torch
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from neuroada.base_model import resolve_model_name
from neuroada_server.app import create_app, with_admin_token
from neuroada_server.deps import require_bearer
from neuroada_server.engine import Engine
from neuroada_server.errors import ApiError, error_body
from neuroada_server.settings import ServerSettings
from neuroada_server.store import AdapterStore, FileIdentity, InvalidAdapterName
from neuroada_server.threads import on_own_thread

log = logging.getLogger(__name__)

APP_NAME = "neuroada"
METRICS_ACTOR = "neuroada-replica-metrics"
METRICS_PUSH_S = 2.0
METRICS_STALE_S = 30.0  # a replica silent this long is gone (Ray replaced it)
# Routes whose JSON body names the adapter (`adapter`, or OpenAI's `model`).
_GENERATION_PATHS = {"/generate": "adapter", "/v1/completions": "model", "/v1/chat/completions": "model"}
# Framing headers of the replica's response: the ingress streams it anew, with its own.
_HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection", b"keep-alive"}


# --- what a request names --------------------------------------------------------------------


def requested_adapter(path: str, query_string: bytes, body: bytes, base_model: str) -> str | None:
    """The adapter a generation request names, or None (the base model, another route, or a body
    the replica will reject: routing does not validate, the replica does)."""
    field = _GENERATION_PATHS.get(path)
    if field is None:
        return None
    name = parse_qs(query_string.decode("latin-1")).get("adapter", [None])[0] if field == "adapter" else None
    if name is None:
        try:
            payload = json.loads(body)
        except ValueError:
            return None
        name = payload.get(field) if isinstance(payload, dict) else None
    if not isinstance(name, str) or name == base_model:
        return None
    return name


class AdapterVersions:
    """`name@version` for the router, from the shared store: one `lstat` a request; the file is
    read and hashed (off the event loop) only when the file under the name changed."""

    def __init__(self, store: AdapterStore):
        self.store = store
        self._known: dict[str, tuple[FileIdentity, str]] = {}

    async def model_id(self, name: str) -> str | None:
        """None when there is no such adapter (the replica answers the 404)."""
        try:
            identity = self.store.identity(name)
            if identity is None:
                self._known.pop(name, None)
                return None
            known = self._known.get(name)
            if known is None or known[0] != identity:
                stored = await asyncio.to_thread(self.store.read, name)
                known = self._known[name] = (stored.identity, stored.sha256)
        except (InvalidAdapterName, OSError):
            return None
        return f"{name}@{known[1][:16]}"


# --- the replica -------------------------------------------------------------------------------


class AdapterModel:
    """What Ray's multiplexing holds per model id: the catalog holds the adapter itself (its tiers
    and budgets decide what stays resident); this only tells Ray's router where it is."""

    def __init__(self, model_id: str):
        self.model_id = model_id


@serve.deployment(name="Replica")
class Replica:
    def __init__(self, settings_json: str):
        settings = ServerSettings.model_validate_json(settings_json)
        if settings.replica_cpus:  # Ray reserves the CPUs; torch must not use more threads than that
            torch.set_num_threads(max(1, int(settings.replica_cpus)))
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.app = create_app(settings)
        self.engine = on_own_thread(Engine, settings)  # not on the actor's thread: neuroada_server.threads
        self.app.state.engine = self.engine  # the app's lifespan does not run: the replica owns the engine
        self.engine.start()
        self.metrics_token = settings.metrics_token

        async def hold(model_id: str) -> AdapterModel:
            return AdapterModel(model_id)

        # Ray's LRU of model ids follows the resident tier's count (the catalog enforces it).
        self._adapter = serve.multiplexed(max_num_models_per_replica=settings.max_resident_adapters)(hold)
        self._stop = threading.Event()
        self._pusher = threading.Thread(target=self._push_metrics, name="neuroada-metrics-push", daemon=True)
        self._pusher.start()

    async def forward(self, request: dict) -> AsyncIterator[dict | bytes]:
        """Run one HTTP request through the app: yields the response's head (status, headers),
        then its body in the chunks the app sends. Closing the generator (the client left)
        reads to the app as the client disconnecting."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self._adapter(model_id)  # tells Ray's router this replica holds the adapter
        async for part in call_asgi(self.app, request):
            if isinstance(part, dict):
                part["headers"].append((b"x-replica", self.replica_id.encode()))
            yield part

    def _push_metrics(self) -> None:
        directory = ReplicaMetrics.options(name=METRICS_ACTOR, get_if_exists=True, lifetime="detached").remote()
        auth = [(b"authorization", f"Bearer {self.metrics_token}".encode())] if self.metrics_token else []
        request = {"method": "GET", "path": "/metrics", "query_string": b"", "headers": auth, "body": b""}
        while not self._stop.wait(METRICS_PUSH_S):
            try:
                text = asyncio.run(_body_of(self.app, request))
                directory.put.remote(self.replica_id, text)
            except Exception:  # metrics must never take a replica down
                log.exception("pushing metrics failed")

    def __del__(self):
        self._stop.set()
        self.engine.stop()


async def call_asgi(app, request: dict) -> AsyncIterator[dict | bytes]:
    """An ASGI app called in process: the response's head, then its body chunks."""
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request["body"], "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["path"].encode(),
        "query_string": request["query_string"],
        "root_path": "",
        "headers": [tuple(h) for h in request["headers"]],
        "client": request.get("client") or ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
    }
    task = asyncio.ensure_future(app(scope, receive, sent.put))
    try:
        while True:
            getter = asyncio.ensure_future(sent.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                task.result()  # the app ended without finishing its response: raise what it raised
                raise RuntimeError("the app ended without a complete response")
            message = getter.result()
            if message["type"] == "http.response.start":
                yield {"status": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, timeout=5)
            except Exception:  # it would not end (TimeoutError) or failed: it is done with either way
                task.cancel()


async def _body_of(app, request: dict) -> str:
    chunks = [part async for part in call_asgi(app, request) if isinstance(part, bytes)]
    return b"".join(chunks).decode()


# --- metrics from every replica -------------------------------------------------------------------


@ray.remote(num_cpus=0)
class ReplicaMetrics:
    """The last /metrics page each replica pushed."""

    def __init__(self):
        self.pages: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.pages[replica] = (time.time(), text)

    def pages_since(self, seconds: float) -> dict[str, str]:
        cutoff = time.time() - seconds
        self.pages = {r: p for r, p in self.pages.items() if p[0] >= cutoff}
        return {r: text for r, (_, text) in self.pages.items()}


def merge_metrics(pages: dict[str, str]) -> str:
    """Prometheus text pages of several replicas as one: each family's lines together under one
    HELP and TYPE, each sample labelled with its replica."""
    families: dict[str, list[str]] = {}
    for replica, text in sorted(pages.items()):
        lines = None
        for line in text.splitlines():
            if line.startswith(("# HELP ", "# TYPE ")):
                lines = families.setdefault(line.split()[2], [])
                if line not in lines[:2]:  # a family's HELP and TYPE come first, once
                    lines.append(line)
            elif line and not line.startswith("#") and lines is not None:
                lines.append(_labelled(line, replica))
    return "".join(line + "\n" for lines in families.values() for line in lines)


def _labelled(sample: str, replica: str) -> str:
    """`name{labels} value` or `name value` with `replica` first among its labels."""
    cut = min(i for i in (sample.find("{"), sample.find(" ")) if i >= 0)
    label = f'replica="{replica}"'
    if sample[cut] == " ":
        return f"{sample[:cut]}{{{label}}}{sample[cut:]}"
    rest = sample[cut + 1 :]
    return f"{sample[:cut]}{{{label}{'' if rest.startswith('}') else ','}{rest}"


# --- the ingress -------------------------------------------------------------------------------


# Every request passes through the ingress, and streams for as long as it generates.
@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
class Ingress:
    def __init__(self, replicas: DeploymentHandle, settings_json: str):
        settings = ServerSettings.model_validate_json(settings_json)
        self.replicas = replicas
        self.metrics_token = settings.metrics_token
        self.max_upload_bytes, self.max_request_bytes = settings.max_upload_bytes, settings.max_request_bytes
        self.base_model = resolve_model_name(settings.model)
        self.versions = AdapterVersions(AdapterStore(settings.adapter_dir, shared=True))

    async def __call__(self, http: Request) -> Response:
        if http.url.path == "/metrics" and http.method == "GET":
            return await self._metrics(http)
        body = await _body_within(http, max(self.max_upload_bytes, self.max_request_bytes))
        if body is None:
            message = f"request body too large (limit {max(self.max_upload_bytes, self.max_request_bytes)} bytes)"
            return JSONResponse(error_body(413, message), status_code=413)
        request = {
            "method": http.method,
            "path": http.url.path,
            "query_string": http.url.query.encode("latin-1"),
            "headers": http.headers.raw,
            "body": body,
            "client": (http.client.host, http.client.port) if http.client else None,
        }
        handle = self.replicas.options(stream=True)
        adapter = requested_adapter(request["path"], request["query_string"], body, self.base_model)
        model_id = await self.versions.model_id(adapter) if adapter is not None else None
        if model_id is not None:
            handle = handle.options(multiplexed_model_id=model_id)
        parts = handle.forward.remote(request)
        try:
            head = await parts.__anext__()
        except RayActorError:
            return _error(503, "the replica serving this request died before it answered; retry", "replica_died")
        except Exception:
            log.exception("a replica failed a request")
            return _error(500, "a replica failed while serving this request", "replica_error")
        response = StreamingResponse(_rest(parts), status_code=head["status"])
        response.raw_headers = [(k, v) for k, v in head["headers"] if k.lower() not in _HOP_HEADERS]
        return response

    async def _metrics(self, http: Request) -> Response:
        try:
            require_bearer(http, self.metrics_token, "/metrics")
        except ApiError as e:  # rendered here: the app's handlers are in the replicas
            return JSONResponse(error_body(e.status, e.message, e.code), status_code=e.status, headers=e.headers)
        directory = ReplicaMetrics.options(name=METRICS_ACTOR, get_if_exists=True, lifetime="detached").remote()
        pages = await directory.pages_since.remote(METRICS_STALE_S)
        return Response(merge_metrics(pages), media_type="text/plain; version=0.0.4; charset=utf-8")


async def _rest(parts) -> AsyncIterator[bytes]:
    """The body after the head; a replica that dies mid-stream ends it (the client sees a cut
    stream: no final event for SSE, a short body otherwise)."""
    try:
        async for chunk in parts:
            yield chunk
    except Exception:  # RayActorError above all: the replica died
        log.warning("a replica failed while streaming a response", exc_info=True)


async def _body_within(http: Request, limit: int) -> bytes | None:
    """The request's body, or None past `limit` bytes (read no further: the ingress holds it whole)."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str, code: str) -> Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(error_body(status, message, code), status_code=status, headers=headers)


# --- building and running it ------------------------------------------------------------------------


def build_app(settings: ServerSettings):
    """The Ray Serve application: `settings.replicas` engines behind one ingress."""
    # Replicas may start in another working directory (or on another node): an absolute store path.
    update = {"shared_store": True, "adapter_dir": settings.adapter_dir.resolve()}
    settings = with_admin_token(settings).model_copy(update=update)
    cpus = settings.replica_cpus or 1
    replica = Replica.options(
        num_replicas=settings.replicas or 1,
        ray_actor_options={"num_cpus": cpus},
        # Generation requests wait in the engine's own queue (it answers 429 past it), not in Ray's.
        max_ongoing_requests=settings.max_queued_requests + settings.max_batch_size,
    ).bind(settings.model_dump_json())
    return Ingress.bind(replica, settings.model_dump_json())


def app_builder(args: dict):
    """For `serve run neuroada_server.ray_serve:app_builder key=value ...` and config files' `import_path`:
    `args` are `ServerSettings` fields (environment variables NEUROADA_* apply too)."""
    return build_app(ServerSettings(**args))


def _serve_http_address() -> tuple[str, int] | None:
    """Where Serve's proxies listen on this cluster (None if Ray no longer tells: a private API)."""
    try:
        config = serve.context._get_global_client().http_config
        return config.host, config.port
    except Exception:
        return None


def serve_on_ray(settings: ServerSettings) -> int:
    """`neuroada serve --replicas N`: start (or join) Ray, deploy, and serve until SIGINT/SIGTERM."""
    if settings.ray_address:
        ray.init(address=settings.ray_address)
    else:
        local_cpus = os.cpu_count() or 1
        if not settings.replica_cpus:
            settings = settings.model_copy(update={"replica_cpus": max(1, local_cpus // (settings.replicas or 1))})
        ray.init(
            num_cpus=max(local_cpus, settings.replica_cpus * (settings.replicas or 1)),
            include_dashboard=False,
            # Request and response bodies pass through it: room for two of the largest uploads.
            object_store_memory=2 * settings.max_upload_bytes + 64 * 1024 * 1024,
        )
    serve.start(http_options={"host": settings.host, "port": settings.port})
    running_at = _serve_http_address()
    if running_at is not None and running_at != (settings.host, settings.port):
        host, port = running_at
        print(
            f"error: Ray Serve already runs on this cluster at {host}:{port}, and its HTTP address is fixed when it "
            f"first starts: pass --host {host} --port {port}, or run `serve shutdown` first",
            file=sys.stderr,
        )
        ray.shutdown()
        return 2
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    print(
        f"neuroada: {settings.replicas} replica(s) on Ray Serve at http://{settings.host}:{settings.port}", flush=True
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    return 0
