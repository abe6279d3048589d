"""GET /health (liveness, readiness, base model identity; ?deep=1, admin only, checks the base
weights) and /metrics (behind metrics_token when one is set)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from neuroada_server.deps import get_engine, require_bearer
from neuroada_server.errors import ApiError
from neuroada_server.threads import serially

router = APIRouter()


@router.get("/health")
async def health(request: Request, deep: bool = Query(False, description="also verify the base weights' checksum")):
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        return JSONResponse({"status": "loading", "ready": False}, status_code=503)
    body = {
        "status": "ok",
        "ready": True,
        "base_model": engine.model_name,
        "base_fingerprint": engine.base.fingerprint,
        "device": str(engine.packed.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "weight_dtype": str(engine.packed.dtype).removeprefix("torch."),
        # null: every decode step eager (compile_decode off, or its compilation failed)
        "compiled_decode": engine.decode_graphs.describe() if engine.decode_graphs else None,
        # null: off (prefix_cache_bytes 0, or Hugging Face's forward)
        "prefix_cache": engine.prefix_cache.describe() if engine.prefix_cache is not None else None,
        "adapters": engine.catalog.count(),
        "queue_depth": engine.scheduler.depth(),
    }
    if deep:
        # It reads every weight: not for anyone who can reach the port.
        require_bearer(request, engine.settings.admin_token, "/health?deep=1 (the admin token)")
        if not engine.deep_check_lock.acquire(blocking=False):
            raise ApiError(429, "a deep health check is already running; retry later", headers={"Retry-After": "1"})
        try:
            intact = await run_in_threadpool(serially(engine.base_weights_intact))
        finally:
            engine.deep_check_lock.release()
        body["base_weights_intact"] = intact
        if not intact:
            body["status"] = "corrupt"
            return JSONResponse(body, status_code=500)
    return body


@router.get("/metrics", responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}})
async def metrics(request: Request):
    engine = get_engine(request)
    require_bearer(request, engine.settings.metrics_token, "/metrics")
    engine.metrics.queue_depth.set(engine.scheduler.depth())
    engine.catalog.update_gauges()
    info = engine.metrics.lora_requests_info
    info.clear()
    info.labels(
        running_lora_adapters=",".join(sorted(engine.worker.running_adapters)),
        waiting_lora_adapters=",".join(sorted(engine.scheduler.waiting_adapters())),
        max_lora=str(engine.catalog.budgets.max_resident_adapters),
    ).set(time.time())
    return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
