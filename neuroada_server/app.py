"""The FastAPI app: built by `create_app`, with the engine loaded in the lifespan (not at import)."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from neuroada_server.engine import Engine
from neuroada_server.errors import BodyLimit, install_error_handlers
from neuroada_server.routes import adapters, generate, health, openai, tokens
from neuroada_server.schemas import ERROR_RESPONSES
from neuroada_server.settings import ServerSettings
from neuroada_server.threads import in_own_thread


def create_app(settings: ServerSettings, engine_factory: Callable[[ServerSettings], Engine] = Engine) -> FastAPI:
    """The app; its engine (model, adapters, worker) is built from `settings` at start-up.

    `engine_factory` lets a benchmark put another engine behind the same front end.
    """

    settings = with_admin_token(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Its own thread, ended by the build: a pooled thread would keep the build's OpenMP team
        # (neuroada_server.threads).
        app.state.engine = await in_own_thread(engine_factory, settings)
        app.state.engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(app.state.engine.stop)

    app = FastAPI(title="neuroada", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES)
    app.state.engine = None
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_json_bytes=settings.max_request_bytes, max_upload_bytes=settings.max_upload_bytes)
    for module in (generate, openai, tokens, adapters, health):
        app.include_router(module.router)
    return app


def with_admin_token(settings: ServerSettings) -> ServerSettings:
    """`generate_admin_token` with no token set: make one and print it once (as Jupyter does)."""
    if settings.admin_token or not settings.generate_admin_token:
        return settings
    token = secrets.token_urlsafe(32)
    print(
        f"neuroada: adapter management needs 'Authorization: Bearer {token}' (generated admin token; "
        "set NEUROADA_ADMIN_TOKEN to choose your own)",
        file=sys.stderr,
        flush=True,
    )
    return settings.model_copy(update={"admin_token": token})
