"""The `neuroada` console script: a thin argparse layer over the Python API.

Subcommands of packages above this one (`serve` and `eval`, from `neuroada_server`: they run the serving
engine) register through the `neuroada.commands` entry-point group, so nothing here imports upward.
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
    try:
        return int(args.func(args) or 0)
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuroada", description="Train and serve NeuroAda sparse-delta adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_inspect(sub)
    _add_train(sub)
    _add_merge(sub)
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
    rows = [("file", f"{args.file} ({args.file.stat().st_size:,} bytes)")]
    rows += [
        (key, getattr(meta, key))
        for key in (
            "format",
            "format_version",
            "base_model",
            "base_fingerprint",
            "k",
            "selection",
            "index_hash",
            "created",
        )
    ]
    rows += [
        ("layers", len(adapter.layers)),
        ("parameters", f"{adapter.num_params:,}"),
        ("tensor bytes", f"{adapter.nbytes:,}"),
    ]
    rows += [(f"training.{key}", value) for key, value in (meta.training or {}).items()]
    for key, value in rows:
        print(f"{key:<22} {value}")
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


def _add_train(sub: argparse._SubParsersAction) -> None:
    from neuroada.config import SAVED_INPUT_DTYPES
    from neuroada.format import SELECTIONS

    p = sub.add_parser("train", help="train a NeuroAda adapter on an LLM-Adapters JSON data file")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", required=True, type=Path, help="training data, LLM-Adapters JSON")
    p.add_argument("--out", required=True, type=Path, help="adapter file to write (.safetensors)")
    p.add_argument("--top-k", type=int, default=1, help="inputs adapted per output neuron (default 1)")
    p.add_argument(
        "--targets",
        default=None,
        help="comma-separated module-name suffixes (default: every attention and MLP projection of the model's family)",
    )
    p.add_argument("--selection", default="magnitude", choices=SELECTIONS)
    p.add_argument(
        "--saved-inputs",
        default="float32",
        choices=tuple(SAVED_INPUT_DTYPES),
        help="dtype of the layer inputs kept for the gradient (CPU): bfloat16 halves the bypass's activation memory",
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    p.add_argument("--checkpoint", type=Path, default=None, help="resumable state (default: OUT.ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import torch

    from neuroada.base_model import load_base_model, load_tokenizer, resolve_model_name
    from neuroada.config import NeuroAdaConfig, default_targets
    from neuroada.data import file_sha256, load_examples
    from neuroada.fingerprint import BaseModelSpec
    from neuroada.format import save_adapter
    from neuroada.model import attach, export
    from neuroada.trainer import TrainConfig, train, training_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = resolve_model_name(args.model)
    model = load_base_model(args.model, device=device)
    tokenizer = load_tokenizer(args.model)
    base = BaseModelSpec.from_model(model, name)
    na_config = NeuroAdaConfig(
        k=args.top_k,
        targets=tuple(t for t in args.targets.split(",") if t)
        if args.targets
        else default_targets(model.config.model_type),
        selection=args.selection,
        seed=args.seed,
        saved_inputs=args.saved_inputs,
    )
    attach(model, na_config)
    examples = load_examples(args.data)[: args.limit]
    config = TrainConfig(
        lr=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        checkpoint=args.checkpoint or args.out.with_name(args.out.name + ".ckpt"),
        checkpoint_every=args.checkpoint_every,
    )
    result = train(model, tokenizer, examples, config)
    summary = training_summary(result, config, file_sha256(args.data), args.data.name)
    summary["saved_inputs"] = na_config.saved_inputs
    adapter = export(model, base, selection=na_config.selection, training=summary)
    save_adapter(adapter, args.out)
    print(
        f"wrote {args.out}: {len(adapter.layers)} layers, k={na_config.k}, {adapter.num_params:,} parameters; "
        f"{result.steps} steps, loss {result.first_loss:.4f} -> {result.final_loss:.4f}, {result.seconds:.0f} s"
    )
    return 0


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="write a Hugging Face model folder with the adapter merged in")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=_merge)


def _merge(args: argparse.Namespace) -> int:
    model, tokenizer = _model_with_adapter(args.model, args.adapter, "cpu")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote merged model to {args.out}")
    return 0


def _model_with_adapter(model_name: str | None, adapter_path: Path | None, device: str):
    """The base model with an adapter merged into its weights (validated first)."""
    from neuroada.base_model import load_base_model, load_tokenizer, resolve_model_name
    from neuroada.fingerprint import BaseModelSpec
    from neuroada.format import load_adapter
    from neuroada.inplace import apply_adapter_

    model = load_base_model(model_name, device=device)
    tokenizer = load_tokenizer(model_name)
    if adapter_path is not None:
        adapter = load_adapter(adapter_path, BaseModelSpec.from_model(model, resolve_model_name(model_name)))
        apply_adapter_(model, adapter)
    return model, tokenizer


if __name__ == "__main__":
    sys.exit(main())
