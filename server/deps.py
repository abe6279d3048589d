"""Shared FastAPI dependencies: the engine, and the admin-token check."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.engine import Engine
from server.errors import ApiError


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise ApiError(503, "the model is still loading")
    return engine


def require_admin(request: Request) -> None:
    token = get_engine(request).settings.admin_token
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # Constant-time comparison: response timing must not reveal how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "adapter management needs 'Authorization: Bearer <admin token>'", "unauthorized",
                       headers={"WWW-Authenticate": "Bearer"})
