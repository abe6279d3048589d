import json

import pytest
import torch

from neuroada import NeuroAdaConfig, attach, detach, export, select_topk, train
from neuroada.cli import main
from neuroada.fingerprint import BaseModelSpec
from neuroada.format import load_adapter
from neuroada.inplace import apply_adapter_
from neuroada.model import bypasses
from neuroada.trainer import TrainConfig
from tests.helpers import TINY_NAME, synthetic_examples, tiny_llama, tiny_tokenizer


def test_select_topk_picks_largest_magnitudes_with_deterministic_ties():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5], [1.0, 1.0, -1.0, 0.0]])
    assert select_topk(w, 2).tolist() == [[1, 2], [0, 1]]  # row 2: three-way tie -> lowest positions
    assert select_topk(w, 1, "reverse").tolist() == [[0], [3]]
    r = select_topk(torch.randn(50, 30), 5, "random", seed=3)
    assert torch.equal(r, select_topk(torch.randn(50, 30), 5, "random", seed=3))
    assert all(len(set(row)) == 5 for row in r.tolist())
    with pytest.raises(ValueError, match="k must be"):
        select_topk(w, 5)


def test_attach_freezes_base_and_detach_restores_modules(model):
    original = {n: type(m) for n, m in model.named_modules()}
    found = attach(model, NeuroAdaConfig(k=2, targets=("q_proj", "down_proj")))
    assert len(found) == 4  # 2 layers x 2 targets
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".values") for n in trainable)
    ids = torch.randint(0, 257, (1, 5))
    detach(model)
    assert {n: type(m) for n, m in model.named_modules()} == original
    assert not bypasses(model)
    assert model(ids).logits.shape == (1, 5, 257)


def _train_tiny(model, steps, checkpoint=None, lr=5e-2, saved_inputs="float32"):
    attach(model, NeuroAdaConfig(k=4, saved_inputs=saved_inputs))
    config = TrainConfig(
        lr=lr,
        max_steps=steps,
        batch_size=8,
        max_length=200,
        warmup_ratio=0.1,
        checkpoint=checkpoint,
        checkpoint_every=2,
    )
    return train(model, tiny_tokenizer(), synthetic_examples(64), config, progress=False)


@pytest.mark.parametrize("saved_inputs", ["float32", "bfloat16"])
def test_training_lowers_loss_and_moves_only_the_deltas(model, saved_inputs):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = _train_tiny(model, steps=30, saved_inputs=saved_inputs)
    assert result.final_loss < 0.3 * result.first_loss
    after = dict(model.named_parameters())
    moved = [n for n, p in after.items() if n.endswith(".values") and p.abs().sum() > 0]
    assert len(moved) == len(bypasses(model))
    for name, p in before.items():
        new_name = name.replace(".weight", ".base_layer.weight") if f"{name[:-7]}.base_layer.weight" in after else name
        assert torch.equal(after[new_name], p), name


def test_resumed_training_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    straight = tiny_llama(seed=0)
    _train_tiny(straight, steps=6)

    import neuroada.trainer as train_module

    real_save = train_module._save_checkpoint

    def save_then_crash(*args):
        real_save(*args)
        if args[-1] == 4:  # the step
            raise KeyboardInterrupt  # the process dies right after its step-4 checkpoint

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _train_tiny(tiny_llama(seed=0), steps=6, checkpoint=tmp_path / "c.ckpt")
    monkeypatch.setattr(train_module, "_save_checkpoint", real_save)

    again = tiny_llama(seed=0)  # a fresh process rebuilds the model and continues
    result = _train_tiny(again, steps=6, checkpoint=tmp_path / "c.ckpt")
    assert result.steps == 6
    for name, m in bypasses(straight).items():
        torch.testing.assert_close(bypasses(again)[name].values, m.values, rtol=1e-5, atol=1e-7)
    # A run with another schedule must not silently continue this checkpoint.
    with pytest.raises(ValueError, match="another run"):
        _train_tiny(tiny_llama(seed=0), steps=9, checkpoint=tmp_path / "c.ckpt")


def test_exported_adapter_applied_in_place_matches_the_bypass_model(model):
    spec = BaseModelSpec.from_model(model, TINY_NAME)
    _train_tiny(model, steps=10)
    adapter = export(model, spec, selection="magnitude")
    # The export rounds values to bf16; compare with the bypass model using those same values.
    for m in bypasses(model).values():
        m.values.data = m.values.data.to(torch.bfloat16).float()
    ids = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        bypass_logits = model(ids).logits
    merged = tiny_llama(seed=0)
    apply_adapter_(merged, adapter)
    with torch.no_grad():
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, bypass_logits, rtol=1e-4, atol=1e-4)
    assert not torch.equal(merged_logits, tiny_llama(seed=0)(ids).logits)


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama(seed=0).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cli_train_inspect_merge_end_to_end(tiny_folder, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(synthetic_examples(48)))
    out = tmp_path / "a.safetensors"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_folder),
                "--data",
                str(data),
                "--out",
                str(out),
                "--top-k",
                "4",
                "--lr",
                "5e-2",
                "--max-steps",
                "30",
                "--batch-size",
                "8",
                "--max-length",
                "200",
                "--saved-inputs",
                "bfloat16",
            ]
        )
        == 0
    )
    model = tiny_llama(seed=0)
    adapter = load_adapter(out, BaseModelSpec.from_model(model, str(tiny_folder)))
    assert adapter.metadata.k == 4 and adapter.metadata.training["steps"] == 30
    assert adapter.metadata.training["final_loss"] < adapter.metadata.training["first_loss"]
    assert adapter.metadata.training["data_sha256"].startswith("sha256:")
    assert adapter.metadata.training["saved_inputs"] == "bfloat16"

    assert main(["inspect", str(out), "--model", str(tiny_folder)]) == 0
    assert "valid for base model" in capsys.readouterr().out

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_folder), "--adapter", str(out), "--out", str(merged)]) == 0
    assert (merged / "config.json").exists()


def test_inspect_rejects_an_adapter_for_another_base(tiny_folder, tmp_path, capsys):
    other_folder = tmp_path / "other"
    tiny_llama(seed=1).save_pretrained(other_folder)
    spec = BaseModelSpec.from_model(tiny_llama(seed=1), "other")
    model = tiny_llama(seed=1)
    attach(model, NeuroAdaConfig(k=1))
    path = tmp_path / "other.safetensors"
    from neuroada.format import save_adapter

    save_adapter(export(model, spec, "magnitude"), path)
    assert main(["inspect", str(path), "--model", str(tiny_folder)]) == 1
    assert "fingerprint" in capsys.readouterr().err
    path.write_bytes(path.read_bytes()[:50])
    assert main(["inspect", str(path), "--model", str(tiny_folder)]) == 1


def test_the_loop_trains_any_named_parameters_and_resumes_them(tmp_path):
    """What a LoRA comparison relies on: only `trainable` moves, and its checkpoint restores it."""
    tokenizer, examples = tiny_tokenizer(), synthetic_examples(32)

    def run(checkpoint):
        model = tiny_llama(seed=0).requires_grad_(False)
        norm = model.model.norm.weight.requires_grad_(True)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = TrainConfig(lr=1e-2, max_steps=4, batch_size=8, max_length=200, checkpoint=checkpoint)
        train(model, tokenizer, examples, config, progress=False, trainable={"final_norm": norm})
        return norm, {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}

    trained, moved = run(tmp_path / "ckpt")
    assert moved == {"model.norm.weight"}
    resumed, _ = run(tmp_path / "ckpt")  # finds the finished run: no step, the values restored
    assert torch.equal(resumed, trained)
