"""attach: the family's default targets, tied layers refused, left-out linear layers named."""

from __future__ import annotations

import logging

import pytest

from neuroada.config import NeuroAdaConfig, default_targets
from neuroada.model import attach, bypasses
from tests.helpers import FAMILIES, tiny_family, tiny_llama


@pytest.mark.parametrize("family", FAMILIES)
def test_the_default_targets_adapt_every_projection_of_each_family(family, caplog):
    model = tiny_family(family)
    with caplog.at_level(logging.WARNING, logger="neuroada.model"):
        attached = attach(model, NeuroAdaConfig(k=1, targets=default_targets(model.config.model_type)))
    assert not caplog.records  # nothing left out but the output head
    per_layer = 4 if family == "phi3" else 7  # Phi-3 fuses q/k/v and gate/up
    assert len(attached) == len(bypasses(model)) == 2 * per_layer


def test_llama_names_on_phi3_warn_about_the_fused_projections_they_miss(caplog):
    with caplog.at_level(logging.WARNING, logger="neuroada.model"):
        attach(tiny_family("phi3"), NeuroAdaConfig(k=1))  # the Llama names
    [record] = caplog.records
    message = record.getMessage()
    assert "leave out 4 linear layers" in message
    assert "model.layers.*.self_attn.qkv_proj" in message and "model.layers.*.mlp.gate_up_proj" in message


def test_a_tied_lm_head_is_refused_as_a_target():
    model = tiny_llama(seed=0)  # ties lm_head to the input embedding
    with pytest.raises(ValueError, match="lm_head.*tied"):
        attach(model, NeuroAdaConfig(k=1, targets=("q_proj", "lm_head")))
    assert not bypasses(model)  # refused before anything was attached
