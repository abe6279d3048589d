"""A PEFT-LoRA engine behind neuroada's own HTTP front end, scheduler and decode loop (benchmark only).

    python benchmarks/peers/lora_server.py --adapter-dir STORE --port 8001 [--rank 8] [--threads 2]

For every adapter name in the store it serves a LoRA adapter of that name instead (rank `--rank`,
alpha 2r, random non-zero factors on the same seven projections), so a load generator can send
the very same requests to both servers. Every step runs unmerged with PEFT's mixed batches
(`adapter_names`, rows without an adapter as `__base__`): what a LoRA server must do to keep
requests of different adapters in one batch. The sparse adapters of the store are only used to
accept the names; their deltas are never applied.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from neuroada_server.engine import Engine  # noqa: E402
from neuroada_server.generation import GenerationRequest  # noqa: E402
from neuroada_server.settings import ServerSettings  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _WithAdapterNames(nn.Module):
    """Passes the rows' adapter names to every forward call of the PEFT model."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.peft_model = peft_model
        self.adapter_names: list[str] = []

    def forward(self, logits_to_keep: int = 0, **kwargs):
        return self.peft_model(**kwargs, logits_to_keep=logits_to_keep, adapter_names=self.adapter_names)


class LoraAdapters:
    """The worker's `BatchAdapters` for PEFT's mixed LoRA batches: every step unmerged, each row's
    adapter named (rows without one as `__base__`)."""

    applied_name = None  # nothing is ever merged

    def __init__(self, model: _WithAdapterNames, metrics):
        self.model = model
        self.metrics = metrics

    def plan(self, requests: list[GenerationRequest]) -> None:
        self.metrics.steps.labels(path="lora").inc()

    def bind(self, rows: list[GenerationRequest]) -> None:
        self.model.adapter_names = [r.adapter or "__base__" for r in rows]

    def reset(self) -> None:
        pass


class LoraEngine(Engine):
    def __init__(self, settings: ServerSettings, rank: int = 8):
        super().__init__(settings)
        from peft import LoraConfig, get_peft_model

        names = [a["name"] for a in self.catalog.page()[1]]
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), init_lora_weights=False)
        torch.manual_seed(0)
        peft_model = get_peft_model(self.model, config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, config)
        peft_model.eval()
        self.model = _WithAdapterNames(peft_model)
        self.worker.model = self.model
        self.worker.adapters = LoraAdapters(self.model, self.metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import uvicorn

    from neuroada_server.app import create_app

    settings = ServerSettings(adapter_dir=args.adapter_dir, port=args.port, max_batch_size=args.max_batch_size)
    app = create_app(settings, engine_factory=lambda s: LoraEngine(s, rank=args.rank))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
