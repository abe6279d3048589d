"""`neuroada serve`: registered into the neuroada CLI through the `neuroada.commands` entry point."""

from __future__ import annotations

import argparse

from server.settings import ServerSettings


def add_serve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the base model and the adapter store over HTTP")
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, default=None, help=f"{field.description} [env NEUROADA_{name.upper()}]")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    overrides = {k: v for k, v in vars(args).items() if k in ServerSettings.model_fields and v is not None}
    settings = ServerSettings(**overrides)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
