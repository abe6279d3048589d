"""The compiled decode step: padded to its bucket, over a cache that never moves, eager where it must be.

The models are bf16, the pure-torch path a GPU runs (the C++ CPU kernels take float32 and are not
traceable); the compiler is dynamo's, its graphs run as traced (inductor's code generation would
add minutes and test nothing of ours)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from neuroada.fingerprint import BaseModelSpec
from neuroada.format import adapter_to_bytes
from neuroada.inplace import PackedWeights
from neuroada_server.forward import HFForward, LlamaForward
from neuroada_server.forward.graphs import DecodeGraphs, compile_decode
from neuroada_server.mixed import MixedAdapters
from neuroada_server.resident import AdapterLoader
from tests.helpers import TINY_NAME, logits_over_a_batch_life, random_adapter, random_prompts, tiny_llama

PAD = 0


class Captured:
    """A torch.compile backend that keeps dynamo's graphs and runs each as traced; `fail` makes
    every compiled call raise."""

    def __init__(self):
        self.graphs = []
        self.fail = False

    def __call__(self, graph, example_inputs):
        self.graphs.append(graph)

        def run(*args):
            if self.fail:
                raise RuntimeError("the captured graph failed")
            return graph.forward(*args)

        return run


def packed_bf16_model(seed: int) -> tuple[torch.nn.Module, PackedWeights]:
    model = tiny_llama(seed=seed, dtype=torch.bfloat16)
    return model, PackedWeights(model)


def compiled_forward(model, buckets=(4, 8), max_length=64) -> tuple[LlamaForward, DecodeGraphs, Captured, list]:
    forward, backend, steps = LlamaForward(model), Captured(), []
    graphs = DecodeGraphs(forward, buckets, max_length, backend=backend, on_step=steps.append)
    graphs.warm_up()
    forward.graphs = graphs
    return forward, graphs, backend, steps


def test_compiled_steps_equal_eager_through_joins_leaves_and_splits_one_graph_per_bucket():
    model, _ = packed_bf16_model(seed=1)
    forward, graphs, backend, steps = compiled_forward(model)
    assert len(backend.graphs) == 2  # both buckets compiled at warm-up
    keys = forward.cache.keys[0]
    compiled = logits_over_a_batch_life(forward)
    eager = logits_over_a_batch_life(LlamaForward(model))
    for a, b in zip(compiled, eager, strict=True):
        # bf16: attention over the whole capacity sums its masked zeros in another order
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    # Every decode step but the split one: its first half (2 rows) would pad into the second's slots.
    assert len(steps) == 11
    assert len(backend.graphs) == 2  # 3, 5 and 4 rows ran as 4 and 8: no recompilation
    assert forward.cache.keys[0] is keys and forward.cache.capacity == graphs.capacity >= 64
    forward.clear()  # the batch empties: the cache the graphs read stays
    assert forward.cache.keys[0] is keys


@torch.inference_mode()
def last_logits_after_rows_leave_and_newcomers_take_their_slots(forward) -> torch.Tensor:
    logits, _, rows, _ = forward.prefill(random_prompts(3, [7, 4, 9]))
    forward.join(rows)
    tokens = logits.argmax(-1).tolist()
    for _ in range(3):
        tokens = forward.decode(tokens).argmax(-1).tolist()
    forward.keep([0])  # slots 1 and 2 are free: the padding writes there now
    tokens = tokens[:1]
    for _ in range(3):
        tokens = forward.decode(tokens).argmax(-1).tolist()
    logits, _, rows, _ = forward.prefill(random_prompts(4, [3, 2]))  # newcomers take slots 1 and 2
    forward.join(rows)
    return forward.decode(tokens + logits.argmax(-1).tolist())


def test_padding_rows_leave_the_slots_of_rows_that_left_clean_for_the_next_newcomer():
    model, _ = packed_bf16_model(seed=2)
    forward, _, _, steps = compiled_forward(model, buckets=(4,))
    compiled = last_logits_after_rows_leave_and_newcomers_take_their_slots(forward)
    eager = last_logits_after_rows_leave_and_newcomers_take_their_slots(LlamaForward(model))
    assert len(steps) == 7
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


@torch.inference_mode()
def test_weights_switched_in_place_run_compiled_and_a_mixed_step_runs_eager_without_recompiling():
    model, packed = packed_bf16_model(seed=3)
    compiled, _, backend, steps = compiled_forward(model, buckets=(2,))
    eager = LlamaForward(model)
    tokens = []
    for forward in (compiled, eager):
        logits, _, rows, _ = forward.prefill(random_prompts(5, [6, 3]))
        forward.join(rows)
        tokens = logits.argmax(-1).tolist()

    def step_both() -> torch.Tensor:  # the same step compiled (where it may) and eager, equal
        nonlocal tokens
        a, b = compiled.decode(tokens), eager.decode(tokens)
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        tokens = a.argmax(-1).tolist()
        return a

    step_both()
    delta = packed.pack(random_adapter(model, k=3, scale=0.5, seed=7))
    saved = packed.apply_(delta)  # the merged path: an adapter scattered into the packed buffer
    step_both()
    assert len(steps) == 2  # compiled, reading the switched weights (equal to eager's)
    packed.restore_(delta, saved)

    down = model.model.layers[0].mlp.down_proj
    down.forward = lambda x: F.linear(x, down.weight) + 1.0  # as the mixed path replaces target forwards
    step_both()
    assert len(steps) == 2  # eager: the replaced forward ran
    del down.forward
    step_both()
    assert len(steps) == 3 and len(backend.graphs) == 1  # back to the one graph, not a new one


@torch.inference_mode()
def test_a_compiled_step_that_raises_is_rerun_eager_and_later_steps_stay_eager(caplog):
    model, _ = packed_bf16_model(seed=4)
    forward, graphs, backend, steps = compiled_forward(model, buckets=(2,))
    eager = LlamaForward(model)
    outcomes = []
    for f in (forward, eager):
        logits, _, rows, _ = f.prefill(random_prompts(6, [4, 6]))
        f.join(rows)
        tokens = logits.argmax(-1).tolist()
        backend.fail = True
        with caplog.at_level(logging.ERROR, logger="neuroada_server.forward.graphs"):
            outcomes.append([f.decode(tokens) for _ in range(2)])
    for a, b in zip(*outcomes, strict=True):
        torch.testing.assert_close(a, b)  # both steps eager: exactly the eager forward's
    assert graphs.broken == "RuntimeError: the captured graph failed" and not steps
    assert sum("compiled decode step failed" in r.message for r in caplog.records) == 1


def test_where_it_cannot_compile_every_step_runs_eager(caplog):
    model, _ = packed_bf16_model(seed=5)
    with caplog.at_level(logging.WARNING, logger="neuroada_server.forward.graphs"):
        assert compile_decode(HFForward(model, PAD), [1, 2], 64) is None

        def unavailable(graph, example_inputs):
            raise RuntimeError("no compiler here")

        forward, steps = LlamaForward(model), []
        graphs = compile_decode(forward, [1, 2], 64, steps.append, backend=unavailable)
        assert graphs.warm_up() is False
    assert "no compiler here" in graphs.broken
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "Hugging Face's forward" in messages and "no compiler here" in messages
    logits, _, rows, _ = forward.prefill(random_prompts(7, [3]))
    forward.join(rows)
    assert forward.decode(logits.argmax(-1).tolist()).isfinite().all() and not steps


class MixedSetting:
    """A bf16 model whose decode step is compiled, merged and, at warm-up, for mixed steps of
    adapters with k = 2 on q, v and down; adapters of that shape (a and a2 share an index set, b
    has its own) and two of others (c: k = 3; o: on o_proj); a compiled forward and an eager one
    over the model."""

    def __init__(self, seed: int):
        self.model, packed = packed_bf16_model(seed)
        loader = AdapterLoader(packed, BaseModelSpec.from_model(self.model, TINY_NAME), fidelity_threshold=0.9)

        def adapter(name: str, k: int, seed: int, scale: float = 0.5, targets=("q_proj", "v_proj", "down_proj")):
            made = random_adapter(self.model, k=k, seed=seed, scale=scale, targets=targets)
            return loader.prepare(name, adapter_to_bytes(made))

        self.a, self.a2 = adapter("a", 2, seed=1), adapter("a2", 2, seed=1, scale=0.3)  # same indices
        self.b, self.c = adapter("b", 2, seed=2), adapter("c", 3, seed=3)
        self.o = adapter("o", 2, seed=4, targets=("o_proj",))  # k = 2 on other layers
        assert self.a.adapter.metadata.index_hash == self.a2.adapter.metadata.index_hash
        assert self.a.adapter.metadata.index_hash != self.b.adapter.metadata.index_hash
        self.mixed = MixedAdapters(self.model, torch.device("cpu"), compiled_slots=4)
        self.compiled, self.backend, self.steps = LlamaForward(self.model), Captured(), []
        self.graphs = DecodeGraphs(
            self.compiled, (2, 4), 64, backend=self.backend, on_step=self.steps.append, mixed=self.mixed
        )
        assert self.graphs.warm_up([(2, self.a.adapter.metadata.targets)])
        self.compiled.graphs = self.graphs
        self.eager = LlamaForward(self.model)
        self.tokens = []
        for forward in (self.compiled, self.eager):
            logits, _, rows, _ = forward.prefill(random_prompts(8, [5, 3, 6]))
            forward.join(rows)
            self.tokens = logits.argmax(-1).tolist()

    def step(self, rows) -> tuple[torch.Tensor, str | None]:
        """A step of both forwards with `rows`' adapters bound (None: the merged path); their logits
        equal, and the path the compiled forward's step ran compiled on (None: it ran eager)."""
        before = len(self.steps)
        if rows is None:
            self.mixed.unbind()
        else:
            self.mixed.bind(rows)
        a, b = self.compiled.decode(self.tokens), self.eager.decode(self.tokens)
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
        self.tokens = a.argmax(-1).tolist()
        return a, self.steps[-1] if len(self.steps) > before else None


@torch.inference_mode()
def test_mixed_steps_of_a_shape_traced_at_start_run_compiled_for_every_index_set_of_that_shape():
    setting = MixedSetting(seed=6)
    assert len(setting.backend.graphs) == 4  # both buckets, merged and mixed (k = 2 on q, v and down)
    assert setting.graphs.describe()["mixed_shapes"] == [{"k": 2, "layers": 6}]
    assert setting.step([setting.a, None, setting.a2])[1] == "mixed"  # 3 rows as the bucket of 4: padded with slot 0
    assert setting.step([setting.b, setting.b, None])[1] == "mixed"  # another index set of the shape: the same graph
    assert setting.step([setting.a, setting.b, None])[1] is None  # two index sets at once: eager
    assert setting.step([setting.c, None, None])[1] is None  # k = 3, not traced: eager
    assert setting.step([setting.o, None, setting.o])[1] is None  # other layers: eager
    # o's index set stays cached but unbound: its layers are not replaced, the traced graph serves
    assert setting.step([setting.a, setting.a, None])[1] == "mixed"
    assert setting.step(None)[1] == "merged"  # merged again
    assert setting.step([setting.a2, setting.a, setting.a])[1] == "mixed"
    assert len(setting.backend.graphs) == 4 and setting.graphs.broken is None  # nothing compiled after warm-up


@torch.inference_mode()
def test_a_compiled_mixed_step_adds_each_row_its_own_delta_and_nothing_to_rows_without():
    setting = MixedSetting(seed=7)
    plain = LlamaForward(setting.model)  # the base alone, over the same prompts
    logits, _, rows, _ = plain.prefill(random_prompts(8, [5, 3, 6]))
    plain.join(rows)
    mixed, path = setting.step([setting.a, None, setting.a2])
    setting.mixed.unbind()
    base = plain.decode(logits.argmax(-1).tolist())
    assert path == "mixed"
    torch.testing.assert_close(mixed[1], base[1], rtol=2e-2, atol=2e-2)
    for row in (0, 2):
        assert (mixed[row] - base[row]).abs().max() > 0.1


@torch.inference_mode()
def test_a_step_the_compiler_would_have_to_compile_anew_is_refused_and_rerun_eager(monkeypatch, caplog):
    setting = MixedSetting(seed=8)
    merged = setting.mixed.signature()  # nothing bound yet
    shape_of_k2 = next(s for s in setting.graphs.traced if s != merged)
    # An index set the graphs were not traced for, passed off as one they were: dynamo's guards catch it.
    monkeypatch.setattr(setting.mixed, "signature", lambda: shape_of_k2)
    with caplog.at_level(logging.WARNING, logger="neuroada_server.forward.graphs"):
        assert setting.step([setting.c, None, None])[1] is None  # refused, then eager: equal to the eager forward
    assert "not compiled at start" in caplog.text and setting.graphs.broken is None
    assert setting.step([setting.c, None, None])[1] is None  # that signature now goes eager at once
    monkeypatch.undo()
    assert setting.step(None)[1] == "merged"  # the other graphs stay
    assert len(setting.backend.graphs) == 4
