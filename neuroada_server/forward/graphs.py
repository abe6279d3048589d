"""Our decode step compiled once per batch-size bucket, over a KV cache that never moves.

On a GPU a small batch's eager decode step is bound by kernel launches, not by the weights'
bytes; gpt-fast and vLLM capture the step (`torch.compile`, mode "reduce-overhead": CUDA graphs).
What a captured graph needs, and how `DecodeGraphs` gives it:

- fixed shapes: a batch of B rows runs as the smallest bucket >= B, the rows past B padded (token
  0 at position 0 of a slot no row holds: what the padding writes there, a newcomer's prefill
  overwrites), and attention is given the cache's whole capacity (the torch twin reads all of it,
  every row masked to its own length; on CUDA the Triton kernel reads each row's own positions);
- fixed addresses: the cache is allocated once for the most rows and the longest sequence the
  server admits (`SlotCache.reserve` never grows it after), its tensors and the packed q/k/v and
  gate/up views marked static; weights switch in place in the packed buffer, so the graph reads
  the applied adapter's weights (merged steps run compiled);
- a mixed step (per-row deltas: the target linears' forwards replaced by the mixed path's, its
  stacks and indices read in place) runs compiled where a graph was traced at start for its
  `MixedAdapters.signature`: the layers adapted, k and the stacks' size. `warm_up` traces one
  per bucket for each (k, targets) it is given, the store's commonest (a rehearsal: zeros bound,
  no adapter needed), and every index set of that signature runs on it;
- every other step runs eager: a mixed step of another signature (an adapter uploaded since, or
  rows of two index sets), a batch split apart to find a failing row, prefills (a joining
  group's shape is its prompts'). After warm-up nothing compiles: a step that would need a new
  graph is refused by the compiler and rerun eager (its signature then goes eager at once), so
  serving never stalls on a compilation; a compiled step that raised otherwise makes every later
  step eager (logged once).

Compilation is paid at start (`warm_up`, every bucket) and its time reported. Off by default
on the CPU, where it does not pay (`benchmarks/RESULTS.md`).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from neuroada_kernels.cpu import cpu_kernels
from neuroada_server.forward.llama import LlamaForward, mixed_forward, unwrapped
from neuroada_server.mixed import MixedAdapters

log = logging.getLogger(__name__)

_MERGED = ((), ())  # the signature of a step with no forward replaced


class DecodeGraphs:
    def __init__(
        self,
        forward: LlamaForward,
        batch_sizes: Sequence[int],
        max_length: int,
        backend: str | Callable = "inductor",
        on_step: Callable[[str], None] = lambda path: None,  # told each compiled step's path: merged or mixed
        mixed: MixedAdapters | None = None,
    ):
        self.forward = forward
        self.mixed = mixed
        self.buckets = sorted(set(batch_sizes))  # each one shape, compiled once
        forward.cache.reserve(self.buckets[-1], max_length)
        self.cache = forward.cache
        self.keys = self.cache.keys[0]  # were the cache ever regrown (it is not), steps go eager
        self.linears = [m for layer in forward.layers for m in layer.linears]
        for tensor in self.cache.keys + self.cache.values:  # written in place, never an input to copy
            torch._dynamo.mark_static_address(tensor)
        for layer in forward.layers:
            for pair in (layer.qkv, layer.gate_up):
                view = pair.packed() if pair is not None else None
                if view is not None:  # a view of the packed buffer, not a parameter: static by mark
                    torch._dynamo.mark_static_address(view)
        for linear in self.linears:  # read through the mixed path's forwards too, not as a module's
            torch._dynamo.mark_static_address(linear.weight, guard=False)
        cuda = self.cache.device.type == "cuda"
        mode = "reduce-overhead" if cuda and backend == "inductor" else None
        self.step = torch.compile(forward.step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.mark_step = torch.compiler.cudagraph_mark_step_begin if mode else lambda: None
        self.on_step = on_step
        self.broken: str | None = None  # why compiled steps stopped, if they did
        self.compile_seconds = 0.0
        self.traced: set[tuple] = set()  # signatures a graph was traced for at warm-up
        self.mixed_shapes: list[tuple[int, int]] = []  # (k, layers) of the mixed signatures traced
        self.serving = False  # past warm-up: the compiler refuses to compile

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
            and self._signature() in self.traced
            and all(unwrapped(m) or mixed_forward(m) is not None for m in self.linears)
        )

    def _signature(self) -> tuple:
        return self.mixed.signature() if self.mixed is not None else _MERGED

    @torch.inference_mode()
    def warm_up(self, mixed_shapes: Sequence[tuple[int, Sequence[str]]] = ()) -> bool:
        """Compile (and capture) every bucket before serving, on the thread that will run the steps (a
        CUDA graph tree is its thread's): the merged step, then a mixed step for each (k, target
        layers) in `mixed_shapes` (with `mixed`). The padding rows' slots are free at start. False
        (logged, every step eager) where the merged step fails to compile; a mixed shape that fails
        is logged and left eager."""
        started = time.perf_counter()
        shapes = list(mixed_shapes) if self.mixed is not None else []
        # Dynamo keeps at most `recompile_limit` graphs of a function (`LlamaForward.step`, over every
        # forward in the process): room is made for these.
        torch._dynamo.config.recompile_limit += len(self.buckets) * (1 + len(shapes))
        try:
            self._trace_buckets()
        except Exception as e:
            self.broken = _reason(e)
            log.warning("compiling the decode step failed (%s); decoding eager", self.broken)
            return False
        for k, targets in shapes:
            try:
                with self.mixed.rehearsal(k, list(targets)):
                    self._trace_buckets()
                self.mixed_shapes.append((k, len(targets)))
            except Exception as e:
                log.warning("compiling mixed steps of k = %d failed (%s); they run eager", k, _reason(e))
        self.serving = True
        self.compile_seconds = time.perf_counter() - started
        sizes = ", ".join(map(str, self.buckets))
        log.info(
            "decode step compiled for batch sizes %s (merged, and mixed for (k, layers) %s) in %.1f s",
            sizes,
            self.mixed_shapes,
            self.compile_seconds,
        )
        return True

    def _trace_buckets(self) -> None:
        for size in self.buckets:
            ids = torch.zeros(size, dtype=torch.long, device=self.cache.device)
            for _ in range(3):  # a CUDA graph is recorded on a later call than the first
                self._run(ids, torch.zeros_like(ids))
        self.traced.add(self._signature())

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] float32 of rows ids [B] at positions [B], as `LlamaForward.step` gives them."""
        B = ids.shape[0]
        size = next(s for s in self.buckets if s >= B)
        if size > B:
            pad = torch.zeros(size - B, dtype=ids.dtype, device=ids.device)
            ids, positions = torch.cat([ids, pad]), torch.cat([positions, pad])  # [size] each
        logits = self._run(ids, positions)[:B].clone()  # a graph's output is overwritten by its next replay
        self.on_step("merged" if self._signature() == _MERGED else "mixed")
        return logits

    def _run(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # [size] each -> [size, V]
        self.mark_step()
        padded = self.mixed.padded(ids.shape[0]) if self.mixed is not None else nullcontext()
        stance = torch.compiler.set_stance("fail_on_recompile") if self.serving else nullcontext()
        with padded, stance:
            return self.step(ids, positions, self.capacity)

    def describe(self) -> dict:
        return {
            "batch_sizes": self.buckets,
            "mixed_shapes": [{"k": k, "layers": layers} for k, layers in self.mixed_shapes],
            "compile_seconds": round(self.compile_seconds, 2),
            "broken": self.broken,
        }

    def fall_back(self, error: Exception) -> None:
        """The step that raised is rerun eager by the caller. Where the compiler refused to compile
        a new graph, steps of its signature run eager from now on; otherwise every step does."""
        if isinstance(error, RuntimeError) and "fail_on_recompile" in str(error):
            self.traced.discard(self._signature())
            log.warning("a decode step needed a graph not compiled at start: its kind runs eager (%s)", _reason(error))
            return
        log.exception("a compiled decode step failed: decoding eager from now on")
        self.broken = _reason(error)


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error)[:500]}"  # dynamo's explanations run to pages


def compile_decode(
    forward: object,
    batch_sizes: Sequence[int],
    max_length: int,
    on_step: Callable[[str], None] = lambda path: None,
    backend: str | Callable = "inductor",
    mixed: MixedAdapters | None = None,
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
    forward.graphs = DecodeGraphs(forward, batch_sizes, max_length, backend, on_step, mixed)
    return forward.graphs
