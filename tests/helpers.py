"""Builders shared by the tests: tiny random Llama models and adapters made for them."""

from __future__ import annotations

import torch
from safetensors.torch import save as st_save
from transformers import LlamaConfig, LlamaForCausalLM

from neuroada import errors
from neuroada.fingerprint import BaseModelSpec
from neuroada.format import AdapterMetadata, LayerDelta, SparseAdapter, build_adapter, index_set_hash

TINY_NAME = "tiny-llama"
Q = "model.layers.0.self_attn.q_proj"  # [64, 64] in tiny_llama
DOWN = "model.layers.1.mlp.down_proj"  # [64, 96] in tiny_llama


def _tiny_shape(vocab_size: int) -> dict:
    """The tiny models' shape, whatever their family."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=vocab_size - 1,  # the tiny tokenizer's <eos>
        pad_token_id=vocab_size - 1,
        initializer_range=0.3,  # frozen tied embeddings need a usable logit scale for training tests
    )


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, vocab_size: int = 257) -> LlamaForCausalLM:
    config = LlamaConfig(
        **_tiny_shape(vocab_size),
        max_position_embeddings=20_100,  # servers check prompt + max_new_tokens against it (tests go to 20,000)
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    return model


def random_adapter(
    model: torch.nn.Module,
    k: int = 2,
    scale: float = 0.05,
    seed: int = 0,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
) -> SparseAdapter:
    """Random unique indices and random deltas on the model's target layers."""
    spec = BaseModelSpec.from_model(model, TINY_NAME)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (d_out, d_in) in spec.linear_shapes.items():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        indices = torch.rand(d_out, d_in, generator=g).argsort(dim=1)[:, :k]
        values = torch.randn(d_out, k, generator=g) * scale
        layers[name] = LayerDelta(indices, values)
    return build_adapter(layers, base=spec, selection="random")


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <eos>) built in memory, for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    """A learnable task: the answer is a fixed word chosen by the animal named in the instruction."""
    import random

    words = {"cat": "meow 1", "dog": "woof 2", "cow": "moo 3", "owl": "hoot 4"}
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        animal = rng.choice(sorted(words))
        examples.append(
            {
                "instruction": f"What does the {animal} say?",
                "input": "",
                "output": words[animal],
                "answer": words[animal].split()[-1],
            }
        )
    return examples


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2")


def tiny_family(model_type: str, seed: int = 0, vocab_size: int = 257):
    """A tiny random causal LM of one model family (config.model_type), float32, frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **_tiny_shape(vocab_size), head_dim=16, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.requires_grad_(False)
    return model


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    """Token ids in [1, 250), one prompt of each length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 250, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def logits_over_a_batch_life(forward) -> list[torch.Tensor]:
    """A `BatchForward`'s logits as rows join in two groups, all decode, one leaves, and a split
    half steps alone and merges back (twelve decode steps; the split is the tenth)."""
    seen = []
    logits, _, first, _ = forward.prefill(random_prompts(0, [5, 2, 9]))
    forward.join(first)
    seen.append(logits)
    tokens = logits.argmax(-1).tolist()
    for step in range(12):
        if step == 3:
            logits, _, more, _ = forward.prefill(random_prompts(1, [12, 1]))
            forward.join(more)
            seen.append(logits)
            tokens += logits.argmax(-1).tolist()
        if step == 6:
            forward.keep([0, 2, 3, 4])
            tokens = [tokens[i] for i in (0, 2, 3, 4)]
        if step == 9:
            other = forward.split(2)
            a, b = forward.decode(tokens[:2]), other.decode(tokens[2:])
            forward.merge(other)
            logits = torch.cat([a, b])
        else:
            logits = forward.decode(tokens)
        seen.append(logits)
        tokens = logits.argmax(-1).tolist()
    return seen


def write_raw(path, layers: dict, k: int, spec: BaseModelSpec, meta_overrides: dict | None = None) -> bytes:
    """A safetensors file with the given tensors and otherwise consistent metadata."""
    tensors = {}
    for name, (indices, values) in layers.items():
        tensors[f"{name}.indices"] = indices
        tensors[f"{name}.values"] = values
    names = sorted(layers)
    meta = AdapterMetadata(
        base_model=TINY_NAME,
        base_fingerprint=spec.fingerprint,
        k=k,
        selection="magnitude",
        index_hash=index_set_hash({n: layers[n][0] for n in names}),
        targets=names,
        created="2026-11-26T00:00:00+00:00",
    ).to_strings()
    meta.update(meta_overrides or {})
    data = st_save(tensors, metadata=meta)
    path.write_bytes(data)
    return data


def good_layer(d_out=64, k=2):
    """A valid (indices, values) pair for a tiny_llama linear with `d_out` outputs."""
    indices = torch.arange(k, dtype=torch.int16).repeat(d_out, 1)
    return indices, torch.full((d_out, k), 0.01, dtype=torch.bfloat16)


def malformed_layers(name: str):
    """One adapter fault by name: (layers for `write_raw`, the error it must raise, a fragment of its message)."""
    idx, val = good_layer()
    if name == "unknown module":
        return {"model.layers.0.self_attn.nope": (idx, val)}, errors.UnknownModuleError, "nope"
    if name == "not linear":
        return {"model.layers.0.input_layernorm": (idx, val)}, errors.NotLinearError, "input_layernorm"
    if name == "d_out mismatch":
        i, v = good_layer(d_out=65)
        return {Q: (i, v)}, errors.DOutMismatchError, "d_out=65"
    if name == "shapes differ":
        return {Q: (idx, val[:, :1].contiguous())}, errors.ShapeError, Q
    if name == "index out of range":
        i = idx.clone()
        i[5, 1] = 96  # DOWN has d_in = 96
        return {DOWN: (i, val)}, errors.IndexOutOfRangeError, "96"
    if name == "negative index":
        i = idx.clone()
        i[0, 0] = -3
        return {Q: (i, val)}, errors.IndexOutOfRangeError, "-3"
    if name == "duplicate index":
        i = idx.clone()
        i[7] = torch.tensor([4, 4])
        return {Q: (i, val)}, errors.DuplicateIndexError, "row 7"
    if name == "non-finite value":
        v = val.clone()
        v[3, 0] = float("nan")
        return {Q: (idx, v)}, errors.NonFiniteValueError, Q
    if name == "float32 values":
        return {Q: (idx, val.float())}, errors.DtypeError, "bfloat16"
    if name == "int64 indices":
        return {Q: (idx.long(), val)}, errors.DtypeError, "int16 or int32"
    raise AssertionError(name)


MALFORMED = [  # the names malformed_layers knows
    "unknown module",
    "not linear",
    "d_out mismatch",
    "shapes differ",
    "index out of range",
    "negative index",
    "duplicate index",
    "non-finite value",
    "float32 values",
    "int64 indices",
]
