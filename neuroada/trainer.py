"""Training the sparse deltas: AdamW over the bypass values only, linear warmup/decay, grad accumulation.

The base model is frozen; only `NeuroAdaLinear.values` receive gradients. Checkpoints hold the
values, optimizer and scheduler state and the step, so a run resumes where it stopped. The loop
trains any named set of parameters (`trainable`): a quality comparison runs PEFT's LoRA factors
through the very same loop, data order, loss masking and schedule.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from neuroada.data import IGNORE_INDEX, TokenizedExample, collate, tokenize_example
from neuroada.model import bypasses

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 3e-3  # sparse deltas want a larger step than dense fine-tuning
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 256  # tokens per example, prompt + response
    warmup_ratio: float = 0.06
    seed: int = 0
    checkpoint: Path | None = None  # resumable state, written every checkpoint_every steps
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1 or self.max_length < 2:
            raise ValueError(f"invalid training config: {self}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class TrainResult:
    steps: int
    final_loss: float  # mean loss over the last logged window
    first_loss: float
    tokens: int
    seconds: float


def train(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    config: TrainConfig,
    progress: bool = True,
    trainable: dict[str, nn.Parameter] | None = None,
) -> TrainResult:
    """Train the attached bypasses of `model` (or the named `trainable` parameters) on
    instruction examples; returns a summary."""
    if trainable is None:
        trainable = {name: m.values for name, m in bypasses(model).items()}
    if not trainable:
        raise ValueError("attach NeuroAda bypasses before training (neuroada.attach)")
    device = next(model.parameters()).device
    data = [tokenize_example(e, tokenizer, config.max_length) for e in examples]
    data = [e for e in data if any(label != IGNORE_INDEX for label in e.labels)]
    if not data:
        raise ValueError("no example has response tokens within max_length")
    steps_per_epoch = max(1, len(data) // (config.batch_size * config.grad_accum))
    total_steps = config.max_steps or steps_per_epoch * config.epochs

    params = list(trainable.values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    warmup = int(total_steps * config.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(warmup, total_steps))
    # What a checkpoint must agree on to be resumed: the data order and the lr schedule.
    run = {
        "examples": len(data),
        "total_steps": total_steps,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "max_length": config.max_length,
        "warmup_ratio": config.warmup_ratio,
        "seed": config.seed,
    }
    step = _resume(config.checkpoint, run, trainable, optimizer, scheduler)

    micro_batches = _micro_batches(data, config, start=step * config.grad_accum)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    model.train()
    losses: list[float] = []
    first_loss = math.nan
    tokens = 0
    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, disable=not progress, desc="train", unit="step")
    while step < total_steps:
        step_loss = 0.0
        for _ in range(config.grad_accum):
            batch = {k: v.to(device) for k, v in collate(next(micro_batches), tokenizer.pad_token_id).items()}
            with autocast:
                loss = model(**batch).loss / config.grad_accum
            loss.backward()
            step_loss += loss.item()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(step_loss)
        if math.isnan(first_loss):
            first_loss = step_loss
        elapsed = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(
            loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", tok_s=f"{tokens / elapsed:.0f}"
        )
        if config.checkpoint and (step % config.checkpoint_every == 0 or step == total_steps):
            _save_checkpoint(config.checkpoint, run, trainable, optimizer, scheduler, step)
    bar.close()
    model.eval()
    window = losses[-max(1, min(20, len(losses) // 5)) :] or [math.nan]
    return TrainResult(
        steps=step,
        final_loss=sum(window) / len(window),
        first_loss=first_loss,
        tokens=tokens,
        seconds=time.perf_counter() - started,
    )


def training_summary(result: TrainResult, config: TrainConfig, data_hash: str, data_name: str) -> dict:
    summary = {k: v for k, v in asdict(config).items() if k not in ("checkpoint", "checkpoint_every")}
    summary.update(
        steps=result.steps,
        final_loss=round(result.final_loss, 5),
        first_loss=round(result.first_loss, 5),
        tokens=result.tokens,
        seconds=round(result.seconds, 1),
        data=data_name,
        data_sha256=data_hash,
    )
    return summary


def _linear_schedule(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def _micro_batches(data: list[TokenizedExample], config: TrainConfig, start: int):
    """Endless, deterministic micro-batches: epoch e is shuffled with seed (seed, e); skips `start`."""
    per_epoch = len(data) // config.batch_size or 1
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        order = list(range(len(data)))
        random.Random(config.seed * 100_003 + epoch).shuffle(order)
        lo = offset * config.batch_size
        yield [data[i] for i in order[lo : lo + config.batch_size]] or [data[order[0]]]
        index += 1


def _save_checkpoint(path: Path, run: dict, trainable: dict[str, nn.Parameter], optimizer, scheduler, step: int):
    state = {
        "run": run,
        "values": {name: p.detach().cpu() for name, p in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _resume(path: Path | None, run: dict, trainable: dict[str, nn.Parameter], optimizer, scheduler) -> int:
    if path is None or not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("run") != run:
        raise ValueError(
            f"checkpoint {path} belongs to another run ({state.get('run')}, this run: {run}); "
            "delete it or choose another checkpoint path"
        )
    if {n: tuple(v.shape) for n, v in state["values"].items()} != {n: tuple(p.shape) for n, p in trainable.items()}:
        raise ValueError(f"checkpoint {path} was made for other target layers or another k")
    for name, values in state["values"].items():
        trainable[name].data.copy_(values)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])
