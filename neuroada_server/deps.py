"""Shared FastAPI dependencies: the engine, and the admin-token check."""

from __future__ import annotations

import hmac

from fastapi import Request

from neuroada_server.engine import Engine
from neuroada_server.errors import ApiError


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise ApiError(503, "the model is still loading")
    return engine


def require_admin(request: Request) -> None:
    require_bearer(request, get_engine(request).settings.admin_token, "adapter management")


def require_api_token(request: Request) -> None:
    require_bearer(request, get_engine(request).settings.api_token, "generation")


def require_bearer(request: Request, token: str | None, what: str) -> None:
    """Nothing when `token` is unset; else the request must carry it as a bearer token (401)."""
    if not token:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Constant-time comparison: response timing must not reveal how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(
            401, f"{what} needs 'Authorization: Bearer <token>'", "unauthorized", headers={"WWW-Authenticate": "Bearer"}
        )
