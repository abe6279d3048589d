"""The engine's start-up choices, through a real server: bf16 linear weights beside float32 activations."""

from __future__ import annotations

import torch

from server.engine import round_linear_weights_
from tests.helpers import tiny_llama
from tests.server.conftest import PROMPTS, RunningServer, generate, long_request, make_settings, offline_greedy


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
            assert generate(c, prompt, None) == offline_greedy(None, prompt, 12, torch.bfloat16)
        assert generate(c, "hello there", "a") == offline_greedy(
            store / "a.safetensors", "hello there", 12, torch.bfloat16
        )
        assert c.get("/adapters/a").json()["path"] == "merged"  # its deltas survive bf16: merged alone
        with long_request(c, "a"):  # a second adapter beside it: the mixed path, over bf16 weights
            assert generate(c, "hello there", "b")
        assert 'neuroada_steps_total{path="mixed"}' in c.get("/metrics").text
        assert s.engine.base_weights_intact()
