"""The engine's start-up choices, through a real server: bf16 linear weights beside float32
activations; the decode step compiled."""

from __future__ import annotations

import threading

import httpx
import torch

from neuroada_server.engine import round_linear_weights_
from neuroada_server.forward.graphs import DecodeGraphs
from tests.helpers import tiny_llama
from tests.neuroada_server.conftest import (
    LONG_TOKENS,
    PROMPTS,
    RunningServer,
    generate,
    long_request,
    make_settings,
    metric,
    offline_greedy,
    spawn_serve,
)


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


def test_a_compiled_decode_serves_the_greedy_text_merged_and_mixed_steps_compiled(tiny_model_dir, store):
    """`neuroada serve --compile-decode` as a user starts it, over the torch twins (the C++ kernels
    off: they are not traceable), so inductor compiles the float32 step: one bucket of 2 rows, the
    merged step and mixed steps of the store's two commonest adapter shapes (a and d: k = 2; b: k = 4)."""
    env = {
        "NEUROADA_MODEL": str(tiny_model_dir),
        "NEUROADA_ADAPTER_DIR": str(store),
        "NEUROADA_CPU_KERNELS": "0",
        "NEUROADA_COMPILE_DECODE": "1",
        "NEUROADA_COMPILE_BATCH_SIZES": "2",
        "NEUROADA_MAX_BATCH_SIZE": "2",
        "NEUROADA_MAX_PROMPT_TOKENS": "64",
        "NEUROADA_MAX_NEW_TOKENS": str(LONG_TOKENS),
    }
    merged, mixed = (f'neuroada_compiled_decode_steps_total{{path="{path}"}}' for path in ("merged", "mixed"))
    proc, url = spawn_serve(env, timeout=600)
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            compiled = c.get("/health").json()["compiled_decode"]
            assert compiled["batch_sizes"] == [2] and compiled["compile_seconds"] > 0 and compiled["broken"] is None
            assert compiled["mixed_shapes"] == [{"k": 2, "layers": 6}, {"k": 4, "layers": 6}]
            for prompt in PROMPTS:  # one row, padded to two
                assert generate(c, prompt, None) == offline_greedy(None, prompt, 12)
            assert generate(c, "hello there", "a") == offline_greedy(store / "a.safetensors", "hello there", 12)
            assert metric(c, merged) >= 5 * 11  # five requests of 12 tokens: every decode step compiled
            with long_request(c):  # a base row beside a's: mixed steps of one index set, compiled
                assert generate(c, "hello there", "a") == offline_greedy(store / "a.safetensors", "hello there", 12)
            assert metric(c, mixed) >= 11
            compiled_mixed, mixed_steps = metric(c, mixed), metric(c, 'neuroada_steps_total{path="mixed"}')
            with long_request(c, "a"):  # b's rows beside a's: two index sets in one step, eager
                assert generate(c, "hello there", "b") == offline_greedy(store / "b.safetensors", "hello there", 12)
            assert metric(c, 'neuroada_steps_total{path="mixed"}') - mixed_steps >= 11
            assert metric(c, mixed) - compiled_mixed < 11
            assert c.get("/health").json()["compiled_decode"]["broken"] is None
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_compile_decode_where_it_cannot_compile_serves_eager(tiny_model_dir, store):
    # float32 on the CPU runs our C++ kernels, which are not traceable
    with RunningServer(make_settings(tiny_model_dir, store, compile_decode=True)) as s, s.client() as c:
        assert c.get("/health").json()["compiled_decode"] is None
        assert generate(c, "hello there", None) == offline_greedy(None, "hello there", 12)
        assert 'neuroada_compiled_decode_steps_total{path="merged"}' not in c.get("/metrics").text


def test_the_decode_step_is_compiled_on_the_worker_thread_before_the_server_answers(tiny_model_dir, store, monkeypatch):
    """A CUDA graph tree belongs to the thread that records it: the worker's, which replays it. It
    is told the store's commonest adapter shape (k, targets): a and d have k = 2."""
    warmed = []

    def warm_up(graphs, mixed_shapes):  # records where it ran; compiles nothing (the e2e test above does)
        warmed.append((threading.current_thread().name, [k for k, _ in mixed_shapes]))
        graphs.broken = "not compiled in this test"
        return False

    monkeypatch.setattr(DecodeGraphs, "warm_up", warm_up)
    settings = make_settings(
        tiny_model_dir, store, dtype="bfloat16", compile_decode=True, max_batch_size=4, compile_mixed_shapes=1
    )
    with RunningServer(settings) as s, s.client() as c:
        [(thread, ks)] = warmed  # done before the server answered its first request
        assert thread == "neuroada-worker" and ks == [2]
        compiled = c.get("/health").json()["compiled_decode"]
        assert compiled == {
            "batch_sizes": [1, 4],
            "mixed_shapes": [],
            "compile_seconds": 0.0,
            "broken": "not compiled in this test",
        }
        assert generate(c, "hello there", None)
