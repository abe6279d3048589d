"""GPU suite: the checks and timings that need a CUDA device, in one call of a few minutes.

    python benchmarks/gpu_suite.py [--embedded] [--out benchmarks/gpu_suite.json]
    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --smoke      # the same code paths on a CPU

1. Kernels against their torch twins on the device: flat apply / reapply / restore bit for bit
   (float32, bfloat16, float16), the sparse product's forward and gradients, the mixed product,
   the decode step's attention (LLaMA-7B's head shape with grouped queries).
2. Whole-model switch on a LLaMA-7B-shaped stack of random bf16 weights in one flat buffer
   (32 layers; q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008), magnitude top-k
   indices, k = 1 and 20: one scatter between two adapters sharing the index set, and restore +
   apply between adapters with their own, against the floor (bytes moved / copy bandwidth).
   Goal on an H100-class card: k = 20 under 1 ms, k = 1 under 0.1 ms.
3. The mixed-adapter delta at batch 32 on the same stack (8 adapters, one index set): all 224
   layers' `mixed_delta` against the dense matmuls of the same batch, launched from Python and
   replayed from a CUDA graph (the kernels' own time). Goal: at most 5% at k = 20. Then the
   same under each candidate Triton launch (`TritonLaunch`: tile sizes, the k loop unrolled).
4. Decode on a LLaMA-7B-shaped model of random bf16 weights (packed as the server packs them),
   our decoder's step (`LlamaForward.step`) at batch 1 and 8 (`--decode-batch`), eager and
   compiled as the server compiles it (`DecodeGraphs`: `torch.compile`, mode "reduce-overhead":
   CUDA graphs; the KV cache marked static, one shape every step: attention given its whole capacity),
   against the HBM floor: the weights' bytes per step over the copy bandwidth. Goal: compiled
   batch 1 at 70% of the floor or better. At the first batch size, eager and compiled, torch's
   profiler lists where a step's device time goes. Then mixed steps (`--mixed-decode-batch`, 8):
   the rows split between two adapters of k = the largest `--k` on every linear, sharing their
   index set (magnitude selection), eager and compiled as the server compiles them (a graph
   traced for that adapter shape at warm-up), profiled at their first batch size too.
5. With --embedded: decode.py, a short serve_load.py and train_cost.py (floor, ours with the
   Triton gather product, LoRA; float32) on the embedded model (subprocesses).
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, print_table, write_json  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

mixed_delta_module = importlib.import_module("neuroada_kernels.mixed_delta")  # the package's attribute is the function

from switch import TARGETS  # noqa: E402

from neuroada.fingerprint import BaseModelSpec  # noqa: E402
from neuroada.format import LayerDelta, SparseAdapter, build_adapter  # noqa: E402
from neuroada_kernels import (  # noqa: E402
    apply_delta_flat_,
    flat_offsets,
    mixed_delta,
    reapply_delta_flat_,
    restore_flat_,
    sparse_delta,
)
from neuroada_kernels.decode_attention import decode_attention_ref, decode_attention_triton  # noqa: E402
from neuroada_kernels.mixed_delta import TritonLaunch  # noqa: E402
from neuroada_server.engine import place_for_serving_  # noqa: E402
from neuroada_server.forward.graphs import DecodeGraphs  # noqa: E402
from neuroada_server.forward.llama import LlamaForward  # noqa: E402
from neuroada_server.mixed import MixedAdapters  # noqa: E402
from neuroada_server.resident import AdapterLoader, ResidentAdapter  # noqa: E402

LLAMA_7B_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
SMOKE_LAYER = [(64, 64)] * 4 + [(172, 64)] * 2 + [(64, 172)]
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4)


def elapsed_ms(fn, device: torch.device, repeats: int = 20) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU, wall clock elsewhere), after a warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def check_kernels(device: torch.device) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        buffer = torch.randn(50_000, generator=g).to(dtype).to(device)
        offsets = torch.randperm(50_000, generator=g)[:7_000].to(device)
        values = (torch.randn(7_000, generator=g) * 1e-2).to(torch.bfloat16).to(device)
        results = {}
        for backend in ("torch", "triton"):
            b, saved = buffer.clone(), torch.empty(7_000, dtype=dtype, device=device)
            apply_delta_flat_(b, offsets, values, saved, backend=backend)
            applied = b.clone()
            reapply_delta_flat_(b, offsets, values.flip(0), saved, backend=backend)
            reapplied = b.clone()
            restore_flat_(b, offsets, saved, backend=backend)
            results[backend] = (applied, reapplied, b, saved)
        bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
        ulps = max(
            int((a.view(bits).long() - t.view(bits).long()).abs().max())
            for a, t in zip(results["torch"], results["triton"])
        )
        restored = torch.equal(results["triton"][2], buffer)
        # On CUDA bit for bit; the CPU interpreter may round a bf16/fp16 store one ulp apart.
        allowed = 0 if device.type == "cuda" else 1
        rows.append(
            {
                "check": f"flat apply/reapply/restore {str(dtype)[6:]}",
                "ok": ulps <= allowed and restored,
                "max_ulps": ulps,
            }
        )

    x = torch.randn(64, 96, generator=g).to(device).requires_grad_()
    indices = torch.rand(80, 96, generator=g).argsort(1)[:, :5].to(device)
    values = torch.randn(80, 5, generator=g).to(device).requires_grad_()
    grads = {}
    for backend in ("torch", "triton"):
        y = sparse_delta(x, indices, values, backend=backend)
        gx, gv = torch.autograd.grad(y.square().sum(), (x, values))
        grads[backend] = (y.detach(), gx, gv)
    diff = max(float((a - b).abs().max()) for a, b in zip(grads["torch"], grads["triton"]))
    rows.append({"check": "sparse_delta fwd + grads (fp32)", "ok": diff < 1e-4, "max_abs_diff": diff})

    for dtype in (torch.float32, torch.bfloat16):
        xs = torch.randn(8, 3, 96, generator=g).to(dtype).to(device)
        idx = torch.rand(80, 96, generator=g).argsort(1)[:, :4].t().contiguous().to(device)
        stack = torch.randn(5, 4, 80, generator=g).to(torch.bfloat16).to(device)
        stack[0] = 0
        slots = torch.tensor([1, 0, 2, 3, 4, 1, 0, 2], device=device)
        ref = mixed_delta(xs, idx, stack, slots, backend="torch")
        tri = mixed_delta(xs, idx, stack, slots, backend="triton")
        diff = float((ref - tri).abs().max())
        rows.append({"check": f"mixed_delta {str(dtype)[6:]}", "ok": diff < 1e-4, "max_abs_diff": diff})

    for dtype in (torch.float32, torch.bfloat16):
        B, heads, kv_heads, head_dim = 5, 32, 8, 128
        q = torch.randn(B, heads, head_dim, generator=g).to(dtype).to(device)
        k, v = torch.randn(2, B, kv_heads, head_dim, generator=g).to(dtype).to(device)
        angles = torch.randn(B, head_dim // 2, generator=g).repeat(1, 2).to(device)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        keys, values = torch.randn(2, 8, kv_heads, 300, head_dim, generator=g).to(dtype).to(device)
        positions = torch.tensor([0, 17, 299, 64, 5], device=device)
        args = (q, k, v, cos, sin)
        ref = decode_attention_ref(*args, keys.clone(), values.clone(), 1, positions, head_dim**-0.5)
        tri = decode_attention_triton(*args, keys, values, 1, positions, head_dim**-0.5)
        diff = float((ref.float() - tri.float()).abs().max())
        bound = 1e-4 if dtype == torch.float32 else 5e-2  # the twin rounds each op to bf16
        rows.append({"check": f"decode_attention {str(dtype)[6:]}", "ok": diff < bound, "max_abs_diff": diff})
    return rows


def build_stack(layer: list[tuple[int, int]], layers: int, device: torch.device):
    shapes = layer * layers
    total = sum(o * i for o, i in shapes)
    buffer = torch.empty(total, dtype=torch.bfloat16, device=device)
    starts, start = [], 0
    for o, i in shapes:
        buffer[start : start + o * i].normal_()
        starts.append(start)
        start += o * i
    return buffer, shapes, starts


def topk_indices(buffer, shapes, starts, k: int) -> list[torch.Tensor]:
    return [buffer[s : s + o * i].view(o, i).abs().topk(k, dim=1).indices for (o, i), s in zip(shapes, starts)]


def copy_bandwidth(device: torch.device, elements: int) -> float:
    """Bytes per second of a device-to-device copy (read + write)."""
    a = torch.empty(elements, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    ms = elapsed_ms(lambda: b.copy_(a), device)
    return 2 * a.nbytes / (ms / 1e3)


def time_switch(buffer, shapes, starts, ks: list[int], device: torch.device, bandwidth: float) -> list[dict]:
    rows = []
    for k in ks:
        indices = topk_indices(buffer, shapes, starts, k)
        offsets = torch.cat([flat_offsets(idx, i, s) for idx, (_, i), s in zip(indices, shapes, starts)])
        n = offsets.numel()
        a = (torch.randn(n, device=device) * 1e-2).to(torch.bfloat16)
        b = (torch.randn(n, device=device) * 1e-2).to(torch.bfloat16)
        saved = torch.empty(n, dtype=buffer.dtype, device=device)
        apply_delta_flat_(buffer, offsets, a, saved)
        shared = elapsed_ms(lambda: reapply_delta_flat_(buffer, offsets, b, saved), device)
        other = offsets.flip(0)  # another index set's layout: its own offsets tensor and order

        def restore_apply():
            restore_flat_(buffer, offsets, saved)
            apply_delta_flat_(buffer, other, b, saved)
            restore_flat_(buffer, other, saved)
            apply_delta_flat_(buffer, offsets, a, saved)

        own = elapsed_ms(restore_apply, device) / 2  # two switches per call
        restore_flat_(buffer, offsets, saved)
        # One scatter reads offsets (8 B), values and saved (2 B each) and writes the weight (2 B).
        floor_ms = n * 14 / bandwidth * 1e3
        rows.append({"k": k, "deltas": n, "shared_ms": shared, "own_ms": own, "floor_ms": floor_ms})
    return rows


def replayed_ms(fn, device: torch.device) -> float | None:
    """Median milliseconds of fn()'s kernels captured once in a CUDA graph and replayed: their GPU
    time without the host's launches (None off CUDA). Beside `elapsed_ms(fn)` it tells a host-bound
    sequence of launches from slow kernels."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, the allocator settles
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:  # not yet run on a GPU: a failed capture costs its column, not the sections after it
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:
        print(f"  capturing a CUDA graph failed: {str(e)[:300]}", flush=True)
        return None
    return elapsed_ms(graph.replay, device)


def layer_calls(buffer, shapes, starts, batch: int, device: torch.device):
    """Every layer's dense product at `batch` rows (a call), and a maker of every layer's mixed delta
    at k (8 adapters, one index set: magnitude top-k)."""
    weights = [buffer[s : s + o * i].view(o, i) for (o, i), s in zip(shapes, starts)]
    xs = {i: torch.randn(batch, i, device=device, dtype=torch.bfloat16) for i in {i for _, i in shapes}}
    slots = torch.arange(batch, device=device) % 8 + 1  # 8 adapters

    def dense():
        return [xs[w.shape[1]] @ w.t() for w in weights]

    def mixed_at(k: int):
        indices = [idx.t().contiguous() for idx in topk_indices(buffer, shapes, starts, k)]
        stacks = [torch.randn(9, k, o, device=device).mul_(1e-2).to(torch.bfloat16) for o, _ in shapes]
        return lambda: [mixed_delta(xs[w.shape[1]], ix, st, slots) for w, ix, st in zip(weights, indices, stacks)]

    return dense, mixed_at


def time_mixed(buffer, shapes, starts, ks: list[int], batch: int, device: torch.device) -> list[dict]:
    dense, mixed_at = layer_calls(buffer, shapes, starts, batch, device)
    dense_ms, dense_replayed_ms = elapsed_ms(dense, device), replayed_ms(dense, device)
    rows = []
    for k in ks:
        mixed = mixed_at(k)
        mixed_ms, mixed_replayed_ms = elapsed_ms(mixed, device), replayed_ms(mixed, device)
        rows.append(
            {
                "k": k,
                "batch": batch,
                "dense_ms": dense_ms,
                "mixed_ms": mixed_ms,
                "ratio": mixed_ms / dense_ms,
                "dense_replayed_ms": dense_replayed_ms,
                "mixed_replayed_ms": mixed_replayed_ms,
            }
        )
    return rows


MIXED_LAUNCHES = [  # the Triton mixed kernel's candidate tilings: (tokens, outputs) per program, loop unrolled
    TritonLaunch(16, 64, False),
    TritonLaunch(16, 64, True),
    TritonLaunch(16, 32, True),
    TritonLaunch(8, 32, True),
    TritonLaunch(32, 32, True),
    TritonLaunch(32, 128, True),
]


def time_mixed_launches(buffer, shapes, starts, ks: list[int], batch: int, device: torch.device) -> list[dict]:
    """The mixed delta of every layer under each candidate launch, launched from Python and replayed."""
    _, mixed_at = layer_calls(buffer, shapes, starts, batch, device)
    chosen, rows = mixed_delta_module.LAUNCH, []
    try:
        for k in ks:
            mixed = mixed_at(k)
            for launch in MIXED_LAUNCHES:
                mixed_delta_module.LAUNCH = launch
                row = {"k": k, "batch": batch, **launch._asdict(), "launched_ms": elapsed_ms(mixed, device)}
                rows.append(row | {"replayed_ms": replayed_ms(mixed, device)})
    finally:
        mixed_delta_module.LAUNCH = chosen
    return rows


def random_llama(shape: dict, device: torch.device) -> LlamaForCausalLM:
    """Random bf16 weights, made on the device (a 7B model never passes through host memory)."""
    config = LlamaConfig(
        **shape, num_key_value_heads=shape["num_attention_heads"], vocab_size=32000, tie_word_embeddings=False
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval().requires_grad_(False)


PROMPT_TOKENS = 8
PROFILED_STEPS = 10


@torch.inference_mode()
def time_decode(
    model,
    batch: int,
    steps: int,
    compiled: bool,
    device: torch.device,
    profile: bool = False,
    adapters: list[ResidentAdapter] = (),
) -> tuple[float, list[dict], dict | None]:
    """Median milliseconds of a decode step of `batch` rows (after a prefill of PROMPT_TOKENS each),
    eager or as the server compiles it (`DecodeGraphs`: one bucket, the batch); with `adapters`,
    mixed steps, row b on adapters[b % len] (one index set); with `profile`, the ops and kernels
    taking the most device time over PROFILED_STEPS more steps (torch's profiler); compiled, how
    its first step's logits compare with an eager step's over the same rows."""
    forward = LlamaForward(model)
    mixed = MixedAdapters(model, device, compiled_slots=batch + 1) if adapters else None
    if compiled:  # compiled and captured here, before the prefill, as the server does at start
        forward.graphs = DecodeGraphs(forward, [batch], PROMPT_TOKENS + steps + 4, mixed=mixed)
        shapes = [(a.adapter.metadata.k, a.adapter.metadata.targets) for a in adapters[:1]]
        assert forward.graphs.warm_up(shapes) and len(forward.graphs.mixed_shapes) == len(shapes), forward.graphs.broken
    if mixed is not None:
        mixed.bind([adapters[b % len(adapters)] for b in range(batch)])  # stays bound for every step
    prompts = [[1 + (b + t) % 1000 for t in range(PROMPT_TOKENS)] for b in range(batch)]
    logits, _, rows, _ = forward.prefill(prompts)
    forward.join(rows)
    forward.cache.reserve(batch, PROMPT_TOKENS + steps + 4)
    capacity = forward.cache.capacity  # one shape for every step: attention is given the whole cache
    ids, positions = logits.argmax(-1), torch.tensor(forward.lengths, device=device)
    vs_eager = None
    if compiled:
        eager = LlamaForward(model)
        eager_logits, _, eager_rows, _ = eager.prefill(prompts)
        eager.join(eager_rows)
        expected, got = eager.decode(eager_logits.argmax(-1).tolist()), forward.graphs(ids, positions)
        vs_eager = {
            "max_abs_logit_diff": float((got - expected).abs().max()),
            "argmax_equal": bool(torch.equal(got.argmax(-1), expected.argmax(-1))),
        }
        ids, positions = got.argmax(-1), positions + 1
        del eager

    def one() -> None:
        nonlocal ids, positions
        logits = forward.graphs(ids, positions) if compiled else forward.step(ids, positions, capacity)
        ids, positions = logits.argmax(-1), positions + 1

    for _ in range(3):
        one()
    assert not compiled or forward.graphs.covers(forward, batch)  # its mixed steps too: a graph replays
    ms = elapsed_ms(one, device, repeats=steps)
    table = []
    if profile:
        try:  # not yet run on a GPU: a profiler that fails costs its table, not the measurements after it
            table = profiled(one, device)
        except Exception as e:
            print(f"  profiling failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if mixed is not None:
        mixed.unbind()
    return ms, table, vs_eager


def profiled(fn, device: torch.device, top: int = 15) -> list[dict]:
    """The `top` entries of torch's profiler by device time (CPU time off CUDA), per step of fn."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(PROFILED_STEPS):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def spent(event) -> float:  # microseconds over every profiled step
        return event.device_time_total if device.type == "cuda" else event.cpu_time_total

    events = sorted(profile.key_averages(), key=spent, reverse=True)[:top]
    return [
        {"name": e.key[:90], "calls_per_step": e.count / PROFILED_STEPS, "ms_per_step": spent(e) / 1e3 / PROFILED_STEPS}
        for e in events
    ]


def shared_index_adapters(model, base: BaseModelSpec, k: int) -> list[SparseAdapter]:
    """Two adapters of k inputs per output on every target linear, sharing one index set as NeuroAda
    adapters of one base do (each row's k largest |w|, picked on the device: 6.5 G weights), random
    values."""
    g = torch.Generator().manual_seed(0)
    layers = ({}, {})
    for name, (d_out, _) in base.linear_shapes.items():
        if name.rsplit(".", 1)[-1] in TARGETS:
            indices = model.get_submodule(name).weight.abs().topk(k, dim=1).indices.sort(dim=1).values  # [d_out, k]
            for own in layers:
                own[name] = LayerDelta(indices, torch.randn(d_out, k, generator=g) * 1e-2)
    return [build_adapter(own, base=base, selection="magnitude") for own in layers]


def decode_rows(
    device: torch.device,
    smoke: bool,
    batches: list[int],
    mixed_batches: list[int],
    k: int,
    steps: int,
    bandwidth: float,
) -> Iterator[dict]:
    """One row per (mode, batch) as it is measured, every eager one first, then the compiled ones from
    batch 1, then mixed steps' (adapters of k), eager and compiled: compiling is the slow part, and the
    caller saves each row (a run cut off keeps them)."""
    if not batches and not mixed_batches:  # `--decode-batch` with none: no 13 GB model made for nothing
        return
    model = random_llama(SMOKE_MODEL if smoke else LLAMA_7B, device)
    packed = place_for_serving_(model, device)
    weight_bytes = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    floor_ms = weight_bytes / bandwidth * 1e3
    runs = [(batch, compiled, False) for compiled in (False, True) for batch in batches]
    runs += [(batch, compiled, True) for compiled in (False, True) for batch in mixed_batches]
    adapters = []
    if mixed_batches:
        loader = AdapterLoader(packed, BaseModelSpec.from_model(model, "random"), fidelity_threshold=0.9)
        adapters = [loader.place(f"random{i}", a) for i, a in enumerate(shared_index_adapters(model, loader.base, k))]
    for batch, compiled, mixed in runs:
        started = time.perf_counter()
        profiled_here = batch == (mixed_batches if mixed else batches)[0]  # where a step's time goes, each kind
        ms, profile, vs_eager = time_decode(
            model, batch, steps, compiled, device, profile=profiled_here, adapters=adapters if mixed else []
        )
        wall_s = time.perf_counter() - started  # compilation included
        mode = ("mixed " if mixed else "") + ("compiled" if compiled else "eager")
        print(
            f"  decode batch {batch}, {mode}: {ms:.2f} ms a step, floor {floor_ms:.2f} ms "
            f"({floor_ms / ms:.0%}), {wall_s:.0f} s wall" + (f"; against eager: {vs_eager}" if vs_eager else ""),
            flush=True,
        )
        if profile:
            print_table(
                ["op or kernel", "calls a step", "ms a step"],
                [[r["name"], f"{r['calls_per_step']:.0f}", f"{r['ms_per_step']:.3f}"] for r in profile],
            )
        yield {
            "batch": batch,
            "compiled": compiled,
            "mixed_k": k if mixed else None,  # mixed steps: two adapters of k, one index set
            "step_ms": ms,
            "tokens_per_s": batch / ms * 1e3,
            "floor_ms": floor_ms,
            "floor_fraction": floor_ms / ms,
            "wall_s": wall_s,
            "vs_eager": vs_eager,  # compiled: the first step's logits against an eager step's
            "profile": profile,  # each kind's first batch size's: where a step's time goes
        }


def run_embedded(out_dir: Path) -> None:
    here = Path(__file__).resolve().parent
    commands = [
        [
            sys.executable,
            str(here / "decode.py"),
            "--batch",
            "1",
            "8",
            "--mixed-batch",
            "8",
            "32",
            "--mixed-k",
            "1",
            "20",
        ]
        + ["--adapters", "1", "8", "--repeats", "3", "--out", str(out_dir / "decode_gpu.json")],
        [sys.executable, str(here / "serve_load.py"), "--engines", "neuroada", "per-adapter", "--adapters", "8", "32"]
        + ["--concurrency", "16", "--requests", "32", "--out", str(out_dir / "serve_load_gpu.json")],
        [sys.executable, str(here / "train_cost.py"), "--device", "cuda", "--k", "1", "20", "--steps", "10"]
        + ["--variants", "floor", "ours", "lora", "--out", str(out_dir / "train_cost_gpu.json")],
    ]
    for command in commands:
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, so the script runs on a CPU")
    parser.add_argument("--embedded", action="store_true", help="also run decode.py and serve_load.py")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--decode-batch", type=int, nargs="*", default=[1, 8], help="none: skip the decode")
    parser.add_argument("--mixed-decode-batch", type=int, nargs="*", default=[8], help="none: no mixed steps")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("gpu_suite.json"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) to exercise the code paths on a CPU")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("on a CPU the Triton kernels need TRITON_INTERPRET=1")

    checks = check_kernels(device)
    results = {"smoke": args.smoke, "checks": checks}
    write_json(args.out, results)  # saved after every section: a run cut off keeps what it measured
    print(f"\nmachine: {machine()}\n")
    print_table(
        ["check", "ok", "max difference"],
        [
            [c["check"], c["ok"], f"{c['max_ulps']} ulp" if "max_ulps" in c else f"{c['max_abs_diff']:.2e}"]
            for c in checks
        ],
    )

    layer, layers = (SMOKE_LAYER, 2) if args.smoke else (LLAMA_7B_LAYER, 32)
    buffer, shapes, starts = build_stack(layer, layers, device)
    bandwidth = copy_bandwidth(device, 1 << (16 if args.smoke else 28))
    switch = time_switch(buffer, shapes, starts, args.k, device, bandwidth)
    print(
        f"\nwhole-stack switch, {len(shapes)} layers, {buffer.numel() / 1e9:.2f}B bf16 weights; "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s\n"
    )
    print_table(
        ["k", "deltas", "shared index set ms", "own index sets ms", "floor ms", "shared vs floor"],
        [
            [
                r["k"],
                f"{r['deltas']:,}",
                f"{r['shared_ms']:.3f}",
                f"{r['own_ms']:.3f}",
                f"{r['floor_ms']:.3f}",
                f"{r['shared_ms'] / r['floor_ms']:.1f}x",
            ]
            for r in switch
        ],
    )
    results.update(bandwidth=bandwidth, switch=switch)
    write_json(args.out, results)
    mixed = time_mixed(buffer, shapes, starts, args.k, args.batch, device)
    print(f"\nmixed-adapter delta vs the dense matmuls, batch {args.batch}, 8 adapters, all layers\n")
    print_table(
        ["k", "dense ms", "mixed delta ms", "overhead", "dense, replayed", "mixed delta, replayed"],
        [
            [r["k"], f"{r['dense_ms']:.3f}", f"{r['mixed_ms']:.3f}", f"{r['ratio']:.1%}"]
            + [f"{r[key]:.3f}" if r[key] is not None else "-" for key in ("dense_replayed_ms", "mixed_replayed_ms")]
            for r in mixed
        ],
    )
    results.update(mixed=mixed)
    write_json(args.out, results)
    launches = time_mixed_launches(buffer, shapes, starts, args.k, args.batch, device)
    print(f"\nthe mixed delta under each Triton launch, batch {args.batch}, all layers")
    print(f"(every call's: {mixed_delta_module.LAUNCH})\n")
    print_table(
        ["k", "block_t", "block_o", "unroll", "launched ms", "replayed ms"],
        [
            [r["k"], r["block_t"], r["block_o"], r["unroll"], f"{r['launched_ms']:.3f}"]
            + [f"{r['replayed_ms']:.3f}" if r["replayed_ms"] is not None else "-"]
            for r in launches
        ],
    )
    results.update(mixed_launches=launches, decode=[])
    write_json(args.out, results)
    del buffer, shapes, starts  # the stack's 13 GB, before a model of the same size is made
    if device.type == "cuda":
        torch.cuda.empty_cache()
    decode = results["decode"]
    rows = decode_rows(
        device, args.smoke, args.decode_batch, args.mixed_decode_batch, max(args.k), args.decode_steps, bandwidth
    )
    for row in rows:
        decode.append(row)
        write_json(args.out, results)
    if decode:
        print(f"\ndecode on a {'smoke' if args.smoke else 'LLaMA-7B'}-shaped model, bf16, our decoder's step\n")
        print_table(
            ["batch", "mode", "step ms", "tok/s", "floor ms", "of the floor", "wall s"],
            [
                [
                    r["batch"],
                    ("mixed, " if r["mixed_k"] else "") + ("compiled" if r["compiled"] else "eager"),
                    f"{r['step_ms']:.2f}",
                    f"{r['tokens_per_s']:.0f}",
                    f"{r['floor_ms']:.2f}",
                    f"{r['floor_fraction']:.0%}",
                    f"{r['wall_s']:.0f}",
                ]
                for r in decode
            ],
        )
    if args.embedded:
        run_embedded(args.out.parent)
    if not all(c["ok"] for c in checks):
        sys.exit("a kernel check failed")


if __name__ == "__main__":
    main()
