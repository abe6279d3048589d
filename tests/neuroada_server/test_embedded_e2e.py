"""End to end with the real embedded SmolLM2-135M-Instruct: `neuroada serve` as a user starts it.

Slow (the model loads in a few seconds from the converted cache, about 25 s the first time).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest
import torch

from neuroada.base_model import load_base_model, load_tokenizer
from neuroada.format import read_adapter
from neuroada.inplace import apply_adapter_, restore_adapter_
from tests.neuroada_server.conftest import ROOT, spawn_serve

SHIPPED = ROOT / "adapters"
PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nTom has 3 apples and buys 5 more. How many apples does he have?\n\n### Response:\n"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    for f in SHIPPED.glob("*.safetensors"):
        shutil.copy(f, store / f.name)
    proc, url = spawn_serve({"NEUROADA_ADAPTER_DIR": str(store)})
    yield url, store
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def offline(adapter_path: Path | None, max_new_tokens: int) -> str:
    model = load_base_model()
    tokenizer = load_tokenizer()
    if adapter_path is not None:
        apply_adapter_(model, read_adapter(adapter_path))
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_shipped_adapters_are_served_and_match_offline_generation(served):
    url, store = served
    with httpx.Client(base_url=url, timeout=300) as c:
        health = c.get("/health").json()
        assert health["base_model"] == "SmolLM2-135M-Instruct" and health["dtype"] == "float32"
        listing = c.get("/adapters").json()
        names = [a["name"] for a in listing["adapters"]]
        assert {"gsm8k", "commonsense"} <= set(names), listing
        assert listing["invalid"] == []
        for adapter in ["gsm8k", None]:
            r = c.post(
                "/generate",
                params={"adapter": adapter} if adapter else {},
                json={"prompt": PROMPT, "max_new_tokens": 24},
            )
            assert r.status_code == 200, r.text
            path = store / f"{adapter}.safetensors" if adapter else None
            assert r.json()["text"] == offline(path, 24)
        assert c.get("/health", params={"deep": 1}).json()["base_weights_intact"] is True


def test_upload_and_use_without_restart(served):
    url, store = served
    data = (SHIPPED / "commonsense.safetensors").read_bytes()
    with httpx.Client(base_url=url, timeout=300) as c:
        assert c.put("/adapters/cs-copy", content=data).status_code == 201
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "cs-copy",
                "max_tokens": 8,
                "temperature": 0,
                "messages": [{"role": "user", "content": "Is the sky blue?"}],
            },
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert (store / "cs-copy.safetensors").read_bytes() == data


def test_the_readme_json_schema_example_gives_the_record_on_the_base_and_an_adapter(served):
    """The README's structured-outputs request, as written there."""
    readme = (ROOT / "README.md").read_text()
    body = json.loads(re.search(r"curl -s 127.0.0.1:8000/v1/chat/completions .* -d '(\{.*?\})'", readme, re.S)[1])
    schema = body["response_format"]["json_schema"]["schema"]
    url, _ = served
    with httpx.Client(base_url=url, timeout=300) as c:
        for model in [body["model"], "commonsense"]:
            r = c.post("/v1/chat/completions", json=body | {"model": model})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            record = json.loads(choice["message"]["content"])
            jsonschema.validate(record, schema)
            assert choice["finish_reason"] == "stop" and record["name"] == "Alice", record


def test_a_named_tool_call_and_a_required_one_on_the_base_and_an_adapter(served):
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": weather}}]
    asked = {"messages": [{"role": "user", "content": "What's the weather like in Paris, in celsius?"}], "tools": tools}
    url, _ = served
    with httpx.Client(base_url=url, timeout=300) as c:
        for model in ["SmolLM2-135M-Instruct", "commonsense"]:
            for choice in [{"type": "function", "function": {"name": "get_weather"}}, "required"]:
                body = asked | {"model": model, "tool_choice": choice, "temperature": 0}
                r = c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                answer = r.json()["choices"][0]
                assert answer["finish_reason"] == "tool_calls" and answer["message"]["tool_calls"]
                for call in answer["message"]["tool_calls"]:  # one, or more for "required"
                    assert call["function"]["name"] == "get_weather"
                    jsonschema.validate(json.loads(call["function"]["arguments"]), weather)


def test_inspect_validates_a_shipped_adapter():
    out = subprocess.run(
        [sys.executable, "-m", "neuroada.cli", "inspect", str(SHIPPED / "gsm8k.safetensors")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "valid for base model SmolLM2-135M-Instruct" in out.stdout
    assert re.search(r"^k +20$", out.stdout, re.MULTILINE)  # the shipped gsm8k adapter: top-20


def test_eval_answers_with_a_shipped_adapter_as_it_is_served(tmp_path):
    """`neuroada eval` as a user runs it: the real model, a shipped adapter, its answers scored."""
    question = {"instruction": "Tom has 3 apples and buys 5 more. How many apples does he have?", "input": ""}
    data = tmp_path / "apples.json"
    data.write_text(json.dumps([{**question, "output": "", "answer": "8"}] * 2))
    out = tmp_path / "eval.jsonl"
    command = ["eval", "--data", str(data), "--adapter", str(SHIPPED / "gsm8k.safetensors"), "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "neuroada.cli", *command, "--max-new-tokens", "24"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["generation"] for r in records] == [offline(SHIPPED / "gsm8k.safetensors", 24)] * 2
    correct = sum(r["correct"] for r in records)
    assert f"apples.json [gsm8k.safetensors]: accuracy {correct / 2:.4f} ({correct}/2)" in run.stdout


def _own_index_set_adapter(model) -> bytes:
    """k=4, random positions (an index set of its own), deltas large enough to change the output."""
    from neuroada.base_model import EMBEDDED_MODEL
    from neuroada.fingerprint import BaseModelSpec, linear_layers
    from neuroada.format import LayerDelta, adapter_to_bytes, build_adapter
    from neuroada.selection import select_topk

    g = torch.Generator().manual_seed(7)
    layers = {}
    for name, linear in linear_layers(model).items():
        if name.endswith(("q_proj", "v_proj", "down_proj")):
            indices = select_topk(linear.weight, 4, "random", seed=len(layers))
            layers[name] = LayerDelta(indices, torch.randn(indices.shape, generator=g) * 0.05)
    base = BaseModelSpec.from_model(model, EMBEDDED_MODEL)
    return adapter_to_bytes(build_adapter(layers, base=base, selection="random"))


def test_a_mixed_batch_on_the_embedded_model_equals_each_adapter_served_alone(served, tmp_path):
    """Every request of a mixed batch equals its output served alone with its adapter merged."""
    url, store = served
    model, tokenizer = load_base_model(), load_tokenizer()
    files = {name: store / f"{name}.safetensors" for name in ["gsm8k", "commonsense"]}
    files["own"] = tmp_path / "own.safetensors"
    files["own"].write_bytes(_own_index_set_adapter(model))
    questions = ["Tom has 3 apples and buys 5 more.", "Is the sky blue?", "Name a color.", "What is 12 - 4?"]
    prompts = [PROMPT.replace("Tom has 3 apples and buys 5 more. How many apples does he have?", q) for q in questions]
    jobs = [(adapter, p) for adapter in [None, "gsm8k", "commonsense", "own"] for p in prompts[:2]]
    jobs += [(adapter, prompts[2 + i % 2]) for i, adapter in enumerate(["own", "gsm8k", None, "commonsense"])]

    expected = {}
    for adapter in [None, "gsm8k", "commonsense", "own"]:
        sparse = read_adapter(files[adapter]) if adapter else None
        saved = apply_adapter_(model, sparse) if sparse else None
        for job in [j for j in jobs if j[0] == adapter]:
            ids = tokenizer(job[1], add_special_tokens=False, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            expected[job] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        if sparse:
            restore_adapter_(model, sparse, saved)

    def mixed_steps(c) -> float:
        lines = [x for x in c.get("/metrics").text.splitlines() if x.startswith('neuroada_steps_total{path="mixed"}')]
        return float(lines[0].split()[-1]) if lines else 0.0

    with httpx.Client(base_url=url, timeout=300) as c:
        assert c.put("/adapters/own", content=files["own"].read_bytes()).status_code in (200, 201)
        before = mixed_steps(c)

        def run(job):
            params = {"adapter": job[0]} if job[0] else {}
            r = c.post("/generate", params=params, json={"prompt": job[1], "max_new_tokens": 16})
            assert r.status_code == 200, r.text
            return job, r.json()["text"]

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            results = list(pool.map(run, jobs))
        assert mixed_steps(c) > before
        assert c.get("/health", params={"deep": 1}).json()["base_weights_intact"] is True
    assert len({text for _, text in results}) > 4  # the adapters really differ
    for job, text in results:
        assert text == expected[job], job
