"""Continuous batching and mixed-adapter batches: every request's output equals it served alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from neuroada.fingerprint import BaseModelSpec
from neuroada.format import adapter_to_bytes, save_adapter
from neuroada.inplace import PackedWeights
from neuroada_kernels import add_mixed_delta_, triton_available
from neuroada_server import mixed as server_mixed
from neuroada_server.generation import Finished, GenerationRequest, RunningBatch, SamplingParams
from neuroada_server.mixed import MixedAdapters
from neuroada_server.resident import AdapterLoader
from neuroada_server.scheduler import BatchScheduler, QueueFull
from tests.helpers import TINY_NAME, random_adapter, tiny_llama, tiny_tokenizer
from tests.neuroada_server.conftest import PROMPTS, RunningServer, generate, long_request, make_settings, offline_greedy


def _request(prompt: str, n: int, events: dict, adapter: str | None = None) -> GenerationRequest:
    ids = tiny_tokenizer()(prompt, add_special_tokens=False).input_ids
    return GenerationRequest(
        ids, adapter, SamplingParams(max_new_tokens=n), lambda e: events.setdefault(prompt, []).append(e)
    )


@pytest.mark.parametrize("runner", ["auto", "hf"])
def test_requests_joining_and_leaving_a_running_batch_each_equal_offline_generation(runner):
    model, tokenizer = tiny_llama(seed=0), tiny_tokenizer()
    batch = RunningBatch(model, tokenizer, {tokenizer.eos_token_id}, tokenizer.eos_token_id, runner)
    events: dict[str, list] = {}
    plan = {0: [("a", 20)], 3: [("what does the cow say?", 6), ("1 + 2 =", 15)], 5: [("hello there", 9)]}
    for step in range(40):
        if step in plan:
            batch.join([_request(p, n, events) for p, n in plan[step]])
        if batch:
            batch.step()
    assert not batch
    for prompts in plan.values():
        for prompt, n in prompts:
            finished = events[prompt][-1]
            assert isinstance(finished, Finished) and finished.text == offline_greedy(None, prompt, n), prompt


@pytest.fixture
def mixed_store(tmp_path):
    """Adapters with their own index sets (a, b, g) and two sharing one (x, y); g touches other layers."""
    folder = tmp_path / "mixed"
    model = tiny_llama(seed=0)
    adapters = {
        "a": random_adapter(model, k=2, seed=1, scale=0.3),
        "b": random_adapter(model, k=4, seed=2, scale=0.3),
        "g": random_adapter(model, k=1, seed=3, scale=0.5, targets=("gate_proj", "o_proj")),
        "x": random_adapter(model, k=3, seed=5, scale=0.3),
        "y": random_adapter(model, k=3, seed=5, scale=0.6),  # same seed: same indices as x
    }
    for name, adapter in adapters.items():
        save_adapter(adapter, folder / f"{name}.safetensors")
    return folder


def _steps(server, path: str) -> float:
    line = f'neuroada_steps_total{{path="{path}"}}'
    with server.client() as c:
        for text in c.get("/metrics").text.splitlines():
            if text.startswith(line):
                return float(text.split()[-1])
    return 0.0


def test_a_mixed_batch_gives_every_request_its_merged_output(tiny_model_dir, mixed_store):
    jobs = [(adapter, prompt) for adapter in [None, "a", "b", "g", "x", "y"] for prompt in PROMPTS]
    expected = {
        job: offline_greedy(None if job[0] is None else mixed_store / f"{job[0]}.safetensors", job[1], 10)
        for job in jobs
    }
    with RunningServer(make_settings(tiny_model_dir, mixed_store, max_batch_size=16)) as s:
        with s.client() as c, ThreadPoolExecutor(max_workers=16) as pool:
            results = list(
                pool.map(lambda job: (job, generate(c, job[1], job[0], n=10)), jobs[::3] + jobs[1::3] + jobs[2::3])
            )
        for job, text in results:
            assert text == expected[job], job
        assert _steps(s, "mixed") > 0
        # x and y share an index set: one set of indices on the device, a slot each for their values.
        x = s.engine.catalog.resident("x")
        shared = s.engine.adapters.mixed._sets[x.adapter.metadata.index_hash]
        assert {s.engine.catalog.resident(n).version for n in "xy"} <= set(shared.slot_of)
        assert s.engine.base_weights_intact()


def test_a_short_request_joins_and_leaves_while_a_long_one_runs(server, store):
    with server.client() as c, long_request(c, adapter="a") as long:
        text = generate(c, "hello there", "b", n=8)
        # The long request is still generating: the short one joined its batch and left it.
        assert json.loads(next(line for line in long if line.startswith("data: "))[6:]).get("finish_reason") is None
    assert text == offline_greedy(store / "b.safetensors", "hello there", 8)
    assert _steps(server, "mixed") > 0


def test_one_adapter_per_batch_mode_never_mixes_and_stays_exact(tiny_model_dir, store):
    jobs = [(adapter, prompt) for adapter in [None, "a", "c"] for prompt in PROMPTS[:2]]
    expected = {
        job: offline_greedy(None if job[0] is None else store / f"{job[0]}.safetensors", job[1], 8) for job in jobs
    }
    with RunningServer(make_settings(tiny_model_dir, store, mixed_batches=False)) as s:
        with s.client() as c, ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(lambda job: (job, generate(c, job[1], job[0], n=8)), jobs * 2))
        for job, text in results:
            assert text == expected[job], job
        assert _steps(s, "mixed") == 0 and _steps(s, "merged") > 0


def _queued(adapter, age: float = 0.0) -> GenerationRequest:
    r = GenerationRequest([1], adapter, SamplingParams(), lambda e: None)
    r.enqueued_at -= age
    return r


def test_mixed_admission_is_first_come_first_served_up_to_the_free_rows():
    scheduler = BatchScheduler(max_batch_size=4, max_queued=10, max_wait_s=1.0)
    queued = [_queued(a) for a in ["a", "b", None, "a", "c"]]
    for r in queued:
        scheduler.submit(r)
    assert scheduler.admit(running=["z", "z"], applied=None) == queued[:2]
    assert scheduler.admit(running=["z"] * 4, applied=None) == []
    assert scheduler.admit(running=[], applied=None) == queued[2:]


def test_per_adapter_admission_keeps_one_adapter_and_drains_for_an_overdue_one():
    scheduler = BatchScheduler(max_batch_size=8, max_queued=10, max_wait_s=1.0, mixed=False)
    a1, b1, a2 = _queued("a"), _queued("b"), _queued("a")
    for r in (a1, b1, a2):
        scheduler.submit(r)
    assert scheduler.admit(running=[], applied="a") == [a1, a2]
    overdue = _queued("c", age=5.0)
    scheduler._queue.appendleft(overdue)
    assert scheduler.admit(running=["a"], applied="a") == []  # the running batch drains for c
    assert scheduler.admit(running=[], applied="a") == [overdue]
    assert scheduler.admit(running=[], applied="c") == [b1]


@torch.inference_mode()
def test_the_mixed_path_on_the_triton_add_gives_the_same_logits(monkeypatch):
    """Each layer's deltas added into its output by the Triton kernel a CUDA step runs (here under the
    interpreter), every projection adapted, rows on two adapters and none: the CPU path's logits."""
    if not triton_available():
        pytest.skip("no triton")
    model = tiny_llama(seed=0)
    loader = AdapterLoader(PackedWeights(model), BaseModelSpec.from_model(model, TINY_NAME), fidelity_threshold=0.9)
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    a = loader.prepare("a", adapter_to_bytes(random_adapter(model, k=2, seed=1, scale=0.3, targets=every)))
    b = loader.prepare("b", adapter_to_bytes(random_adapter(model, k=1, seed=2, scale=0.3)))
    ids = torch.randint(0, 256, (3, 5), generator=torch.Generator().manual_seed(0))
    mixed = MixedAdapters(model, torch.device("cpu"))
    mixed.bind([a, None, b])
    own = model(ids).logits
    calls = []

    def on_triton(out, x, indices, values, slots, check_ranges=True):
        calls.append(1)
        add_mixed_delta_(out, x, indices, values, slots, check_ranges, backend="triton")

    monkeypatch.setattr(server_mixed, "add_mixed_delta_", on_triton)
    kernel = model(ids).logits
    mixed.unbind()
    assert len(calls) == 7 * model.config.num_hidden_layers + 3 * model.config.num_hidden_layers  # a's 7, b's 3
    torch.testing.assert_close(kernel, own, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(own[0], model(ids).logits[0])  # row a's adapter did something


def test_adapter_slots_grow_and_are_reused_without_mixing_up_adapters():
    model = tiny_llama(seed=0)
    base = BaseModelSpec.from_model(model, TINY_NAME)
    packed = PackedWeights(model)
    loader = AdapterLoader(packed, base, fidelity_threshold=0.9)
    # One index set (same seed), six value sets (scales): more adapters than the first stack holds.
    residents = [
        loader.prepare(f"r{i}", adapter_to_bytes(random_adapter(model, k=2, seed=5, scale=0.2 + 0.1 * i)))
        for i in range(6)
    ]
    mixed = MixedAdapters(model, torch.device("cpu"))
    ids = torch.randint(0, 256, (4, 6), generator=torch.Generator().manual_seed(0))

    def alone(resident, row):
        saved = packed.apply_(resident.delta) if resident else None
        with torch.no_grad():
            logits = model(ids[row : row + 1]).logits[0]
        if resident:
            packed.restore_(resident.delta, saved)
        return logits

    r = residents
    for rows in ([r[0], r[1], r[2], None], [r[3], r[4], r[5], r[3]], [r[0], r[5], None, r[1]]):
        mixed.bind(rows)  # grows the stack, then evicts least recently used slots
        with torch.no_grad():
            logits = model(ids).logits
        mixed.unbind()  # the merged path runs the plain model: every linear has its own forward back
        assert not any("forward" in vars(m) for m in model.modules())
        for i, resident in enumerate(rows):
            torch.testing.assert_close(logits[i], alone(resident, i), rtol=1e-4, atol=1e-4)
    assert len(mixed._sets) == 1 and mixed._sets[r[0].adapter.metadata.index_hash].capacity == 4


def test_requests_are_queued_all_or_none():
    scheduler = BatchScheduler(max_batch_size=4, max_queued=3, max_wait_s=1.0)
    first = _queued(None)
    scheduler.submit(first)
    with pytest.raises(QueueFull):
        scheduler.submit(*[_queued(None) for _ in range(3)])  # room for two of them only
    assert scheduler.depth() == 1
    both = [_queued(None), _queued(None)]
    scheduler.submit(*both)
    assert scheduler.admit(running=[], applied=None) == [first, *both]


def test_a_cancelled_queued_request_ends_cancelled_even_when_its_listener_fails():
    scheduler = BatchScheduler(max_batch_size=4, max_queued=10, max_wait_s=1.0)
    ended = []
    gone = GenerationRequest([1, 2], "a", SamplingParams(), ended.append)
    broken = GenerationRequest([1], "a", SamplingParams(), lambda e: 1 / 0)  # its client's loop closed
    waiting = _queued("a")
    scheduler.submit(gone, broken, waiting)
    gone.cancelled.set()
    broken.cancelled.set()
    assert scheduler.admit(running=[], applied=None) == [waiting]
    (event,) = ended  # one final event: what it holds (its adapter) is released on it
    assert isinstance(event, Finished) and event.finish_reason == "cancelled" and event.prompt_tokens == 2
    assert scheduler.depth() == 0
