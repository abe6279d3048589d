"""The NeuroAda adapter file: one safetensors file, two tensors per target linear layer.

    "{module}.indices"  [d_out, k]  int16 (d_in <= 32767) or int32
    "{module}.values"   [d_out, k]  bfloat16

plus string metadata (`AdapterMetadata`). Reading checks everything that can be checked from
the file alone; `validate_adapter` then checks it against a base model. Both raise one
`AdapterError` subclass per fault, naming the layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from neuroada.errors import (
    AdapterError,
    DOutMismatchError,
    DtypeError,
    DuplicateIndexError,
    FingerprintMismatchError,
    IndexOutOfRangeError,
    MetadataError,
    NonFiniteValueError,
    NotLinearError,
    NotSafetensorsError,
    ShapeError,
    UnknownModuleError,
)
from neuroada.fingerprint import BaseModelSpec

FORMAT_NAME = "neuroada"
FORMAT_VERSION = 1
SELECTIONS = ("magnitude", "random", "reverse")
INDEX_DTYPES = (torch.int16, torch.int32)
VALUES_DTYPE = torch.bfloat16
_MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_METADATA_CHARS = 1 << 20  # per metadata field (targets lists every layer's name)
MAX_METADATA_NESTING = 8  # lists and objects inside a JSON metadata field
_METADATA_FIRST = '{"__metadata__":'
_FIRST_HEADER_READ = 16 * 1024
_DECODER = json.JSONDecoder()


class AdapterMetadata(BaseModel):
    """The adapter's metadata, stored as safetensors string metadata (JSON-encoded where not a string)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    base_model: str  # the base model's name or path, for people
    base_fingerprint: str  # neuroada.fingerprint.fingerprint() of the base it was made for
    k: int  # selected inputs per output neuron
    selection: str  # how indices were chosen: magnitude | random | reverse
    index_hash: str  # hash of every layer's indices; equal hashes mean identical index sets
    values_hash: str | None = None  # hash of every layer's values: a damaged file is refused (optional)
    targets: list[str]  # module paths of the adapted linear layers, sorted
    created: str  # ISO 8601 UTC
    training: dict[str, Any] | None = None  # optional summary: steps, final loss, data hash, ...

    @field_validator("format")
    @classmethod
    def _format_is_ours(cls, v: str) -> str:
        if v != FORMAT_NAME:
            raise ValueError(f"format is {v!r}, expected {FORMAT_NAME!r}")
        return v

    @field_validator("format_version")
    @classmethod
    def _version_supported(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"format_version {v} is not supported (this build reads {FORMAT_VERSION})")
        return v

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"k must be >= 1, got {v}")
        return v

    @field_validator("selection")
    @classmethod
    def _known_selection(cls, v: str) -> str:
        if v not in SELECTIONS:
            raise ValueError(f"selection {v!r} is not one of {SELECTIONS}")
        return v

    def to_strings(self) -> dict[str, str]:
        return {
            key: v if isinstance(v, str) else json.dumps(v) for key, v in self.model_dump().items() if v is not None
        }

    @classmethod
    def from_strings(cls, raw: dict[str, str]) -> AdapterMetadata:
        fields = {}
        for key, v in raw.items():
            if len(v) > MAX_METADATA_CHARS:
                raise MetadataError(
                    f"metadata field {key!r} has {len(v)} characters; the limit is {MAX_METADATA_CHARS}"
                )
            if key in ("format", "base_model", "base_fingerprint", "selection", "index_hash", "values_hash", "created"):
                fields[key] = v
            else:
                try:
                    fields[key] = json.loads(v)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise MetadataError(f"metadata field {key!r} is not valid JSON: {e}") from None
                if _nesting(fields[key]) > MAX_METADATA_NESTING:
                    raise MetadataError(f"metadata field {key!r} is nested deeper than {MAX_METADATA_NESTING} levels")
        try:
            return cls(**fields)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'metadata'}: {err['msg']}" for err in e.errors())
            raise MetadataError(f"malformed metadata: {problems}") from None


@dataclass(frozen=True)
class LayerDelta:
    indices: torch.Tensor  # [d_out, k] int16 / int32
    values: torch.Tensor  # [d_out, k] bfloat16


@dataclass(frozen=True)
class SparseAdapter:
    layers: dict[str, LayerDelta]  # module path -> delta, sorted by path
    metadata: AdapterMetadata

    @property
    def num_params(self) -> int:
        return sum(d.values.numel() for d in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(d.values.nbytes + d.indices.nbytes for d in self.layers.values())


def index_dtype_for(d_in: int) -> torch.dtype:
    return torch.int16 if d_in <= torch.iinfo(torch.int16).max else torch.int32


def index_set_hash(indices: dict[str, torch.Tensor]) -> str:
    """Hash of all layers' indices, independent of their storage dtype and of dict order."""
    h = hashlib.sha256()
    for name in sorted(indices):
        idx = indices[name]
        h.update(f"{name}:{tuple(idx.shape)};".encode())
        h.update(idx.to(torch.int32).cpu().contiguous().numpy().astype("<i4").tobytes())
    return "sha256:" + h.hexdigest()[:32]


def values_hash(values: dict[str, torch.Tensor]) -> str:
    """Hash of all layers' bf16 values, in layer order: detects a damaged file."""
    h = hashlib.sha256()
    for name in sorted(values):
        h.update(name.encode())
        h.update(values[name].to(VALUES_DTYPE).cpu().contiguous().view(torch.int16).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def build_adapter(
    layers: dict[str, LayerDelta],
    *,
    base: BaseModelSpec,
    selection: str,
    training: dict[str, Any] | None = None,
) -> SparseAdapter:
    """Assemble an adapter (values cast to bf16, indices to the narrowest dtype) and its metadata."""
    layers = dict(sorted(layers.items()))
    ks = {d.indices.shape[1] for d in layers.values()}
    if len(ks) != 1:
        raise ShapeError(f"every layer must have the same k, got {sorted(ks)}")
    packed = {
        name: LayerDelta(
            indices=d.indices.detach().to(index_dtype_for(base.linear_shapes[name][1])).cpu().contiguous(),
            values=d.values.detach().to(VALUES_DTYPE).cpu().contiguous(),
        )
        for name, d in layers.items()
    }
    metadata = AdapterMetadata(
        base_model=base.name,
        base_fingerprint=base.fingerprint,
        k=ks.pop(),
        selection=selection,
        index_hash=index_set_hash({n: d.indices for n, d in packed.items()}),
        values_hash=values_hash({n: d.values for n, d in packed.items()}),
        targets=list(packed),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        training=training,
    )
    adapter = SparseAdapter(packed, metadata)
    check_structure(adapter)
    return adapter


def adapter_to_bytes(adapter: SparseAdapter) -> bytes:
    tensors = {}
    for name, d in adapter.layers.items():
        tensors[f"{name}.indices"] = d.indices
        tensors[f"{name}.values"] = d.values
    return st_save(tensors, metadata=adapter.metadata.to_strings())


def save_adapter(adapter: SparseAdapter, path: str | os.PathLike) -> Path:
    """Write atomically: a temp file in the same folder, fsync, rename over the final name."""
    return write_atomic(Path(path), adapter_to_bytes(adapter))


def write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        replace_durably(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def replace_durably(tmp: Path, path: Path) -> None:
    """Rename a fully written file `tmp` over `path` (same folder): fsync, rename, fsync the folder."""
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; adapter files are meant to be shared
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_adapter(source: str | os.PathLike | bytes) -> SparseAdapter:
    """Parse an adapter from a path or bytes and check everything the file alone can tell."""
    if isinstance(source, bytes):
        raw_metadata = _safetensors_metadata(source[: 8 + _MAX_HEADER_BYTES], len(source))
        load = lambda: st_load(source)  # noqa: E731
    else:
        path = Path(source)
        with open(path, "rb") as f:
            head = f.read(8)
            header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            raw_metadata = _safetensors_metadata(head + f.read(min(header_len, _MAX_HEADER_BYTES)), path.stat().st_size)
        load = lambda: st_load_file(path)  # noqa: E731
    try:
        tensors = load()
    except Exception as e:  # safetensors raises its own error type for every parse failure
        raise NotSafetensorsError(f"not a readable safetensors file: {e}") from None
    metadata = AdapterMetadata.from_strings(raw_metadata)
    adapter = SparseAdapter(_pair_tensors(tensors), metadata)
    check_structure(adapter)
    return adapter


@dataclass(frozen=True)
class AdapterHeader:
    """What an adapter file's header tells without reading its tensors."""

    metadata: AdapterMetadata
    nbytes: int  # indices and values, as `SparseAdapter.nbytes` once read
    values_bytes: int  # the values alone
    num_params: int


def read_adapter_header(path: str | os.PathLike, base: BaseModelSpec) -> AdapterHeader:
    """Metadata and sizes from a file's header alone, checked against `base` (fingerprint, target
    layers). Cheap: a server lists a large store this way and reads a body only when it needs it,
    and `load_adapter` then checks everything. Sizes follow from the metadata and the base (values
    are [d_out, k] bf16) and from the file's length (the tensors fill what follows the header).
    Raises AdapterError."""
    path = Path(path)
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):  # read the header's first pages only, no readahead into the tensors
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
        head = f.read(8 + _FIRST_HEADER_READ)  # the metadata, which safetensors writes first, fits in most
        size = os.fstat(f.fileno()).st_size
        header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        try:
            raw_metadata = _safetensors_metadata(head, size, metadata_only=True)
        except AdapterError:
            if len(head) >= 8 + header_len:
                raise
            head += f.read(min(header_len, _MAX_HEADER_BYTES) - (len(head) - 8))  # the rest of the header
            raw_metadata = _safetensors_metadata(head, size, metadata_only=True)
    metadata = AdapterMetadata.from_strings(raw_metadata)
    check_fingerprint(metadata, base)
    for target in metadata.targets:
        check_target(target, base)
    num_params = metadata.k * sum(base.linear_shapes[t][0] for t in metadata.targets)
    values_bytes = num_params * VALUES_DTYPE.itemsize
    return AdapterHeader(metadata, size - 8 - header_len, values_bytes, num_params)


def load_adapter(source: str | os.PathLike | bytes, base: BaseModelSpec) -> SparseAdapter:
    adapter = read_adapter(source)
    validate_adapter(adapter, base)
    return adapter


def check_structure(adapter: SparseAdapter) -> None:
    """Checks that need no base model: dtypes, shapes, duplicates, finiteness, metadata agreement."""
    meta = adapter.metadata
    if not adapter.layers:
        raise MetadataError("the adapter has no layers")
    if sorted(adapter.layers) != meta.targets:
        raise MetadataError(
            f"metadata targets {meta.targets[:4]}... do not match the file's layers {list(adapter.layers)[:4]}..."
        )
    for name, d in adapter.layers.items():
        if d.indices.dtype not in INDEX_DTYPES:
            raise DtypeError(f"layer {name}: indices dtype {d.indices.dtype} is not int16 or int32")
        if d.values.dtype != VALUES_DTYPE:
            raise DtypeError(f"layer {name}: values dtype {d.values.dtype} is not bfloat16")
        if d.indices.dim() != 2 or d.indices.shape != d.values.shape:
            raise ShapeError(
                f"layer {name}: indices {tuple(d.indices.shape)} and values {tuple(d.values.shape)} "
                "must both be [d_out, k]"
            )
        if d.indices.shape[1] != meta.k:
            raise MetadataError(f"layer {name}: k = {d.indices.shape[1]}, metadata says k = {meta.k}")
        if d.indices.numel() and int(d.indices.min()) < 0:
            raise IndexOutOfRangeError(f"layer {name}: negative index {int(d.indices.min())}")
        if meta.k > 1:
            ordered = d.indices.sort(dim=1).values
            dup_rows = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1).nonzero()
            if dup_rows.numel():
                raise DuplicateIndexError(f"layer {name}: row {int(dup_rows[0])} selects an input position twice")
        if not torch.isfinite(d.values).all():
            raise NonFiniteValueError(f"layer {name}: values contain NaN or infinity")
    expected_hash = index_set_hash({n: d.indices for n, d in adapter.layers.items()})
    if meta.index_hash != expected_hash:
        raise MetadataError(f"metadata index_hash {meta.index_hash} does not match the indices ({expected_hash})")
    if meta.values_hash is not None:
        actual = values_hash({n: d.values for n, d in adapter.layers.items()})
        if meta.values_hash != actual:
            raise MetadataError(
                f"metadata values_hash {meta.values_hash} does not match the values ({actual}): the file is damaged"
            )


def validate_adapter(adapter: SparseAdapter, base: BaseModelSpec) -> None:
    """Checks against the base model: fingerprint first (an adapter for another base should say
    so, not report its first differing shape), then module names, layer kinds, shapes, index range."""
    check_fingerprint(adapter.metadata, base)
    for name, d in adapter.layers.items():
        check_target(name, base)
        d_out, d_in = base.linear_shapes[name]
        if d.indices.shape[0] != d_out:
            raise DOutMismatchError(f"layer {name}: adapter has d_out={d.indices.shape[0]}, base has d_out={d_out}")
        if d.indices.numel() and int(d.indices.max()) >= d_in:
            raise IndexOutOfRangeError(f"layer {name}: index {int(d.indices.max())} is outside [0, {d_in})")


def check_target(name: str, base: BaseModelSpec) -> None:
    """The base model has a linear layer `name`."""
    if name not in base.linear_shapes:
        if name in base.module_names:
            raise NotLinearError(f"layer {name}: the base model's module is not a linear layer")
        raise UnknownModuleError(f"layer {name}: the base model has no module of that name")


def check_fingerprint(metadata: AdapterMetadata, base: BaseModelSpec) -> None:
    if metadata.base_fingerprint != base.fingerprint:
        raise FingerprintMismatchError(
            f"adapter was made for base model {metadata.base_model!r} "
            f"(fingerprint {metadata.base_fingerprint}), this base is {base.name!r} ({base.fingerprint})"
        )


def _safetensors_metadata(head: bytes, size: int, metadata_only: bool = False) -> dict[str, str]:
    """The metadata from a file's first bytes `head` (length prefix and header) and its `size`.
    `metadata_only`: when the header opens with the metadata (as safetensors writes it), parse
    that object alone, not the tensors' entries after it."""
    if size < 8:
        raise NotSafetensorsError(f"not a safetensors file: {size} bytes is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
        raise NotSafetensorsError(f"not a safetensors file or truncated: header length {header_len}, file {size} bytes")
    try:
        text = head[8 : 8 + header_len].decode()
        if metadata_only and text.startswith(_METADATA_FIRST):
            header = {"__metadata__": _DECODER.raw_decode(text, len(_METADATA_FIRST))[0]}
        else:
            header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise NotSafetensorsError("not a safetensors file: the header is not JSON (or is nested too deeply)") from None
    if not isinstance(header, dict):
        raise NotSafetensorsError("not a safetensors file: the header is not a JSON object")
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not metadata:
        raise MetadataError("the file has no metadata; a NeuroAda adapter carries its format, base model and k there")
    if not all(isinstance(v, str) for v in metadata.values()):
        raise MetadataError("metadata values must be strings (safetensors string metadata)")
    return metadata


def _nesting(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iterative: no recursion limit)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, depth + 1)
            todo.extend((child, depth + 1) for child in (v.values() if isinstance(v, dict) else v))
    return deepest


def _pair_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, LayerDelta]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, part = key.rpartition(".")
        if part not in ("indices", "values") or not module:
            raise MetadataError(f"tensor {key!r} is neither '<module>.indices' nor '<module>.values'")
        halves.setdefault(module, {})[part] = t
    layers = {}
    for module, parts in sorted(halves.items()):
        missing = {"indices", "values"} - parts.keys()
        if missing:
            raise ShapeError(f"layer {module}: has no {missing.pop()} tensor")
        layers[module] = LayerDelta(parts["indices"], parts["values"])
    return layers
