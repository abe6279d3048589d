import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from neuroada import host_memory
from neuroada.inplace import PackedWeights
from tests.helpers import tiny_llama

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are advised on Linux only")


def _thp_eligible(address: int) -> bool:
    """Whether the mapping holding `address` may be backed by transparent huge pages (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "THPeligible:":
            return line.split()[1] == "1"
    raise AssertionError(f"no mapping holds {address:#x}")


def _thp_mode() -> str:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return text[text.index("[") + 1 : text.index("]")]


@linux
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_large_buffer_starts_on_a_huge_page_and_is_advised_onto_them(dtype):
    t = host_memory.huge_page_empty(3_000_001, dtype)
    assert t.shape == (3_000_001,) and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % host_memory.HUGE_PAGE == 0
    t.fill_(1.5)  # the whole range is writable memory of its own
    assert t.sum().item() == pytest.approx(1.5 * 3_000_001, rel=1e-2)
    if _thp_mode() != "never":
        assert _thp_eligible(t.data_ptr())


def test_a_small_buffer_is_a_plain_tensor():
    t = host_memory.huge_page_empty(1000, torch.float32)
    assert t.shape == (1000,) and t.untyped_storage().nbytes() == 4000


@linux
def test_moving_a_tied_parameter_to_huge_pages_keeps_its_values_and_its_ties():
    embedding = nn.Embedding(4096, 256)  # 4 MiB
    head = nn.Linear(256, 4096, bias=False)
    head.weight = embedding.weight
    before = embedding.weight.detach().clone()
    host_memory.move_to_huge_pages_(embedding.weight)
    assert head.weight is embedding.weight
    assert embedding.weight.data_ptr() % host_memory.HUGE_PAGE == 0
    assert torch.equal(head.weight, before)


@linux
def test_packed_weights_on_the_cpu_start_on_a_huge_page_and_hold_their_views():
    model = tiny_llama(seed=1)
    model.model.layers[0].mlp.gate_proj = nn.Linear(64, 9000, bias=False)  # > 2 MiB of weights in all
    model.model.layers[0].mlp.up_proj = nn.Linear(64, 9000, bias=False)
    model.model.layers[0].mlp.down_proj = nn.Linear(9000, 64, bias=False)
    model.requires_grad_(False)
    packed = PackedWeights(model)
    assert packed.buffer.data_ptr() % host_memory.HUGE_PAGE == 0
    assert packed.holds(model.model.layers[1].self_attn.v_proj.weight)
    assert not packed.holds(model.model.embed_tokens.weight)
