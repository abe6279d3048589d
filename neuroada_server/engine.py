"""The engine: one frozen base model and the parts that serve it, put together at start-up.

- `SparseDeltaAdapters` (`neuroada_server.batch_adapters`): the weights, the applied adapter, the mixed
  path's slots, and the lock that guards them;
- `AdapterCatalog` (`neuroada_server.catalog`): the store, the adapters' tiers (disk, host, resident)
  and the thread that loads them, uploads and deletes; the routes' way to adapter management;
- `Worker` (`neuroada_server.worker`): the thread that owns the model and runs the continuous batch.

The engine loads the model and the tokenizer, packs the linear weights (on the host, then into
the device's buffer layer by layer: the device never holds them twice), makes the batch's forward
(with `compile_decode`, its compiled step: compiled on the worker's thread as it starts), and
keeps the limits a request is checked against before it is tokenized or queued.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from neuroada import host_memory
from neuroada.base_model import load_base_model, load_tokenizer, resolve_model_name
from neuroada.fingerprint import BaseModelSpec, linear_layers
from neuroada.inplace import PackedWeights
from neuroada_kernels import use_decode_linears
from neuroada_server.batch_adapters import SparseDeltaAdapters
from neuroada_server.catalog import AdapterCatalog, TierBudgets
from neuroada_server.forward import batch_forward
from neuroada_server.forward.graphs import compile_decode
from neuroada_server.forward.llama import llama_unsupported
from neuroada_server.forward.prefix_cache import PrefixCache
from neuroada_server.generation import GenerationRequest
from neuroada_server.metrics import ServerMetrics
from neuroada_server.mixed import MixedAdapters
from neuroada_server.resident import AdapterLoader
from neuroada_server.scheduler import BatchScheduler
from neuroada_server.settings import ServerSettings
from neuroada_server.store import AdapterStore
from neuroada_server.structured import Grammars
from neuroada_server.worker import Worker

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(settings: ServerSettings) -> tuple[torch.device, torch.dtype]:
    if settings.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(settings.device)
    if settings.dtype == "auto":
        # bf16 matmuls are slow on most CPUs, and fp32 weights keep every merged delta.
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, _DTYPES[settings.dtype]


def round_linear_weights_(model: nn.Module, dtype: torch.dtype) -> None:
    """Every linear layer's weight in `dtype`, in place (a tied embedding with its lm_head); norms,
    biases and the rest keep theirs."""
    for weight in {id(m.weight): m.weight for m in linear_layers(model).values()}.values():
        weight.data = weight.data.to(dtype)


def place_for_serving_(model: nn.Module, device: torch.device) -> PackedWeights:
    """Lay a loaded model out for serving on `device`, in place: its linear weights packed into one
    buffer (on the CPU, on huge pages, with whatever else a step streams: a tied embedding read as
    lm_head), and its linears on `neuroada_kernels.decode_linear`. Returns the packed weights."""
    packed = PackedWeights(model, device=device)
    model.to(device)
    if device.type == "cpu":
        for param in model.parameters():
            if not packed.holds(param):
                host_memory.move_to_huge_pages_(param)
    use_decode_linears(model)
    return packed


class Engine:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.metrics = ServerMetrics()
        self.model_name = resolve_model_name(settings.model)
        device, self.dtype = resolve_device_dtype(settings)
        self.model: PreTrainedModel = load_base_model(settings.model, dtype=self.dtype, device="cpu")
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(settings.model)
        self.base = BaseModelSpec.from_model(self.model, self.model_name)
        unsupported = llama_unsupported(self.model) if settings.runner == "auto" else "--runner hf"
        log.info("forward: %s", "ours (Llama-shaped)" if unsupported is None else f"Hugging Face's ({unsupported})")
        if settings.weight_dtype == "bfloat16" and self.dtype != torch.bfloat16:
            if unsupported is not None:
                raise ValueError(
                    f"weight_dtype bfloat16 needs our decoder; this model runs Hugging Face's ({unsupported})"
                )
            round_linear_weights_(self.model, torch.bfloat16)
        self.packed = place_for_serving_(self.model, device)
        self.base_checksum = self.packed.checksum()
        # Limits a request is checked against before it is tokenized or queued.
        self.context_length: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab()), default=1)
        self.deep_check_lock = threading.Lock()  # one /health?deep=1 at a time

        # Compiled mixed steps need stacks that never grow: a slot for every row a batch can hold.
        mixed = MixedAdapters(self.model, device, compiled_slots=settings.max_batch_size + 1)
        self.adapters = SparseDeltaAdapters(self.packed, mixed, self.metrics)
        loader = AdapterLoader(self.packed, self.base, settings.fidelity_threshold, self.adapters.base_values)
        self.catalog = AdapterCatalog(
            AdapterStore(settings.adapter_dir, shared=settings.shared_store),
            loader,
            self.adapters,
            self.metrics,
            tier_budgets(settings, device),
            settings.max_concurrent_uploads,
            settings.pinned,
            follow_store=settings.shared_store,
        )
        log.info("adapter budgets: %s", self.catalog.budgets)
        self.scheduler = BatchScheduler(
            settings.max_batch_size,
            settings.max_queued_requests,
            settings.max_wait_ms / 1000,
            settings.mixed_batches,
            gate=self.catalog.gate,
        )
        self.catalog.on_ready = self.scheduler.wake
        eos_ids = _eos_ids(self.model, self.tokenizer)
        self.grammars = Grammars(self.tokenizer, self.model.get_output_embeddings().weight.shape[0], eos_ids)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else min(eos_ids)
        self.prefix_cache = None  # on our decoder only
        prefix_cache_bytes = settings.prefix_cache_bytes
        if prefix_cache_bytes is None:
            prefix_cache_bytes = _memory_bytes(device) // 20
        if prefix_cache_bytes and unsupported is None:
            self.prefix_cache = PrefixCache(prefix_cache_bytes)
            self.metrics.prefix_cache_bytes.set_function(lambda: self.prefix_cache.bytes)
        forward = batch_forward(self.model, pad, settings.runner, self.prefix_cache)
        self.decode_graphs = None
        max_length = settings.max_prompt_tokens + settings.max_new_tokens
        if settings.compiles_decode(device.type, our_decoder=unsupported is None):
            if settings.compile_decode is None and not _whole_cache_fits(forward, settings.max_batch_size, max_length):
                log.warning(
                    "decode step not compiled: its KV cache, allocated whole for %d rows of %d tokens, would take more "
                    "than half the GPU's free memory (lower --max-batch-size, --max-prompt-tokens or --max-new-tokens, "
                    "or force it with --compile-decode true)",
                    settings.max_batch_size,
                    max_length,
                )
            else:
                self.decode_graphs = compile_decode(
                    forward,
                    settings.decode_buckets,
                    max_length,
                    lambda path: self.metrics.compiled_steps.labels(path=path).inc(),
                    mixed=mixed,
                )
        self.worker = Worker(
            self.model,
            self.tokenizer,
            eos_ids,
            pad,
            self.adapters,
            self.adapters.lock,
            self.catalog,
            self.scheduler,
            self.metrics,
            settings.shutdown_drain_s,
            forward,
            self._warm_up if self.decode_graphs else None,  # compiled at start, where it will run
        )
        self.catalog.scan()

    def _warm_up(self) -> None:
        """The decode step's graphs, mixed steps' for the store's commonest adapter shapes (listed by now)."""
        self.decode_graphs.warm_up(self.catalog.mixed_shapes()[: self.settings.compile_mixed_shapes])

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.catalog.start()
        self.worker.start()
        if self.decode_graphs is not None:
            self.metrics.decode_compile_seconds.set(self.decode_graphs.compile_seconds)

    def drain(self) -> None:
        self.worker.drain()

    def stop(self) -> None:
        self.worker.stop()
        self.catalog.stop()

    # --- what the routes and tests ask -------------------------------------------------------

    def submit(self, *requests: GenerationRequest) -> None:
        self.worker.submit(*requests)

    @property
    def applied(self) -> str | None:
        return self.adapters.applied_name

    def base_weights_intact(self) -> bool:
        """Every base weight equal to its load-time bits, checked beside decoding."""
        return self.adapters.base_checksum() == self.base_checksum

    def restore_base(self) -> None:
        self.adapters.restore_base()


def _whole_cache_fits(forward: object, rows: int, length: int) -> bool:
    """Whether a compiled step's KV cache, allocated whole on the GPU, leaves at least as much free for
    the rest (activations, the prefix cache, resident adapters) as it takes."""
    cache = getattr(forward, "cache", None)
    if cache is None or cache.device.type != "cuda":
        return True
    return 2 * cache.bytes_for(rows, length) <= torch.cuda.mem_get_info(cache.device)[0]


def _memory_bytes(device: torch.device) -> int:
    """The device's memory: the GPU's, or RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def tier_budgets(settings: ServerSettings, device: torch.device) -> TierBudgets:
    """The adapter tiers' budgets: as set, or a share of the memory each tier lives in."""
    ram = _memory_bytes(torch.device("cpu"))
    if device.type == "cuda":
        resident_default = _memory_bytes(device) // 10
    else:  # the host tier lives in RAM too
        resident_default = ram // 20
    return TierBudgets(
        max_resident_adapters=settings.max_resident_adapters,
        max_resident_bytes=settings.max_resident_adapter_bytes or resident_default,
        max_host_bytes=settings.max_host_adapter_bytes or ram // 10,
    )


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = set()
    config_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list):
        ids.update(config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
