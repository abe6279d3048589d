"""The `neuroada` console script: a thin argparse layer over the Python API.

Subcommands of packages above this one (`serve`, from `server`) register through the
`neuroada.commands` entry-point group, so nothing here imports upward.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

from neuroada.errors import AdapterError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuroada", description="Train and serve NeuroAda sparse-delta adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_inspect(sub)
    for add_command in _plugin_commands():
        add_command(sub)
    return parser


def _plugin_commands():
    for ep in sorted(entry_points(group="neuroada.commands"), key=lambda e: e.name):
        yield ep.load()


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print an adapter's metadata and validate it against a base model")
    p.add_argument("file", type=Path, help="adapter .safetensors file")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from neuroada.base_model import load_base_model, resolve_model_name
    from neuroada.fingerprint import BaseModelSpec
    from neuroada.format import read_adapter, validate_adapter

    try:
        adapter = read_adapter(args.file)
    except (AdapterError, OSError) as e:
        print(f"invalid adapter {args.file}: {e}", file=sys.stderr)
        return 1
    meta = adapter.metadata
    print(f"file            {args.file} ({args.file.stat().st_size:,} bytes)")
    for key in ("format", "format_version", "base_model", "base_fingerprint", "k", "selection", "index_hash", "created"):
        print(f"{key:<15} {getattr(meta, key)}")
    print(f"layers          {len(adapter.layers)}")
    print(f"parameters      {adapter.num_params:,}")
    print(f"tensor bytes    {adapter.nbytes:,}")
    if meta.training:
        for key, value in meta.training.items():
            print(f"training.{key:<6} {value}")
    for name, d in list(adapter.layers.items())[:3]:
        print(f"  {name}: indices {tuple(d.indices.shape)} {d.indices.dtype}, values {d.values.dtype}")
    if len(adapter.layers) > 3:
        print(f"  ... and {len(adapter.layers) - 3} more layers")

    name = resolve_model_name(args.model)
    model = load_base_model(args.model)
    try:
        validate_adapter(adapter, BaseModelSpec.from_model(model, name))
    except AdapterError as e:
        print(f"invalid for base model {name}: {e}", file=sys.stderr)
        return 1
    print(f"valid for base model {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
