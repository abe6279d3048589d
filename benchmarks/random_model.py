"""A model folder of the embedded model's shape and tokenizer with random weights, and adapters for it.

    python benchmarks/random_model.py OUT [--like FOLDER] [--adapters 2] [--k 1 4]

For a machine the embedded model cannot reach: a lent GPU gets 64 MiB of files per call and the
model's GGUF is 98 MB, but its config and tokenizer files are 3.4 MB. `--like` is a folder holding
those (default: the embedded model's converted folder, `neuroada.base_model`); OUT gets them, random
weights of that shape (seeded, so every machine makes the same model) and `--adapters` random
NeuroAda adapters for it in OUT/adapters (magnitude selection, k cycling through `--k`), ready for
`neuroada serve --model OUT` and `benchmarks/serve_check.py --model OUT --adapters OUT/adapters/*`.
Speed and behaviour are the real model's; the text is not.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from switch import random_adapter  # noqa: E402

from neuroada.base_model import load_tokenizer, resolve_model_name  # noqa: E402
from neuroada.fingerprint import BaseModelSpec  # noqa: E402
from neuroada.format import save_adapter  # noqa: E402

SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--like", type=Path, default=None, help="config and tokenizer files (default: embedded)")
    parser.add_argument("--adapters", type=int, default=2)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    like = args.like or Path(load_tokenizer().name_or_path)  # the embedded model's converted folder
    args.out.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if (like / name).exists():
            shutil.copy(like / name, args.out / name)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.out)).eval()
    model.save_pretrained(args.out)
    base = BaseModelSpec.from_model(model, resolve_model_name(str(args.out)))
    (args.out / "adapters").mkdir(exist_ok=True)
    for i in range(args.adapters):
        k = args.k[i % len(args.k)]
        adapter = random_adapter(model, base, k=k, seed=100 + i)
        save_adapter(adapter, args.out / "adapters" / f"random{i}-k{k}.safetensors")
    print(
        f"wrote {args.out}: {sum(p.numel() for p in model.parameters()):,} random parameters, {args.adapters} adapters"
    )


if __name__ == "__main__":
    main()
