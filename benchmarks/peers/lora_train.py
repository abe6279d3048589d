"""PEFT LoRA trained by neuroada's own loop (benchmark peer for `benchmarks/quality.py`).

The same seven projections as NeuroAda's default targets, AdamW with weight decay 0, the linear
schedule, data order, prompt template and loss masking of `neuroada.trainer.train`: only the
trainable parameters differ. The result is merged into the base weights and saved as a plain
Hugging Face folder, which `neuroada serve --model FOLDER` serves like any base model, so both
methods are evaluated by the same server.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase

from neuroada.trainer import TrainConfig, TrainResult, train

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_trainable(model: nn.Module, rank: int, alpha: int | None = None, dropout: float = 0.05):
    """`model` wrapped with LoRA adapters (alpha 2r unless given); returns (peft model, its factors)."""
    config = LoraConfig(
        r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=list(TARGETS), bias="none"
    )
    peft_model = get_peft_model(model, config)
    factors = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    return peft_model, factors


def train_lora(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict],
    config: TrainConfig,
    rank: int,
    out: Path,
) -> tuple[TrainResult, int]:
    """Train LoRA factors of `rank` on `model`, merge them and save the merged model to `out`
    (a Hugging Face folder with the tokenizer); returns the result and the trainable count."""
    peft_model, factors = lora_trainable(model, rank)
    result = train(peft_model, tokenizer, examples, config, trainable=factors)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return result, sum(p.numel() for p in factors.values())
