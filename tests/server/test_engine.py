"""The engine's start-up choices, through a real server: bf16 linear weights beside float32 activations."""

from __future__ import annotations

import torch

from neuroada.format import read_adapter
from neuroada.inplace import apply_adapter_
from server.engine import round_linear_weights_
from tests.helpers import tiny_llama, tiny_tokenizer
from tests.server.conftest import PROMPTS, RunningServer, generate, long_request, make_settings


def rounded_greedy(adapter_path, prompt: str, max_new_tokens: int) -> str:
    """HF generate() in float32 over the tiny model whose linear weights were rounded to bf16 (the
    adapter merged into them there, as the server merges), then widened back."""
    model = tiny_llama(seed=0)
    round_linear_weights_(model, torch.bfloat16)
    if adapter_path is not None:
        apply_adapter_(model, read_adapter(adapter_path))
    model.float()
    tokenizer = tiny_tokenizer()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_round_linear_weights_keeps_norms_and_a_tied_embedding_tied():
    model = tiny_llama(seed=0)
    round_linear_weights_(model, torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32


def test_bf16_weights_serve_the_model_with_rounded_weights(tiny_model_dir, store):
    with RunningServer(make_settings(tiny_model_dir, store, weight_dtype="bfloat16")) as s, s.client() as c:
        health = c.get("/health").json()
        assert health["dtype"] == "float32" and health["weight_dtype"] == "bfloat16"
        for prompt in PROMPTS:  # "1 + 2 =" continues differently once the weights are rounded
            assert generate(c, prompt, None) == rounded_greedy(None, prompt, 12)
        assert generate(c, "hello there", "a") == rounded_greedy(store / "a.safetensors", "hello there", 12)
        assert c.get("/adapters/a").json()["path"] == "merged"  # its deltas survive bf16: merged alone
        with long_request(c, "a"):  # a second adapter beside it: the mixed path, over bf16 weights
            assert generate(c, "hello there", "b")
        assert 'neuroada_steps_total{path="mixed"}' in c.get("/metrics").text
        assert s.engine.base_weights_intact()
