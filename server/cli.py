"""`neuroada serve`: registered into the neuroada CLI through the `neuroada.commands` entry point."""

from __future__ import annotations

import argparse
import sys

import uvicorn
from pydantic import ValidationError

from server.settings import ServerSettings


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the base model and the adapter store over HTTP")
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help = f"{field.description} [env NEUROADA_{name.upper()}]"
        if field.annotation is bool:  # `--flag` alone means true; `--flag false` is accepted too
            p.add_argument(flag, dest=name, default=None, nargs="?", const="true", help=help)
        else:
            p.add_argument(flag, dest=name, default=None, help=help)
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    from server.app import create_app

    overrides = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as e:
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"])
            print(f"error: {where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    if settings.replicas is not None:
        from server.ray_serve import serve_on_ray  # Ray only where asked for: it is an optional extra

        return serve_on_ray(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        # A backstop: handlers still open this long after the signal are cancelled.
        timeout_graceful_shutdown=settings.shutdown_drain_s + 5,
    )
    _DrainingServer(config, app).run()
    return 0


class _DrainingServer(uvicorn.Server):
    """uvicorn waits for open requests before the app's shutdown runs, so the engine must start
    draining at the signal itself: running requests then end within `shutdown_drain_s`."""

    def __init__(self, config, app):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig, frame) -> None:
        engine = getattr(self.app.state, "engine", None)
        if engine is not None:
            engine.drain()
        super().handle_exit(sig, frame)
