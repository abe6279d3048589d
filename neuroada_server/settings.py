"""Server configuration: one pydantic-settings class; every field is also an environment variable.

Each field `foo` reads `NEUROADA_FOO`; `neuroada serve --foo` overrides it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEUROADA_", extra="ignore")

    model: str | None = Field(
        None, description="base model: a local HF folder or hub id (default: embedded SmolLM2-135M-Instruct)"
    )
    device: str = Field("auto", description="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16"
    )
    weight_dtype: Literal["same", "bfloat16"] = Field(
        "same",
        description="same: linear weights in dtype; bfloat16 (with dtype float32, our decoder only): linear weights "
        "rounded to bf16 and widened as they are read, activations and arithmetic in float32. A decode step reads "
        "half the bytes; outputs are those of the model with bf16-rounded weights",
    )
    adapter_dir: Path = Field(
        Path("adapters"), description="adapter store folder, read at start-up, written by uploads"
    )
    shared_store: bool = Field(
        False,
        description="other servers (replicas) write adapter_dir too: check each request's adapter against its "
        "file (one stat) and follow their uploads, replacements and deletes; set by --replicas",
    )
    replicas: int | None = Field(
        None,
        ge=1,
        description="serve through Ray Serve with this many engine replicas (needs the [ray] extra); unset: one "
        "process, no Ray",
    )
    ray_address: str | None = Field(
        None, description="with replicas: join this Ray cluster (e.g. auto, ray://head:10001); unset: a local Ray"
    )
    replica_cpus: float | None = Field(
        None,
        gt=0,
        description="with replicas: CPUs per replica (its torch threads); default on a local Ray: the "
        "machine's CPUs shared out, else 1",
    )
    host: str = Field("127.0.0.1", description="address to bind")
    port: int = Field(8000, description="port to bind")
    max_batch_size: int = Field(16, ge=1, description="requests decoding together in the running batch")
    max_queued_requests: int = Field(256, ge=1, description="waiting requests before new ones get 429")
    max_prompt_tokens: int = Field(2048, ge=1, description="longest accepted prompt, in tokens")
    max_new_tokens: int = Field(512, ge=1, description="cap on max_new_tokens per request")
    max_upload_bytes: int = Field(256 * 1024 * 1024, ge=1, description="largest accepted adapter upload")
    max_concurrent_uploads: int = Field(2, ge=1, description="uploads received at once; more get 429")
    admin_token: str | None = Field(
        None,
        description="adapter management and /health?deep=1 need 'Authorization: Bearer <token>'; "
        "required when host is not a loopback address",
    )
    generate_admin_token: bool = Field(
        False, description="with no admin_token set, make a random one and print it once at start-up"
    )
    allow_open_admin: bool = Field(
        False,
        description="serve adapter management without a token on a non-loopback host (anyone who reaches "
        "the port can replace adapters): an explicit opt-out of the safe default",
    )
    metrics_token: str | None = Field(None, description="when set, /metrics needs 'Authorization: Bearer <token>'")
    api_token: str | None = Field(
        None, description="when set, generation endpoints need 'Authorization: Bearer <token>'"
    )
    max_request_bytes: int = Field(
        1024 * 1024, ge=1, description="largest JSON request body (uploads: max_upload_bytes)"
    )
    fidelity_threshold: float = Field(
        0.9, ge=0, le=1, description="adapters whose merged deltas survive below this share are served unmerged"
    )
    request_timeout_s: float = Field(300.0, gt=0, description="a request still queued after this long is dropped (504)")
    shutdown_drain_s: float = Field(
        10.0, ge=0, description="on SIGTERM, running requests get this long to finish, then are cancelled"
    )
    max_resident_adapters: int = Field(
        64, ge=1, description="adapters laid out on the device at once; past it, the least recently used leave"
    )
    max_resident_adapter_bytes: int | None = Field(
        None,
        ge=1,
        description="device bytes for resident adapters (values, plus offsets once per index set); default: a tenth "
        "of the GPU's memory, or a twentieth of RAM when serving on the CPU",
    )
    max_host_adapter_bytes: int | None = Field(
        None,
        ge=1,
        description="host bytes for validated adapters kept in memory (indices and values; resident ones count "
        "too); default: a tenth of RAM",
    )
    pin: str = Field(
        "",
        pattern=r"^[A-Za-z0-9._,-]*$",
        description="comma-separated adapter names loaded at start-up and never evicted",
    )
    runner: Literal["auto", "hf"] = Field(
        "auto",
        description="auto: our decoder for Llama-shaped models (llama, mistral, qwen2, qwen3), Hugging Face's "
        "forward for other families; hf: Hugging Face's forward for every model",
    )
    compile_decode: bool | None = Field(
        None,
        description="compile our decoder's step (torch.compile; CUDA graphs on a GPU) once per batch-size bucket at "
        "start-up, over a KV cache allocated whole (max_batch_size rows of max_prompt_tokens + max_new_tokens); "
        "merged steps and mixed steps of the store's commonest adapter shapes (compile_mixed_shapes), other mixed "
        "steps eager; a compilation that fails leaves every step eager. Default: on where our decoder runs on a CUDA "
        "GPU (an eager step there is bound by kernel launches) and that whole cache takes at most half the free GPU "
        "memory, off on the CPU (our float32 kernels are not traceable, and compiling the rest does not pay)",
    )
    compile_batch_sizes: str = Field(
        "1,4,16",
        pattern=r"^[0-9]+(,[0-9]+)*$",
        description="with compile_decode: the batch-size buckets, comma-separated (a batch runs as the smallest that "
        "holds it, padded; each bucket is a compilation at start-up); sizes above max_batch_size are dropped and "
        "max_batch_size is always one",
    )
    compile_mixed_shapes: int = Field(
        2,
        ge=0,
        le=8,
        description="with compile_decode: mixed-adapter steps are compiled too for this many adapter shapes (k and "
        "target layers), the store's commonest at start-up (each is a compilation per bucket at start-up); mixed "
        "steps of other shapes run eager. 0: every mixed step eager",
    )
    tool_call_parser: Literal["hermes", "llama3_json"] | None = Field(
        None,
        description='tool_choice "auto" (the default with tools): read tool calls back from the text in the model\'s '
        "own format (vLLM's parsers): hermes (Qwen2.5, Qwen3, Hermes), llama3_json (Llama 3.1, 3.2); unset: "
        '"auto" is refused, and "required" or a named function work with any model',
    )
    prefix_cache_bytes: int | None = Field(
        None,
        ge=0,
        description="device bytes of keys and values kept of prompts' leading 16-token blocks, per adapter version, "
        "so a later prompt that starts the same way skips computing them (a shared system prompt, a few-shot "
        "preamble, a conversation's earlier turns); least recently used blocks leave first; 0: off; default: a "
        "twentieth of the GPU's memory, or of RAM when serving on the CPU. Our decoder only",
    )
    mixed_batches: bool = Field(
        True, description="one running batch serves every adapter (mixed path); false: one adapter per batch"
    )
    max_wait_ms: int = Field(
        2000,
        ge=0,
        description="one adapter per batch only: an adapter with waiting requests is served within about this long",
    )

    @property
    def pinned(self) -> tuple[str, ...]:
        return tuple(sorted({n for n in self.pin.split(",") if n}))

    @property
    def decode_buckets(self) -> tuple[int, ...]:
        sizes = {int(n) for n in self.compile_batch_sizes.split(",") if 0 < int(n) < self.max_batch_size}
        return tuple(sorted(sizes | {self.max_batch_size}))

    def compiles_decode(self, device_type: str, our_decoder: bool) -> bool:
        """Whether the engine compiles its decode step: as set, or by default where it pays (a CUDA GPU,
        our decoder)."""
        if self.compile_decode is not None:
            return self.compile_decode
        return device_type == "cuda" and our_decoder and self.runner == "auto"

    @model_validator(mode="after")
    def _compiled_decode_is_our_decoders(self) -> ServerSettings:
        if self.compile_decode and self.runner == "hf":
            raise ValueError("compile_decode compiles our decoder's step: it needs runner auto, got runner hf")
        return self

    @model_validator(mode="after")
    def _bf16_weights_beside_float32_activations(self) -> ServerSettings:
        if self.weight_dtype == "bfloat16" and (self.dtype not in ("auto", "float32") or self.runner == "hf"):
            raise ValueError(
                "weight_dtype bfloat16 widens bf16 weights into float32 arithmetic in our decoder: it needs dtype "
                f"float32 (or auto on the CPU) and runner auto, got dtype {self.dtype} and runner {self.runner}"
            )
        return self

    @model_validator(mode="after")
    def _admin_api_not_open_to_the_network(self) -> ServerSettings:
        if is_loopback(self.host) or self.admin_token or self.generate_admin_token or self.allow_open_admin:
            return self
        raise ValueError(
            f"refusing to serve on {self.host} with an open admin API: anyone who reaches the port could "
            "upload, replace and delete adapters. Set --admin-token (NEUROADA_ADMIN_TOKEN), or "
            "--generate-admin-token to have one made and printed, or bind to 127.0.0.1; "
            "--allow-open-admin serves it open anyway"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may resolve to anything
        return False
