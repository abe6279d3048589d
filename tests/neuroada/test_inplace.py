import torch

from neuroada.inplace import PackedWeights, apply_adapter_, restore_adapter_
from tests.helpers import random_adapter, tiny_llama


def _state_bits(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_packing_keeps_the_model_identical_and_leaves_tied_weights_alone(model):
    ids = torch.randint(0, 256, (2, 9))
    before = model(ids).logits
    state = _state_bits(model)
    packed = PackedWeights(model)
    assert "lm_head" not in packed.layout  # tied to embed_tokens
    assert model.lm_head.weight is model.model.embed_tokens.weight
    after = model(ids).logits
    assert torch.equal(before, after)
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), name
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == packed.buffer[packed.layout["model.layers.0.self_attn.q_proj"][0] :].data_ptr()


def test_packed_apply_equals_per_layer_apply_and_restores_bit_exactly():
    for dtype in (torch.float32, torch.bfloat16):
        per_layer = tiny_llama(seed=3, dtype=dtype)
        packed_model = tiny_llama(seed=3, dtype=dtype)
        adapter = random_adapter(per_layer, k=3, seed=5)

        saved_layers = apply_adapter_(per_layer, adapter)
        packed = PackedWeights(packed_model)
        checksum = packed.checksum()
        delta = packed.pack(adapter)
        saved = packed.apply_(delta)
        for name, p in per_layer.state_dict().items():
            assert torch.equal(p, packed_model.state_dict()[name]), name
        assert packed.checksum() != checksum

        packed.restore_(delta, saved)
        restore_adapter_(per_layer, adapter, saved_layers)
        assert packed.checksum() == checksum
        fresh = tiny_llama(seed=3, dtype=dtype)
        for name, p in fresh.state_dict().items():
            assert torch.equal(p, packed_model.state_dict()[name]), name
            assert torch.equal(p, per_layer.state_dict()[name]), name


def test_adapters_sharing_an_index_set_can_share_offsets(model):
    packed = PackedWeights(model)
    a = random_adapter(model, k=2, seed=1)
    offsets = packed.offsets(a)
    b = packed.pack(a, offsets=offsets)
    assert b.offsets is offsets
    assert b.values.numel() == offsets.numel() == a.num_params


def test_switch_between_adapters_sharing_offsets_is_one_scatter_and_exact():
    model = tiny_llama(seed=2)
    a = random_adapter(model, k=2, seed=1)
    b = random_adapter(model, k=2, seed=1, scale=0.5)  # same indices, other values
    packed = PackedWeights(model)
    checksum = packed.checksum()
    offsets = packed.offsets(a)
    da, db = packed.pack(a, offsets), packed.pack(b, offsets)
    saved = packed.apply_(da)
    saved = packed.switch_(da, db, saved)

    reference = tiny_llama(seed=2)
    apply_adapter_(reference, b)
    for name, p in reference.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name
    other = packed.pack(random_adapter(model, k=3, seed=7))  # its own offsets: restore + apply
    saved = packed.switch_(db, other, saved)
    packed.restore_(other, saved)
    assert packed.checksum() == checksum


def test_base_values_and_checksum_read_the_base_while_an_adapter_is_applied(model):
    packed = PackedWeights(model)
    pristine = packed.buffer.clone()
    checksum = packed.checksum()
    adapter = random_adapter(model, k=3, seed=4, scale=0.5)
    delta = packed.pack(adapter)
    saved = packed.apply_(delta)
    assert not torch.equal(packed.buffer, pristine)
    offsets = torch.randperm(packed.buffer.numel())[:5000]
    offsets = torch.cat([offsets, delta.offsets[::3]])  # positions under the delta and beside it
    assert torch.equal(packed.base_values(offsets, (delta, saved)), pristine[offsets])
    # Small chunks, so that chunk edges cut through the delta's positions.
    assert packed.checksum(applied=lambda: (delta, saved), chunk_elems=4099) == checksum
    assert packed.checksum(chunk_elems=4099) != checksum


def test_packing_onto_another_device_moves_every_linear_weight_there(model):
    device = torch.device("cuda" if torch.cuda.is_available() else "meta")
    if device.type == "meta":  # no second device here: the meta device stands in for one
        packed = PackedWeights(model, device=device)
        assert packed.buffer.device.type == "meta"
        assert all(
            m.weight.device.type == "meta" for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)
        )
        assert model.model.embed_tokens.weight.device.type == "cpu"  # not a packed linear: the caller moves it
        return
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    packed = PackedWeights(model, device=device)
    model.to(device)
    with torch.no_grad():
        assert torch.equal(model(ids.to(device)).logits.cpu(), expected)
    assert packed.buffer.device == device
