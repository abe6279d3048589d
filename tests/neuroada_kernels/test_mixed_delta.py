import importlib

import pytest
import torch

from neuroada_kernels import add_delta_, add_mixed_delta_, mixed_delta, triton_available

# The module (the package's `mixed_delta` attribute is the function of that name).
mixed_delta_module = importlib.import_module("neuroada_kernels.mixed_delta")

BACKENDS = [
    "torch",
    "cpu",
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton")),
]


def stack(adapters: list[torch.Tensor]) -> torch.Tensor:
    """Slot stack: slot 0 = zeros (no adapter), slot s = adapters[s - 1]."""
    return torch.stack([torch.zeros_like(adapters[0]), *adapters])


def per_row_dense(x, indices, values, slots, d_in):
    """Each row through its own dense (P * Theta): the definition of the mixed product."""
    rows = []
    for b in range(x.shape[0]):
        theta = torch.zeros(indices.shape[1], d_in, dtype=torch.float64)
        theta.scatter_(1, indices.t(), values[slots[b]].t().double())
        rows.append(x[b].double() @ theta.t())
    return torch.stack(rows)


def case(k: int, tokens_per_row: int, seed: int = 0, d_in: int = 48, d_out: int = 70, adapters: int = 3):
    """Indices and values in the kernel's j-major layout: [k, d_out] and [slots, k, d_out]."""
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(d_out, d_in, generator=g).argsort(dim=1)[:, :k].t().contiguous()
    values = stack([torch.randn(k, d_out, generator=g) for _ in range(adapters)])
    slots = torch.tensor([1, 0, 3, 2, 1, 0], dtype=torch.int64)
    x = torch.randn(len(slots), tokens_per_row, d_in, generator=g)
    out = torch.randn(len(slots), tokens_per_row, d_out, generator=g)
    return out, x, indices, values, slots


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("tokens_per_row", [1, 5])  # decode steps and prefill
def test_each_row_gets_its_own_adapters_delta(backend, k, tokens_per_row):
    out, x, indices, values, slots = case(k, tokens_per_row)
    expected = out.double() + per_row_dense(x, indices, values, slots, x.shape[-1])
    before = out.clone()
    delta = mixed_delta(x, indices, values, slots, backend=backend)
    assert delta.dtype == torch.float32 and delta.shape == out.shape
    add_delta_(out, delta)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    # Rows without an adapter (slot 0) keep their base output bit for bit.
    assert torch.equal(out[slots == 0], before[slots == 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 4])
def test_triton_matches_the_torch_twin(dtype, k):
    if not triton_available():
        pytest.skip("no triton")
    out, x, indices, values, slots = case(k, tokens_per_row=3, seed=k)
    out, x, values = out.to(dtype), x.to(dtype), values.to(torch.bfloat16)
    reference = out.clone()
    add_delta_(reference, mixed_delta(x, indices, values, slots, backend="torch"))
    add_delta_(out, mixed_delta(x, indices, values, slots, backend="triton"))
    if dtype == torch.float32:
        torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    else:
        # Both sum in float32 and round once; the interpreter may round bf16 one ulp apart.
        ulps = (out.view(torch.int16).int() - reference.view(torch.int16).int()).abs()
        assert int(ulps.max()) <= 1


@pytest.mark.parametrize(
    "launch",
    [
        mixed_delta_module.TritonLaunch(block_t=16, block_o=64, unroll=True),
        mixed_delta_module.TritonLaunch(block_t=4, block_o=16, unroll=False),  # tiles past the edges: 6 x 70
        mixed_delta_module.TritonLaunch(block_t=1, block_o=128, unroll=True),
    ],
)
@pytest.mark.parametrize("k", [1, 5, mixed_delta_module.UNROLL_MAX_K + 1])  # the last unrolls no more
def test_every_triton_launch_gives_the_twins_delta(monkeypatch, launch, k):
    if not triton_available():
        pytest.skip("no triton")
    _, x, indices, values, slots = case(k, tokens_per_row=2, seed=k)
    monkeypatch.setattr(mixed_delta_module, "LAUNCH", launch)
    torch.testing.assert_close(
        mixed_delta(x, indices, values, slots, backend="triton"),
        mixed_delta(x, indices, values, slots, backend="torch"),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens_per_row", [1, 4])
def test_triton_adds_into_the_output_in_one_launch_as_the_twin_does(dtype, tokens_per_row):
    if not triton_available():
        pytest.skip("no triton")
    out, x, indices, values, slots = case(3, tokens_per_row, seed=tokens_per_row)
    out, x, values = out.to(dtype), x.to(dtype), values.to(torch.bfloat16)
    reference, before = out.clone(), out.clone()
    add_delta_(reference, mixed_delta(x, indices, values, slots, backend="torch"))
    add_mixed_delta_(out, x, indices, values, slots, backend="triton")
    if dtype == torch.float32:
        torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)
    else:  # both sum in float32 and round once; the interpreter may round bf16 one ulp apart
        assert int((out.view(torch.int16).int() - reference.view(torch.int16).int()).abs().max()) <= 1
    assert torch.equal(out[slots == 0], before[slots == 0])  # rows without an adapter: their base output


def test_bf16_output_keeps_a_delta_smaller_than_half_its_ulp_in_float32_accumulation():
    # Two tokens, each adding 0.4 ulp to 1.0 via two selected features: 0.8 ulp in float32, which
    # rounds to +1 ulp; rounding each term to bf16 first would lose both.
    ulp = 2.0**-7
    out = torch.ones(1, 1, 1, dtype=torch.bfloat16)
    x = torch.ones(1, 1, 2, dtype=torch.bfloat16)
    indices = torch.tensor([[0], [1]])
    values = stack([torch.full((2, 1), 0.4 * ulp)])
    add_delta_(out, mixed_delta(x, indices, values, torch.tensor([1])))
    assert float(out) == 1.0 + ulp


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.update(indices=a["indices"][0]), "indices must be"),
        (lambda a: a.update(values=a["values"][:, :1]), "values must be"),
        (lambda a: a.update(slots=a["slots"][:2]), "slots must be"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_error(mutate, message):
    _, x, indices, values, slots = case(2, 1)
    args = {"x": x, "indices": indices, "values": values, "slots": slots}
    mutate(args)
    with pytest.raises(ValueError, match=message):
        mixed_delta(**args)


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16])  # bf16: widened as loaded
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("k", [1, 20])
def test_cpu_kernel_matches_the_torch_twin_over_several_output_blocks(index_dtype, k, values_dtype):
    # d_out = 600 spans three of the C++ kernel's 256-wide output blocks, the last one partial
    # and not a whole number of 16-wide vectors.
    _, x, indices, values, slots = case(k, tokens_per_row=3, d_in=96, d_out=600, adapters=5)
    values = values.to(values_dtype)
    slots = torch.tensor([5, 0, 3, 2, 1, 4], dtype=torch.int64)
    expected = mixed_delta(x, indices, values.float(), slots, backend="torch")
    delta = mixed_delta(x, indices.to(index_dtype), values, slots, backend="cpu")
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(delta[1], torch.zeros_like(delta[1]))


def test_cpu_kernel_checks_ranges_unless_told_not_to():
    _, x, indices, values, slots = case(2, 1)
    with pytest.raises(RuntimeError, match="slots must lie in"):
        mixed_delta(x, indices, values, torch.full_like(slots, values.shape[0]), backend="cpu")
    with pytest.raises(RuntimeError, match="indices must lie in"):
        mixed_delta(x, torch.full_like(indices, x.shape[-1]), values, slots, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # C++ in place / delta then one rounding
@pytest.mark.parametrize("tokens_per_row", [1, 5])
def test_add_mixed_delta_in_place_equals_adding_the_delta(dtype, tokens_per_row):
    out, x, indices, values, slots = case(4, tokens_per_row)
    out = out.to(dtype)
    expected = out.clone()
    add_delta_(expected, mixed_delta(x, indices, values, slots, backend="torch"))
    before = out.clone()
    add_mixed_delta_(out, x, indices.int(), values, slots)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:  # float32 sums that differ in their last bits, each rounded once: at most one bf16 ulp apart
        torch.testing.assert_close(out.float(), expected.float(), rtol=2**-7, atol=0)
    assert torch.equal(out[slots == 0], before[slots == 0])


@pytest.mark.parametrize("tokens_per_row", [1, 5])
def test_the_registered_operators_pass_torch_library_opcheck(tokens_per_row):
    out, x, indices, values, slots = case(4, tokens_per_row)
    torch.library.opcheck(torch.ops.neuroada.mixed_delta, (x, indices, values, slots, "auto", True))
    torch.library.opcheck(torch.ops.neuroada.add_mixed_delta_, (out, x, indices, values, slots, True, "auto"))


def test_a_compiled_forward_keeps_the_mixed_product_in_one_graph():
    """fullgraph=True raises at any graph break: the product must trace as the registered operators."""
    out, x, indices, values, slots = case(4, tokens_per_row=3)
    weight = torch.randn(out.shape[-1], x.shape[-1])

    def forward(x, values, slots):  # the mixed path's layer: the base product, then each row's delta
        y = x @ weight.t()
        add_mixed_delta_(y, x, indices, values, slots)
        return y, mixed_delta(x, indices, values, slots)

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    for step in range(2):  # a new batch: other slots, other values (the same graph serves them)
        values, slots = values * (step + 1), slots.roll(step)
        for got, expected in zip(compiled(x, values, slots), forward(x, values, slots), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
