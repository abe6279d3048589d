"""Adapter management: list, inspect, upload (PUT the safetensors bytes), delete."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from neuroada.errors import AdapterError
from neuroada_server.catalog import AdapterTooLarge
from neuroada_server.deps import get_engine, require_admin
from neuroada_server.engine import Engine
from neuroada_server.errors import ApiError
from neuroada_server.store import InvalidAdapterName, check_name
from neuroada_server.threads import serially

router = APIRouter(prefix="/adapters", dependencies=[Depends(require_admin)])


@router.get("")
async def list_adapters(
    engine: Engine = Depends(get_engine),
    limit: int = Query(100, ge=1, le=1000, description="adapters per page"),
    offset: int = Query(0, ge=0, description="adapters to skip, in name order"),
    prefix: str = Query("", max_length=64, description="only names that start with this"),
):
    total, page = engine.catalog.page(prefix, offset, limit)
    return {
        "base_model": engine.model_name,
        "base_fingerprint": engine.base.fingerprint,
        "applied": engine.applied,
        "total": total,
        "offset": offset,
        "limit": limit,
        "adapters": page,
        "invalid": engine.catalog.invalid(prefix),
    }


@router.get("/{name}")
async def get_adapter(name: str, engine: Engine = Depends(get_engine)):
    described = engine.catalog.describe(_valid(name))
    if described is None:
        why = engine.catalog.unavailable(name)
        raise ApiError(why.status, why.message, why.code)
    return described


@router.put("/{name}", status_code=201, responses={200: {"description": "replaced an adapter of that name"}})
async def put_adapter(name: str, request: Request, response: Response, engine: Engine = Depends(get_engine)):
    _valid(name)
    with _upload_slot(engine):
        incoming = engine.catalog.store.incoming(name)
        try:
            await _receive_into(request, incoming, engine.settings.max_upload_bytes)
            # Validation and the device copy are CPU/GPU work: keep them off the event loop.
            described, replaced = await run_in_threadpool(serially(engine.catalog.upload), name, incoming)
        except AdapterTooLarge as e:
            engine.metrics.uploads.labels(result="rejected").inc()
            raise ApiError(413, f"adapter {name!r} rejected: {e}", "adapter_too_large") from None
        except AdapterError as e:
            engine.metrics.uploads.labels(result="rejected").inc()
            raise ApiError(422, f"adapter {name!r} rejected: {e}", type(e).__name__) from None
        finally:
            incoming.unlink(missing_ok=True)  # gone already once committed
    engine.metrics.uploads.labels(result="replaced" if replaced else "created").inc()
    response.status_code = 200 if replaced else 201
    return described


@router.delete("/{name}")
async def delete_adapter(name: str, engine: Engine = Depends(get_engine)):
    if not await run_in_threadpool(serially(engine.catalog.delete), _valid(name)):
        raise ApiError(404, f"adapter {name!r} not found", "adapter_not_found")
    return {"deleted": name}


def _valid(name: str) -> str:
    try:
        return check_name(name)
    except InvalidAdapterName as e:
        raise ApiError(400, str(e), "invalid_name") from None


@contextmanager
def _upload_slot(engine: Engine):
    """At most max_concurrent_uploads uploads at once; one more is refused, not queued (429)."""
    if not engine.catalog.upload_slots.acquire(blocking=False):
        limit = engine.settings.max_concurrent_uploads
        raise ApiError(
            429,
            f"{limit} uploads are in progress, the limit (max_concurrent_uploads); retry later",
            headers={"Retry-After": "1"},
        )
    try:
        yield
    finally:
        engine.catalog.upload_slots.release()


async def _receive_into(request: Request, path: Path, limit: int) -> None:
    """Stream the body into `path`, a chunk at a time (never whole in memory)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"upload of {declared} bytes exceeds the limit of {limit} bytes (max_upload_bytes)")
    size = 0
    with open(path, "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"upload exceeds the limit of {limit} bytes (max_upload_bytes)")
            f.write(chunk)
    if not size:
        raise ApiError(400, "empty body: PUT the adapter's .safetensors bytes")
