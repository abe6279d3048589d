"""The official openai client against our /v1 endpoints; small deltas on a bf16 base served unmerged."""

from __future__ import annotations

import openai
import pytest
import torch

from neuroada.base_model import load_base_model
from neuroada.config import NeuroAdaConfig
from neuroada.fingerprint import BaseModelSpec
from neuroada.format import LayerDelta, build_adapter, save_adapter
from neuroada.model import attach, bypasses
from tests.helpers import TINY_NAME, tiny_llama, tiny_tokenizer
from tests.neuroada_server.conftest import RunningServer, generate, make_settings, offline_greedy


def test_openai_client_completion_and_streamed_chat(server, store):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    completion = client.completions.create(model="a", prompt="hello there", max_tokens=12, temperature=0)
    assert completion.choices[0].text == offline_greedy(store / "a.safetensors", "hello there", 12)
    assert completion.usage.completion_tokens >= 1

    base = client.completions.create(model=server.engine.model_name, prompt="hello there", max_tokens=12, temperature=0)
    assert base.choices[0].text == offline_greedy(None, "hello there", 12)

    messages = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def _small_delta_adapter(model, scale: float):
    """Top-1 magnitude positions (the coarsest bf16 grid) with deltas far below one bf16 ulp there."""
    spec = BaseModelSpec.from_model(model, TINY_NAME)
    probe = tiny_llama(seed=0, dtype=torch.bfloat16)
    found = attach(probe, NeuroAdaConfig(k=1, targets=("q_proj", "v_proj", "o_proj", "down_proj")))
    g = torch.Generator().manual_seed(0)
    layers = {n: LayerDelta(m.indices, torch.randn(m.indices.shape, generator=g) * scale) for n, m in found.items()}
    return build_adapter(layers, base=spec, selection="magnitude")


def test_small_deltas_on_a_bf16_base_are_served_unmerged_with_bypass_output(tmp_path, tiny_model_dir):
    bf16 = tiny_llama(seed=0, dtype=torch.bfloat16)
    adapter = _small_delta_adapter(bf16, scale=2e-3)
    store = tmp_path / "store"
    save_adapter(adapter, store / "small.safetensors")

    # The bypass model: frozen bf16 base, the adapter's values beside it (the training forward).
    # Loaded like the server loads it (from_pretrained keeps the rotary buffers in float32).
    reference = load_base_model(str(tiny_model_dir), dtype=torch.bfloat16)
    attach(reference, NeuroAdaConfig(k=1, targets=("q_proj", "v_proj", "o_proj", "down_proj")))
    for name, m in bypasses(reference).items():
        m.values.data = adapter.layers[name].values.float()
    tokenizer = tiny_tokenizer()
    ids = tokenizer("hello there", add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = reference.generate(
            ids,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    # Pinned: placed at start-up, so its fidelity is known before any request.
    with RunningServer(make_settings(tiny_model_dir, store, dtype="bfloat16", pin="small")) as s, s.client() as c:
        info = c.get("/adapters/small").json()
        assert info["path"] == "unmerged" and info["tier"] == "resident" and info["pinned"]
        assert info["fidelity"]["survived"] < 0.9 and info["fidelity"]["relative_error"] > 0.1
        assert generate(c, "hello there", "small") == expected
        text = c.get("/metrics").text
        # Alone, an unmerged adapter still takes the mixed path; the bf16 weights are never merged.
        assert 'neuroada_steps_total{path="mixed"}' in text
        assert 'neuroada_steps_total{path="merged"}' not in text
        assert s.engine.base_weights_intact()
