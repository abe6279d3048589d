"""Our decode step compiled once per batch-size bucket, over a KV cache that never moves.

On a GPU a small batch's eager decode step is bound by kernel launches, not by the weights'
bytes; gpt-fast and vLLM capture the step (`torch.compile`, mode "reduce-overhead": CUDA graphs).
What a captured graph needs, and how `DecodeGraphs` gives it:

- fixed shapes: a batch of B rows runs as the smallest bucket >= B, the rows past B padded (token
  0 at position 0 of a slot no row holds: what the padding writes there, a newcomer's prefill
  overwrites), and attention reads the cache's whole capacity, every row masked to its own length;
- fixed addresses: the cache is allocated once for the most rows and the longest sequence the
  server admits (`SlotCache.reserve` never grows it after), its tensors and the packed q/k/v
  views marked static; weights switch in place in the packed buffer, so the graph reads the
  applied adapter's weights (merged steps run compiled);
- a mixed step (per-row deltas: the target linears' forwards replaced) and a batch split apart to
  find a failing row run eager, as does any step after a compiled one raised (logged once);
  prefills run eager too (a joining group's shape is its prompts').

Compilation is paid at start (`warm_up`, every bucket) and its time reported. Off by default
(`--compile-decode`): on the CPU it does not pay (`benchmarks/RESULTS.md`).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import torch

from neuroada_kernels.cpu import cpu_kernels
from neuroada_server.forward.llama import LlamaForward, unwrapped

log = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(
        self,
        forward: LlamaForward,
        batch_sizes: Sequence[int],
        max_length: int,
        backend: str | Callable = "inductor",
        on_step: Callable[[], None] = lambda: None,
    ):
        self.forward = forward
        self.buckets = sorted(set(batch_sizes))  # each one shape, compiled once
        forward.cache.reserve(self.buckets[-1], max_length)
        self.cache = forward.cache
        self.keys = self.cache.keys[0]  # were the cache ever regrown (it is not), steps go eager
        self.linears = [m for layer in forward.layers for m in layer.linears]
        for tensor in self.cache.keys + self.cache.values:  # written in place, never an input to copy
            torch._dynamo.mark_static_address(tensor)
        for layer in forward.layers:
            qkv = layer.qkv.weight()
            if qkv is not None:  # a view of the packed buffer, not a parameter: static by mark
                torch._dynamo.mark_static_address(qkv)
        cuda = self.cache.device.type == "cuda"
        mode = "reduce-overhead" if cuda and backend == "inductor" else None
        self.step = torch.compile(forward.step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.mark_step = torch.compiler.cudagraph_mark_step_begin if mode else lambda: None
        self.on_step = on_step
        self.broken: str | None = None  # why compiled steps stopped, if they did
        self.compile_seconds = 0.0

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def covers(self, forward: LlamaForward, batch: int) -> bool:
        """Whether `forward`'s next decode step of `batch` rows can run compiled."""
        return (
            self.broken is None
            and forward is self.forward
            and not forward.parted
            and forward.cache is self.cache
            and self.cache.keys[0] is self.keys
            and batch <= self.buckets[-1]
            and all(unwrapped(m) for m in self.linears)
        )

    @torch.inference_mode()
    def warm_up(self) -> bool:
        """Compile (and capture) every bucket before serving, on the thread that will run the steps (a
        CUDA graph tree is its thread's). The padding rows' slots are free at start. False (logged,
        every step eager) where compilation fails."""
        started = time.perf_counter()
        try:
            for size in self.buckets:
                ids = torch.zeros(size, dtype=torch.long, device=self.cache.device)
                for _ in range(3):  # a CUDA graph is recorded on a later call than the first
                    self._run(ids, torch.zeros_like(ids))
        except Exception as e:
            self.broken = _reason(e)
            log.warning("compiling the decode step failed (%s); decoding eager", self.broken)
            return False
        self.compile_seconds = time.perf_counter() - started
        sizes = ", ".join(map(str, self.buckets))
        log.info("decode step compiled for batch sizes %s in %.1f s", sizes, self.compile_seconds)
        return True

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] float32 of rows ids [B] at positions [B], as `LlamaForward.step` gives them."""
        B = ids.shape[0]
        size = next(s for s in self.buckets if s >= B)
        if size > B:
            pad = torch.zeros(size - B, dtype=ids.dtype, device=ids.device)
            ids, positions = torch.cat([ids, pad]), torch.cat([positions, pad])  # [size] each
        logits = self._run(ids, positions)[:B].clone()  # a graph's output is overwritten by its next replay
        self.on_step()
        return logits

    def _run(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [size] each -> [size, V]
        self.mark_step()
        return self.step(ids, positions, self.capacity)

    def describe(self) -> dict:
        return {"batch_sizes": self.buckets, "compile_seconds": round(self.compile_seconds, 2), "broken": self.broken}

    def fall_back(self, error: Exception) -> None:
        """Compiled steps stop for good; the step that raised is rerun eager by the caller."""
        log.exception("a compiled decode step failed: decoding eager from now on")
        self.broken = _reason(error)


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error)[:500]}"  # dynamo's explanations run to pages


def compile_decode(
    forward: object,
    batch_sizes: Sequence[int],
    max_length: int,
    on_step: Callable[[], None] = lambda: None,
    backend: str | Callable = "inductor",
) -> DecodeGraphs | None:
    """`forward`'s decode step, to compile for every bucket (`warm_up`, before serving), or None
    (logged) where it cannot be: the model runs Hugging Face's forward, or our CPU kernels."""
    if not isinstance(forward, LlamaForward):
        log.warning("compile_decode: the model runs Hugging Face's forward; decoding eager")
        return None
    if forward.device.type == "cpu" and forward.dtype == torch.float32 and cpu_kernels() is not None:
        log.warning(
            "compile_decode: our float32 CPU kernels are not traceable (a bf16 or CUDA model is); decoding eager"
        )
        return None
    forward.graphs = DecodeGraphs(forward, batch_sizes, max_length, backend, on_step)
    return forward.graphs
