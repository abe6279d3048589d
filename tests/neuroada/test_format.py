import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save as st_save

from neuroada import errors
from neuroada.fingerprint import BaseModelSpec, fingerprint
from neuroada.format import (
    adapter_to_bytes,
    build_adapter,
    index_set_hash,
    load_adapter,
    read_adapter,
    read_adapter_header,
    save_adapter,
)
from tests.helpers import (
    MALFORMED,
    TINY_NAME,
    Q,
    good_layer,
    malformed_layers,
    random_adapter,
    tiny_llama,
    write_raw,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def spec(model) -> BaseModelSpec:
    return BaseModelSpec.from_model(model, TINY_NAME)


def test_save_load_round_trip_is_bit_exact(model, spec, tmp_path):
    adapter = random_adapter(model, k=3)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    loaded = load_adapter(path, spec)
    assert loaded.metadata == adapter.metadata
    assert list(loaded.layers) == list(adapter.layers)
    for name, d in adapter.layers.items():
        assert loaded.layers[name].indices.dtype == torch.int16
        assert loaded.layers[name].values.dtype == torch.bfloat16
        assert torch.equal(loaded.layers[name].indices, d.indices)
        assert torch.equal(loaded.layers[name].values.view(torch.int16), d.values.view(torch.int16))
    assert [f.name for f in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left


def test_metadata_names_base_k_selection_and_index_hash(model, spec):
    adapter = random_adapter(model, k=2)
    meta = adapter.metadata
    assert (meta.format, meta.format_version, meta.k, meta.selection) == ("neuroada", 1, 2, "random")
    assert meta.base_fingerprint == spec.fingerprint and meta.base_model == TINY_NAME
    assert meta.index_hash == index_set_hash({n: d.indices for n, d in adapter.layers.items()})
    assert meta.targets == sorted(adapter.layers)
    # Same indices, other values: same hash. Other indices: another hash.
    assert random_adapter(model, k=2, seed=0, scale=1.0).metadata.index_hash == meta.index_hash
    assert random_adapter(model, k=2, seed=9).metadata.index_hash != meta.index_hash


def test_failed_write_leaves_the_old_file_and_no_temp_file(model, tmp_path, monkeypatch):
    path = save_adapter(random_adapter(model, seed=1), tmp_path / "a.safetensors")
    before = path.read_bytes()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(random_adapter(model, seed=2), path)
    assert path.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["a.safetensors"]


# --- malformed files: each fault is produced by a real file and named in the message -------------


@pytest.mark.parametrize("case", MALFORMED)
def test_each_tensor_fault_raises_its_own_error(case, spec, tmp_path):
    layers, error, fragment = malformed_layers(case)
    path = tmp_path / "bad.safetensors"
    write_raw(path, layers, k=next(iter(layers.values()))[0].shape[1], spec=spec)
    with pytest.raises(error, match=fragment.replace(".", r"\.")) as info:
        load_adapter(path, spec)
    assert type(info.value) is error


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"k": '"two"'}, "k"),
        ({"k": "3"}, "metadata says k = 3"),
        ({"format": "lora"}, "format"),
        ({"format_version": "7"}, "format_version 7"),
        ({"selection": "best"}, "selection"),
        ({"index_hash": "sha256:00"}, "index_hash"),
        ({"targets": json.dumps(["x"])}, "targets"),
        ({"training": "{not json"}, "training"),
    ],
)
def test_malformed_metadata_is_refused(overrides, fragment, spec, tmp_path):
    path = tmp_path / "bad.safetensors"
    write_raw(path, {Q: good_layer()}, k=2, spec=spec, meta_overrides=overrides)
    with pytest.raises(errors.MetadataError, match=fragment):
        load_adapter(path, spec)


def test_missing_metadata_is_refused(tmp_path, spec):
    idx, val = good_layer()
    path = tmp_path / "bare.safetensors"
    path.write_bytes(st_save({f"{Q}.indices": idx, f"{Q}.values": val}))
    with pytest.raises(errors.MetadataError, match="no metadata"):
        load_adapter(path, spec)
    write_raw(path, {Q: good_layer()}, k=2, spec=spec)
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    del header["__metadata__"]["base_fingerprint"]
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + struct.unpack("<Q", raw[:8])[0] :])
    with pytest.raises(errors.MetadataError, match="base_fingerprint"):
        load_adapter(path, spec)


def test_not_safetensors_and_truncated_files_are_refused(model, spec, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, or a pickle, not safetensors")
    with pytest.raises(errors.NotSafetensorsError):
        load_adapter(path, spec)
    data = adapter_to_bytes(random_adapter(model))
    for cut in (4, 100, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(errors.NotSafetensorsError):
            load_adapter(path, spec)


def test_fingerprint_mismatch_is_refused(model, tmp_path):
    other = BaseModelSpec.from_model(tiny_llama(seed=1), "other-tiny")
    path = save_adapter(random_adapter(model), tmp_path / "a.safetensors")
    with pytest.raises(errors.FingerprintMismatchError, match="other-tiny"):
        load_adapter(path, other)


def test_adapter_bytes_load_like_files(model, spec):
    adapter = random_adapter(model)
    assert read_adapter(adapter_to_bytes(adapter)).metadata == adapter.metadata


def test_fingerprint_is_dtype_independent_and_model_specific():
    fp32 = tiny_llama(seed=0)
    bf16 = tiny_llama(seed=0).to(torch.bfloat16)
    assert fingerprint(fp32) == fingerprint(bf16)
    assert fingerprint(fp32) != fingerprint(tiny_llama(seed=1))


def test_fingerprint_is_identical_across_processes():
    code = "from tests.helpers import tiny_llama; from neuroada.fingerprint import fingerprint; print(fingerprint(tiny_llama(seed=0)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == fingerprint(tiny_llama(seed=0))


def test_a_damaged_value_is_detected_by_the_values_hash(model, spec, tmp_path):
    from safetensors.torch import load as st_load

    adapter = random_adapter(model, k=2)
    tensors = st_load(adapter_to_bytes(adapter))
    key = next(k for k in tensors if k.endswith(".values"))
    bits = tensors[key].view(torch.int16)
    bits[3, 1] ^= 0x0040  # one flipped bit: still a finite bf16 value, so only the hash can tell
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(st_save(tensors, metadata=adapter.metadata.to_strings()))
    with pytest.raises(errors.MetadataError, match="values_hash"):
        load_adapter(path, spec)


def test_deeply_nested_metadata_is_refused_not_a_recursion_error(spec, tmp_path):
    path = tmp_path / "nested.safetensors"
    deep = "[" * 100_000 + "]" * 100_000  # json.loads alone would raise RecursionError
    write_raw(path, {Q: good_layer()}, k=2, spec=spec, meta_overrides={"training": deep})
    with pytest.raises(errors.MetadataError, match="training"):
        load_adapter(path, spec)
    nested = json.dumps({"a": [[[[[[[[[[1]]]]]]]]]]})  # parses, but deeper than any summary needs
    write_raw(path, {Q: good_layer()}, k=2, spec=spec, meta_overrides={"training": nested})
    with pytest.raises(errors.MetadataError, match="nested deeper"):
        load_adapter(path, spec)


def test_a_deeply_nested_header_is_not_safetensors(spec, tmp_path):
    header = ("[" * 100_000 + "]" * 100_000).encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    for source in (path, path.read_bytes()):
        with pytest.raises(errors.NotSafetensorsError, match="nested too deeply"):
            load_adapter(source, spec)


def test_an_adapter_for_another_base_says_so_before_any_shape(spec, tmp_path):
    other = BaseModelSpec.from_model(tiny_llama(seed=1), "other-tiny")
    # Shaped for nothing in this base (d_out 32), and made for another one: the base is the news.
    path = tmp_path / "foreign.safetensors"
    write_raw(path, {Q: good_layer(d_out=32)}, k=2, spec=other)
    with pytest.raises(errors.FingerprintMismatchError):
        load_adapter(path, spec)


@pytest.mark.parametrize("notes", [0, 40_000])  # metadata within the first read, and past it
def test_header_reading_matches_the_full_read(notes, tmp_path):
    model = tiny_llama(seed=0)
    base = BaseModelSpec.from_model(model, TINY_NAME)
    adapter = random_adapter(model, k=3, seed=4)
    adapter = build_adapter(adapter.layers, base=base, selection="random", training={"notes": "n" * notes})
    path = save_adapter(adapter, tmp_path / "x.safetensors")
    header = read_adapter_header(path, base)
    assert header.metadata == adapter.metadata
    assert (header.nbytes, header.num_params) == (adapter.nbytes, adapter.num_params)
    assert header.values_bytes == sum(d.values.nbytes for d in adapter.layers.values())


def test_header_reading_refuses_what_the_full_read_refuses(tmp_path):
    model = tiny_llama(seed=0)
    base = BaseModelSpec.from_model(model, TINY_NAME)
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")  # a header longer than the file
    with pytest.raises(errors.NotSafetensorsError):
        read_adapter_header(path, base)
    other = save_adapter(random_adapter(tiny_llama(seed=1, vocab_size=300)), tmp_path / "other.safetensors")
    with pytest.raises(errors.FingerprintMismatchError):
        read_adapter_header(other, base)
