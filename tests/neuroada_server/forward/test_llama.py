"""Our Llama-shaped decoder against Hugging Face's forward, on tiny models of each family it takes."""

from __future__ import annotations

import pytest
import torch

import neuroada_kernels as kernels
from neuroada.fingerprint import BaseModelSpec
from neuroada.format import adapter_to_bytes
from neuroada.inplace import PackedWeights
from neuroada_kernels.decode_attention import decode_attention_triton, triton_fits
from neuroada_server import mixed as server_mixed
from neuroada_server.engine import round_linear_weights_
from neuroada_server.forward import HFForward, LlamaForward, batch_forward
from neuroada_server.forward import llama as llama_forward
from neuroada_server.forward.llama import SlotCache, llama_unsupported
from neuroada_server.forward.prefix_cache import BLOCK, PrefixCache
from neuroada_server.mixed import MixedAdapters
from neuroada_server.resident import AdapterLoader
from tests.helpers import (
    TINY_NAME,
    logits_over_a_batch_life,
    random_adapter,
    random_prompts,
    tiny_family,
    tiny_llama,
)

OURS = ("llama", "mistral", "qwen2", "qwen3")
PAD = 0


def _model_with_two_adapters():
    """A tiny Llama on the C++ decode kernels; adapter `a` (k = 2) on every projection and `b` (k = 3)
    on q, v and down, both prepared; the mixed path's state, nothing bound."""
    model = tiny_llama(seed=7)
    packed = PackedWeights(model)
    kernels.use_decode_linears(model)
    loader = AdapterLoader(packed, BaseModelSpec.from_model(model, TINY_NAME), fidelity_threshold=0.9)
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    a = loader.prepare("a", adapter_to_bytes(random_adapter(model, k=2, seed=1, scale=0.3, targets=every)))
    b = loader.prepare("b", adapter_to_bytes(random_adapter(model, k=3, seed=2, scale=0.3)))
    return model, a, b, MixedAdapters(model, torch.device("cpu"))


def decode_steps_at_once(calls: list):
    """`decode_layers` for decode steps alone (a slot per row), their arguments kept in `calls`; a
    prefill (tokens sharing a slot) gets None and runs the loop: steps compared to the bit with the
    loop's must start from the loop's prefill."""

    def decode_layers(*args):
        slots = args[12]
        if len(set(slots.tolist())) < len(slots):
            return None
        calls.append(args)
        return kernels.decode_layers(*args)

    return decode_layers


def recording_prefills(prefills: list):
    """`decode_layers` as it is, each prefill's row slots (tokens sharing a slot) kept in `prefills`."""

    def decode_layers(*args):
        slots = args[12].tolist()
        if len(set(slots)) < len(slots):
            prefills.append(slots)
        return kernels.decode_layers(*args)

    return decode_layers


@pytest.mark.parametrize("family", OURS)
def test_ours_equals_hugging_face_through_joins_leaves_and_splits(family):
    model = tiny_family(family, seed=1)
    assert isinstance(batch_forward(model, PAD), LlamaForward)
    ours, theirs = logits_over_a_batch_life(LlamaForward(model)), logits_over_a_batch_life(HFForward(model, PAD))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", OURS)
def test_q_k_v_packed_back_to_back_run_as_one_product(family, monkeypatch):
    model = tiny_family(family, seed=3)
    forward = LlamaForward(model)
    apart = logits_over_a_batch_life(forward)  # weights allocated one by one: three products
    forward.clear()
    PackedWeights(model)  # every linear weight becomes a view of one buffer, in module order
    widths = []

    def counted(x, weight, bias=None):
        widths.append(weight.shape[0])
        return kernels.linear(x, weight, bias)

    monkeypatch.setattr(llama_forward, "linear", counted)
    packed = logits_over_a_batch_life(forward)  # the same forward object: its views are rebuilt
    for a, b in zip(packed, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # GEMM blocking differs with the width
    attention = model.model.layers[0].self_attn
    q_k_v = sum(m.weight.shape[0] for m in (attention.q_proj, attention.k_proj, attention.v_proj))
    if family == "qwen2":  # q, k and v have biases: one product each
        assert widths == []
    else:
        assert widths and set(widths) == {q_k_v}


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_runs_every_layer_in_one_call_to_the_bit(family, weight_dtype, monkeypatch):
    if kernels.cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels are not built here")
    model = tiny_family(family, seed=6)
    round_linear_weights_(model, weight_dtype)  # the server's --weight-dtype
    PackedWeights(model)  # q, k and v back to back: one matrix
    kernels.use_decode_linears(model)  # as the server serves it: every linear on our kernel
    calls = []
    counted = decode_steps_at_once(calls)
    monkeypatch.setattr(llama_forward, "decode_layers", counted)
    at_once = logits_over_a_batch_life(LlamaForward(model))
    assert [len(args[0]) for args in calls] == [3] * 3 + [5] * 3 + [4] * 3 + [2, 2] + [4] * 2  # split halves too
    monkeypatch.setattr(llama_forward, "decode_layers", lambda *args: None)  # as where C++ is not built
    by_layer = logits_over_a_batch_life(LlamaForward(model))
    for a, b in zip(at_once, by_layer, strict=True):
        assert torch.equal(a, b)

    monkeypatch.setattr(llama_forward, "decode_layers", counted)
    calls.clear()
    down = model.model.layers[1].mlp.down_proj
    down.forward = lambda x: kernels.linear(x, down.weight)  # as the mixed path replaces target forwards
    logits_over_a_batch_life(LlamaForward(model))
    assert calls == []  # a replaced forward must run: the layers go one by one


@torch.inference_mode()
def test_a_mixed_step_adds_each_rows_deltas_inside_the_one_call_to_the_bit(monkeypatch):
    if kernels.cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels are not built here")
    model, a, b, mixed = _model_with_two_adapters()
    rows = [a, None, b, a]
    calls = []

    def steps() -> list[torch.Tensor]:
        forward = LlamaForward(model)
        mixed.bind(rows)
        logits, _, joined, _ = forward.prefill(random_prompts(8, [5, 3, 7, 2]))
        forward.join(joined)
        seen = [logits]
        for _ in range(4):
            mixed.bind(rows)
            seen.append(forward.decode(seen[-1].argmax(-1).tolist()))
        mixed.unbind()
        return seen

    monkeypatch.setattr(llama_forward, "decode_layers", decode_steps_at_once(calls))
    at_once = steps()
    assert len(calls) == 4 and all(len(args[-1]) == 2 for args in calls)  # every step, with the deltas
    bound = calls[0][-1][0]  # layer 0: q, k, v, o, gate, up, down; a's on each, b's on q, v and down
    assert [len(d) for d in bound] == [2, 1, 2, 1, 1, 1, 2]
    monkeypatch.setattr(llama_forward, "decode_layers", lambda *args: None)  # the loop, layer by layer
    by_layer = steps()
    for x, y in zip(at_once, by_layer, strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(at_once[-1][0], at_once[-1][1])  # rows with and without an adapter differ


@torch.inference_mode()
def test_a_decode_step_compiles_as_one_graph_that_reads_the_weights_where_they_are():
    """The pure-torch path a GPU runs (bf16, as a GPU serves: the C++ CPU kernels take float32)
    traces with no graph break at a fixed length, the cache's whole capacity, as a CUDA graph
    would be captured; and an adapter merged into the packed buffer after compilation reaches the
    compiled step."""
    model = tiny_llama(seed=4, dtype=torch.bfloat16)
    packed = PackedWeights(model)
    forward = LlamaForward(model)
    logits, _, rows, _ = forward.prefill(random_prompts(5, [6, 3]))
    forward.join(rows)
    forward.cache.reserve(2, 64)
    capacity = forward.cache.capacity
    ids, positions = logits.argmax(-1), torch.tensor(forward.lengths)
    graphs = []

    def captured(graph, example_inputs):  # dynamo's graph, run as it is
        graphs.append(graph)
        return graph.forward

    compiled = torch.compile(forward.step, backend=captured, fullgraph=True)

    base = forward.step(ids, positions, max(forward.lengths) + 1)  # eager, reading only what it must
    torch.testing.assert_close(compiled(ids, positions, capacity), base)
    delta = packed.pack(random_adapter(model, k=3, scale=0.5, seed=7))
    saved = packed.apply_(delta)
    adapted = forward.step(ids, positions, capacity)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(compiled(ids, positions, capacity), adapted)
    packed.restore_(delta, saved)
    torch.testing.assert_close(compiled(ids, positions, capacity), base)
    assert len(graphs) == 1  # one capture: switching weights in place does not recompile
    targets = {str(node.target) for node in graphs[0].graph.nodes}
    assert not {"item", "tolist"} & targets  # no read of a device value on the host (a sync, a split graph)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2"])
def test_other_families_run_on_hugging_face(family):
    model = tiny_family(family)
    assert llama_unsupported(model) is not None
    assert isinstance(batch_forward(model, PAD), HFForward)


def test_a_sliding_window_shorter_than_the_context_goes_to_hugging_face():
    model = tiny_family("mistral")
    model.config.sliding_window = 64
    assert "sliding" in llama_unsupported(model)
    assert isinstance(batch_forward(model, PAD, "hf"), HFForward)  # and "hf" asks for it outright
    assert isinstance(batch_forward(tiny_llama(), PAD, "hf"), HFForward)


@torch.inference_mode()
def test_the_decode_step_on_the_triton_attention_kernel_gives_the_same_logits(monkeypatch):
    """The kernel a CUDA eager step runs (here under Triton's interpreter) inside our decoder's layer
    loop, through joins, a leave and a split, in float32: the logits of the CPU's own attention."""
    if not kernels.triton_available():
        pytest.skip("no triton")
    model = tiny_llama(seed=3)
    monkeypatch.setattr(llama_forward, "decode_layers", lambda *args: None)  # the loop, layer by layer
    own = logits_over_a_batch_life(LlamaForward(model))
    calls = []

    def on_triton(q, k, v, cos, sin, keys, values, first, positions, scale, length=None):
        assert triton_fits(q, k, keys, values)
        calls.append(1)
        return decode_attention_triton(q, k, v, cos, sin, keys, values, first, positions, scale)

    monkeypatch.setattr(llama_forward, "decode_attention", on_triton)
    kernel = logits_over_a_batch_life(LlamaForward(model))
    assert len(calls) == 13 * model.config.num_hidden_layers  # every decode step's layers (the split's twice)
    for a, b in zip(kernel, own, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_slot_cache_grows_keeping_what_it_holds():
    cache = SlotCache(layers=2, kv_heads=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    cache.reserve(2, 3)
    cache.keys[1][1, 0, 2] = torch.arange(4.0)
    cache.reserve(3, 100)
    assert cache.slots >= 3 and cache.capacity >= 100 and cache.capacity % 64 == 0
    assert torch.equal(cache.keys[1][1, 0, 2], torch.arange(4.0))
    cache.move(1, 0)
    assert torch.equal(cache.keys[1][0, 0, 2], torch.arange(4.0))
    cache.clear_tails(0, [2, 5])  # slot 0 from position 2 on, slot 1 from 5 on
    assert not cache.keys[1][0, :, 2:].any() and torch.equal(cache.keys[1][1, 0, 2], torch.arange(4.0))


def test_the_slot_cache_knows_the_bytes_of_a_whole_allocation_before_making_it():
    cache = SlotCache(layers=3, kv_heads=2, head_dim=8, dtype=torch.bfloat16, device=torch.device("cpu"))
    expected = cache.bytes_for(5, 100)
    cache.reserve(5, 100)
    assert expected == sum(t.nbytes for t in cache.keys + cache.values)


@torch.inference_mode()
def test_a_slot_left_with_nan_by_a_failed_request_does_not_reach_the_next_occupant():
    model = tiny_llama(seed=2)
    prompt_a, prompt_b, prompt_c = random_prompts(3, [20, 12, 2])
    forward = LlamaForward(model)
    logits, _, rows, _ = forward.prefill([prompt_a, prompt_b])
    forward.join(rows)
    tokens = logits.argmax(-1).tolist()

    def nan_values_for_row_1(module, inputs, out):  # request b's values turn NaN: b fails
        out[1] = float("nan")

    hook = model.model.layers[0].self_attn.v_proj.register_forward_hook(nan_values_for_row_1)
    logits = forward.decode(tokens)
    hook.remove()
    assert logits[0].isfinite().all() and not logits[1].isfinite().any()
    forward.keep([0])  # b leaves; its slot holds NaN values at position 12, past what c will write
    logits_c, _, row_c, _ = forward.prefill([prompt_c])  # c takes b's slot: 2 positions of its own
    forward.join(row_c)
    tokens = [int(logits[0].argmax()), int(logits_c[0].argmax())]
    for _ in range(3):  # a's longer cache makes every step read c's slot up to a's length
        logits = forward.decode(tokens)
        tokens = logits.argmax(-1).tolist()

    alone = LlamaForward(model)
    logits_alone, _, row, _ = alone.prefill([prompt_c])
    alone.join(row)
    tokens_alone = [int(logits_alone[0].argmax())]
    for _ in range(3):
        last_alone = alone.decode(tokens_alone)
        tokens_alone = last_alone.argmax(-1).tolist()
    torch.testing.assert_close(logits[1], last_alone[0], rtol=1e-4, atol=1e-4)


def block_bytes(model) -> int:  # one prefix-cache block of a float32 model: every layer's keys and values, its states
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    return (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim + config.hidden_size) * BLOCK * 4


def prefill_and_decode(forward: LlamaForward, groups: list[list[list[int]]], steps: int = 4):
    """Each group of prompts prefilled and joined in turn, the batch decoding `steps` greedy steps
    after each; every call's logits, and each prefill's cached-token counts."""
    seen, cached, tokens = [], [], []
    for prompts in groups:
        logits, from_cache, rows, _ = forward.prefill(prompts, [("base",)] * len(prompts))
        forward.join(rows)
        seen.append(logits)
        cached.append(from_cache)
        tokens += logits.argmax(-1).tolist()
        for _ in range(steps):
            logits = forward.decode(tokens)
            seen.append(logits)
            tokens = logits.argmax(-1).tolist()
    return seen, cached


@pytest.mark.parametrize("family", OURS)
@torch.inference_mode()
def test_a_prefill_past_a_cached_prefix_equals_the_prompt_computed_whole(family):
    model = tiny_family(family, seed=4)
    shared, tail, other = random_prompts(9, [2 * BLOCK + 5, 30, 20])
    groups = [
        [shared],  # computed whole; its two full blocks are kept
        [shared + tail, shared[: BLOCK + 3], other],  # two blocks found, one block, none
        [shared + tail[:3], (shared + tail)[: 3 * BLOCK + 2]],  # the second prompt's third block too
    ]
    cache = PrefixCache(budget_bytes=1 << 30)
    ours, cached = prefill_and_decode(LlamaForward(model, prefix_cache=cache), groups)
    whole, none_cached = prefill_and_decode(LlamaForward(model), groups)
    assert cached == [[0], [2 * BLOCK, BLOCK, 0], [2 * BLOCK, 3 * BLOCK]]
    assert none_cached == [[0], [0, 0, 0], [0, 0]]
    for a, b in zip(ours, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@pytest.mark.parametrize("one_call", [False, True], ids=["loop", "one call"])
@torch.inference_mode()
def test_a_cached_prefix_in_a_slot_left_with_nan_does_not_read_the_old_occupants_values(one_call):
    if one_call and kernels.cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels are not built here")
    model = tiny_llama(seed=2)
    if one_call:  # the prefill below (16 tokens past cached blocks) runs as one C++ call
        PackedWeights(model)
        kernels.use_decode_linears(model)
    prompt_a, prompt_b, suffix = random_prompts(3, [2 * BLOCK + 8, 30, 8])
    forward = LlamaForward(model, prefix_cache=PrefixCache(budget_bytes=1 << 30))
    logits, _, rows, _ = forward.prefill([prompt_a, prompt_b], [("base",)] * 2)
    forward.join(rows)

    def nan_values_for_row_1(module, inputs, out):  # b's values at position 30 turn NaN: b fails
        out[1] = float("nan")

    hook = model.model.layers[0].self_attn.v_proj.register_forward_hook(nan_values_for_row_1)
    logits = forward.decode(logits.argmax(-1).tolist())
    hook.remove()
    assert not logits[1].isfinite().any()
    forward.keep([0])
    # c takes b's slot and computes positions 16-23 past a cached block; d's two cached blocks make
    # the one padded attention call (rows this alike) read every slot up to position 40, past b's NaN at 30.
    c, d = prompt_a[:BLOCK] + suffix, prompt_a[: 2 * BLOCK] + suffix
    logits, cached, rows, _ = forward.prefill([c, d], [("base",)] * 2)
    assert cached == [BLOCK, 2 * BLOCK]
    alone, _, _, _ = LlamaForward(model).prefill([c, d])
    torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_a_prefill_leaves_its_padding_out_of_the_products_unless_rows_are_bound(monkeypatch):
    model = tiny_llama(seed=5)
    PackedWeights(model)  # q, k and v back to back: one product per layer
    prompts = random_prompts(11, [5, 2, 9])
    rows = []

    def counted(x, weight, bias=None):
        rows.append(x.shape[:-1].numel())
        return kernels.linear(x, weight, bias)

    monkeypatch.setattr(llama_forward, "linear", counted)
    packed, _, _, _ = LlamaForward(model).prefill(prompts)
    assert set(rows) == {5 + 2 + 9}  # the real tokens only, of 3 x 9 padded
    rows.clear()
    hook = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda module, inputs, out: None)
    padded, _, _, _ = LlamaForward(model).prefill(prompts)  # a hook may read rows: the padded grid
    hook.remove()
    assert set(rows) == {3 * 9}
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_a_mixed_prefill_packs_its_tokens_each_with_its_rows_delta(monkeypatch):
    model, a, b, mixed = _model_with_two_adapters()
    prompts = random_prompts(12, [6, 2, 9, 4])
    rows = []

    def counted(x, weight, bias=None):
        rows.append(x.shape[:-1].numel())
        return kernels.linear(x, weight, bias)

    monkeypatch.setattr(llama_forward, "linear", counted)
    monkeypatch.setattr(server_mixed, "linear", counted)
    monkeypatch.setattr(llama_forward, "decode_layers", lambda *args: None)  # the loop, where products are seen
    mixed.bind([a, None, b, a])
    packed, _, _, _ = LlamaForward(model).prefill(prompts)
    assert set(rows) == {6 + 2 + 9 + 4}
    rows.clear()
    hook = model.model.layers[0].mlp.register_forward_hook(lambda module, inputs, out: None)
    padded, _, _, _ = LlamaForward(model).prefill(prompts)  # the hook may read rows: the padded grid
    hook.remove()
    assert set(rows) == {4 * 9}
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    mixed.unbind()
    base, _, _, _ = LlamaForward(model).prefill(prompts)
    # The row without an adapter: the base's logits (to float32 rounding: the plain model's products differ in grouping)
    torch.testing.assert_close(base[1], packed[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base[0], packed[0]) and not torch.allclose(base[2], packed[2])


@pytest.mark.parametrize("family", ["llama", "mistral"])
@torch.inference_mode()
def test_a_short_prefill_runs_its_tokens_as_rows_of_the_one_call(family, monkeypatch):
    """A prefill of at most DECODE_MAX_ROWS tokens, past cached prefixes or not, runs every layer in
    one C++ call, each token a row; its attention is the kernel's where the loop's is torch's."""
    if kernels.cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels are not built here")
    model = tiny_family(family, seed=8)
    PackedWeights(model)
    kernels.use_decode_linears(model)
    shared, tail = random_prompts(13, [2 * BLOCK + 3, 4])
    groups = [[shared], [shared + tail, shared[: BLOCK + 2], tail]]  # 35 tokens; then 7 + 2 + 4 past the cache
    prefills = []
    monkeypatch.setattr(llama_forward, "decode_layers", recording_prefills(prefills))
    ours, cached = prefill_and_decode(LlamaForward(model, prefix_cache=PrefixCache(1 << 30)), groups)
    assert cached == [[0], [2 * BLOCK, BLOCK, 0]]
    assert prefills == [[1] * 7 + [2] * 2 + [3] * 4]  # not the first: 35 tokens are more than one call takes
    monkeypatch.setattr(llama_forward, "decode_layers", lambda *args: None)
    loop, _ = prefill_and_decode(LlamaForward(model, prefix_cache=PrefixCache(1 << 30)), groups)
    for a, b in zip(ours, loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@torch.inference_mode()
def test_a_short_mixed_prefill_adds_each_tokens_rows_delta_inside_the_one_call(monkeypatch):
    if kernels.cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels are not built here")
    model, a, b, mixed = _model_with_two_adapters()
    prompts = random_prompts(12, [6, 2, 9])
    calls = []

    def counted(*args):
        calls.append(args)
        return kernels.decode_layers(*args)

    monkeypatch.setattr(llama_forward, "decode_layers", counted)
    mixed.bind([a, None, b])
    at_once, _, _, _ = LlamaForward(model).prefill(prompts)
    (args,) = calls
    assert len(args[0]) == 6 + 2 + 9
    # layer 0's q: a's index set and b's, each token bound to its row's slot in it (0: none)
    bound = sorted((slots != 0).tolist() for _, _, slots in args[-1][0][0])
    assert bound == sorted([[True] * 6 + [False] * 11, [False] * 8 + [True] * 9])
    monkeypatch.setattr(llama_forward, "decode_layers", lambda *args: None)
    loop, _, _, _ = LlamaForward(model).prefill(prompts)
    torch.testing.assert_close(at_once, loop, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(llama_forward, "decode_layers", counted)
    mixed.unbind()
    base, _, _, _ = LlamaForward(model).prefill(prompts)
    # The row without an adapter: the base's logits (to float32 rounding: the plain model's products differ in grouping)
    torch.testing.assert_close(base[1], at_once[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base[0], at_once[0]) and not torch.allclose(base[2], at_once[2])


@torch.inference_mode()
def test_blocks_newcomers_share_are_computed_once_in_a_cold_prefill(monkeypatch):
    model = tiny_llama(seed=6)
    PackedWeights(model)  # q, k and v back to back: one product per layer
    shared, x, y, z, other = random_prompts(13, [3 * BLOCK + 5, 9, 12, 7, 30])
    prompts = [shared + x, shared + y, shared[: BLOCK + 4] + z, other]  # three share a block, two share three
    rows = []

    def counted(x, weight, bias=None):
        rows.append(x.shape[:-1].numel())
        return kernels.linear(x, weight, bias)

    with monkeypatch.context() as patch:
        patch.setattr(llama_forward, "linear", counted)
        LlamaForward(model, prefix_cache=PrefixCache(1 << 30)).prefill(prompts, [("base",)] * 4)
    layers = len(model.model.layers)
    rest = sum(map(len, prompts)) - 3 * BLOCK
    assert rows == [BLOCK] * layers + [rest] * layers  # the block the three share once, then the rest past it
    ours, cached = prefill_and_decode(LlamaForward(model, prefix_cache=PrefixCache(1 << 30)), [prompts])
    assert cached == [[0, BLOCK, BLOCK, 0]]  # the row that computed the block does not count it cached
    whole, _ = prefill_and_decode(LlamaForward(model), [prompts])
    for a, b in zip(ours, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@torch.inference_mode()
def test_the_shared_blocks_first_pass_runs_as_one_call_its_other_rows_computing_nothing(monkeypatch):
    if kernels.cpu_kernels() is None:
        pytest.skip("the C++ CPU kernels are not built here")
    model = tiny_llama(seed=6)
    PackedWeights(model)
    kernels.use_decode_linears(model)
    shared, x, y, z, other = random_prompts(13, [3 * BLOCK + 5, 9, 12, 7, 30])
    prompts = [shared + x, shared + y, shared[: BLOCK + 4] + z, other]
    prefills = []
    monkeypatch.setattr(llama_forward, "decode_layers", recording_prefills(prefills))
    ours, cached = prefill_and_decode(LlamaForward(model, prefix_cache=PrefixCache(1 << 30)), [prompts])
    assert prefills == [[0] * BLOCK]  # the first row's shared block alone; the rest (more tokens) the loop
    assert cached == [[0, BLOCK, BLOCK, 0]]
    whole, _ = prefill_and_decode(LlamaForward(model), [prompts])
    for a, b in zip(ours, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


@torch.inference_mode()
def test_a_cold_prefill_computes_first_only_the_shared_blocks_its_budget_holds(monkeypatch):
    model = tiny_llama(seed=6)
    PackedWeights(model)
    config = model.config
    one, two, tails = random_prompts(14, [2 * BLOCK]), random_prompts(15, [2 * BLOCK]), random_prompts(16, [5] * 4)
    prompts = [one[0] + tails[0], one[0] + tails[1], two[0] + tails[2], two[0] + tails[3]]  # two pairs
    rows = []

    def counted(x, weight, bias=None):
        rows.append(x.shape[:-1].numel())
        return kernels.linear(x, weight, bias)

    with monkeypatch.context() as patch:
        patch.setattr(llama_forward, "linear", counted)
        forward = LlamaForward(model, prefix_cache=PrefixCache(3 * block_bytes(model)))  # one pair's two blocks fit
        logits, cached, _, _ = forward.prefill(prompts, [("base",)] * 4)
    layers = config.num_hidden_layers
    assert rows == [2 * BLOCK] * layers + [sum(map(len, prompts)) - 2 * 2 * BLOCK] * layers  # the pair, past them
    assert cached == [0, 2 * BLOCK, 0, 0]
    whole, _, _, _ = LlamaForward(model).prefill(prompts)
    torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_a_row_whose_cached_blocks_another_rows_evict_in_the_same_prefill_keeps_its_own():
    model = tiny_llama(seed=8)
    prompt, other, tail = random_prompts(17, [3 * BLOCK + 1, 4 * BLOCK + 1, BLOCK + 1])
    forward = LlamaForward(model, prefix_cache=PrefixCache(4 * block_bytes(model)))
    forward.prefill([prompt], [("base",)])  # its three blocks cached
    longer = prompt[: 3 * BLOCK] + tail
    # `other`'s four blocks, kept first, evict the three blocks `longer` found before it stores its fourth.
    logits, cached, _, _ = forward.prefill([other, longer], [("adapter", "a", 1), ("base",)])
    assert cached == [0, 3 * BLOCK]
    whole, _, _, _ = LlamaForward(model).prefill([other, longer])
    torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-4)
    _, cached, _, _ = forward.prefill([longer + tail], [("base",)])
    assert cached == [4 * BLOCK]  # its own four blocks, stored again from its slot


@torch.inference_mode()
@pytest.mark.parametrize(
    "lengths, every",
    [([2 * BLOCK + 3] * 2, [True, True]), ([2 * BLOCK + 3, 2 * BLOCK + 1, 9], [True, False, True])],
    ids=["padded", "packed"],  # equal rows computed whole fill the grid; unequal ones are packed
)
def test_every_positions_logits_are_the_whole_forwards_from_cached_blocks_and_computed_tokens(lengths, every):
    model = tiny_llama(seed=9)
    prompts = random_prompts(18, lengths)
    forward = LlamaForward(model, prefix_cache=PrefixCache(1 << 30))
    forward.prefill(prompts, [("base",)] * len(prompts))  # every full block of them cached, hidden states too
    logits, cached, _, prompt_logits = forward.prefill(prompts, [("base",)] * len(prompts), every)
    assert cached == [n // BLOCK * BLOCK for n in lengths]
    for prompt, scored, last, positions in zip(prompts, every, logits, prompt_logits):
        whole = model(torch.tensor([prompt])).logits[0]  # [S, V]
        torch.testing.assert_close(last, whole[-1], rtol=1e-4, atol=1e-4)
        if not scored:
            assert positions is None
            continue
        assert len(positions) == len(prompt) - 1
        got = torch.cat([positions[start : start + 10] for start in range(0, len(positions), 10)])  # [S - 1, V]
        torch.testing.assert_close(got, whole[:-1], rtol=1e-4, atol=1e-4)

    # A scored prompt's blocks serve later prompts, scored or not; a burst of them computes shared blocks once.
    fresh = LlamaForward(model, prefix_cache=PrefixCache(1 << 30))
    assert fresh.prefill(prompts[:1], [("base",)], [True]).cached == [0]
    assert fresh.prefill(prompts[:1], [("base",)]).cached == [lengths[0] // BLOCK * BLOCK]
    burst = LlamaForward(model, prefix_cache=PrefixCache(1 << 30))
    shared = [prompts[0][: 2 * BLOCK] + tail for tail in random_prompts(19, [3, 5])]
    _, cached, _, scored = burst.prefill(shared, [("base",)] * 2, [True, True])
    assert cached == [0, 2 * BLOCK]  # the second read what the first pass computed for both
    for prompt, positions in zip(shared, scored):
        whole = model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(positions[: len(positions)], whole[:-1], rtol=1e-4, atol=1e-4)
