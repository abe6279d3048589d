"""Whole-model adapter switch: ours (restore the old deltas, apply the new) against PEFT LoRA.

    python benchmarks/switch.py [--repeats 20] [--threads 2]

On the embedded SmolLM2-135M, all seven Llama projections: ours at k = 1, 4, 20 in float32 and
bfloat16 weights, between adapters sharing one index set (one scatter) and with their own
(restore + apply); PEFT LoRA r = 8 and 16 (the `bench` extra): merge_adapter + unmerge_adapter,
set_adapter between two loaded adapters, and hotswap_adapter from a file. The floor is the bytes
a switch must move over the copy bandwidth measured in the same process; the line floor counts
each written weight's whole 64-byte cache line, read and written back, as memory moves it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, set_threads, summarize, timed, write_json  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CACHE_LINE = 64  # bytes; what DRAM and the caches move at a time


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Bytes/s of a large device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    samples = timed(lambda: dst.copy_(src), repeats=10, warmup=2, sync=device.type == "cuda")
    return 2 * nbytes / min(samples)


def random_adapter(model, base, k: int, seed: int):
    from neuroada.format import LayerDelta, build_adapter
    from neuroada.selection import select_topk

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (d_out, d_in) in base.linear_shapes.items():
        if name.rsplit(".", 1)[-1] in TARGETS:
            weight = model.get_submodule(name).weight
            layers[name] = LayerDelta(select_topk(weight, k), torch.randn(d_out, k, generator=g) * 1e-2)
    return build_adapter(layers, base=base, selection="magnitude")


def ours(dtype: torch.dtype, k: int, repeats: int, bandwidth: float, device: torch.device) -> list[dict]:
    from neuroada.base_model import load_base_model
    from neuroada.fingerprint import BaseModelSpec
    from neuroada.inplace import PackedWeights

    model = load_base_model(dtype=dtype, device=device)
    base = BaseModelSpec.from_model(model, "embedded")
    a, b = random_adapter(model, base, k, 1), random_adapter(model, base, k, 2)
    packed = PackedWeights(model)
    es = packed.buffer.element_size()
    rows = []
    # Magnitude selection gives both adapters one index set: the server keeps one offsets tensor
    # and switches with a single scatter. Laid out separately, they take restore + apply.
    shared = packed.offsets(a)
    for label, da, db in [
        ("switch, shared index set", packed.pack(a, shared), packed.pack(b, shared)),
        ("restore+apply, own index sets", packed.pack(a), packed.pack(b)),
    ]:
        state = {"applied": da, "saved": packed.apply_(da)}

        def switch():
            nxt = db if state["applied"] is da else da
            state["saved"] = packed.switch_(state["applied"], nxt, state["saved"])
            state["applied"] = nxt

        samples = timed(switch, repeats=repeats, warmup=3, sync=device.type == "cuda")
        packed.restore_(state["applied"], state["saved"])
        n = da.offsets.numel()
        # Memory moves whole cache lines: a weight written at a scattered offset costs its line
        # read and written back (128 bytes), however few of its bytes change.
        lines_of = lambda offsets: torch.unique(offsets.cpu() * es // CACHE_LINE).numel()  # noqa: E731
        lines = lines_of(da.offsets)
        if da.offsets is db.offsets:  # read offsets, saved, values; write weights
            moved = n * (8 + es + 2 + es)
            moved_lines = n * (8 + es + 2) + lines * 2 * CACHE_LINE
        else:  # restore: read offsets, saved; write weights. apply: read offsets, weights, values; write saved, weights
            moved = n * (8 + 2 * es) + n * (8 + 3 * es + 2)
            moved_lines = n * (8 + es) + n * (8 + 2 + es) + (lines + lines_of(db.offsets)) * 2 * CACHE_LINE
        rows.append(
            {
                "method": "neuroada",
                "dtype": str(dtype).removeprefix("torch."),
                "k": k,
                "params": a.num_params,
                "op": label,
                "seconds": summarize(samples),
                "floor_s": moved / bandwidth,
                "bytes": moved,
                "line_floor_s": moved_lines / bandwidth,
                "cache_lines": lines,
            }
        )
    return rows


def lora(dtype: torch.dtype, r: int, repeats: int, bandwidth: float, device: torch.device) -> list[dict]:
    from peft import LoraConfig, get_peft_model
    from peft.utils.hotswap import hotswap_adapter

    from neuroada.base_model import load_base_model

    model = load_base_model(dtype=dtype, device=device)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), init_lora_weights=False)
    peft_model = get_peft_model(model, config, adapter_name="one")
    peft_model.add_adapter("two", config)
    params = sum(p.numel() for n, p in peft_model.named_parameters() if ".one." in n)
    sync = device.type == "cuda"
    dense = sum(m.weight.numel() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS)
    es = torch.finfo(dtype).bits // 8
    rows = []

    def merge_unmerge():
        peft_model.merge_adapter(["one"])
        peft_model.unmerge_adapter()

    samples = timed(merge_unmerge, repeats=repeats, warmup=2, sync=sync)
    # merge and unmerge each read and write every targeted dense weight (factors are small)
    rows.append(
        {
            "method": f"lora r={r}",
            "dtype": str(dtype).removeprefix("torch."),
            "k": None,
            "params": params,
            "op": "merge+unmerge",
            "seconds": summarize(samples),
            "floor_s": 4 * dense * es / bandwidth,
            "bytes": 4 * dense * es,
        }
    )
    names = iter(["one", "two"] * (repeats + 10))
    samples = timed(lambda: peft_model.set_adapter(next(names)), repeats=repeats, warmup=2, sync=sync)
    rows.append(
        {
            "method": f"lora r={r}",
            "dtype": str(dtype).removeprefix("torch."),
            "k": None,
            "params": params,
            "op": "set_adapter (unmerged)",
            "seconds": summarize(samples),
            "floor_s": None,
            "bytes": 0,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=["two"])
        path = Path(tmp) / "two"
        samples = timed(
            lambda: hotswap_adapter(peft_model, str(path), adapter_name="one", torch_device=str(device)),
            repeats=repeats,
            warmup=2,
            sync=sync,
        )
    rows.append(
        {
            "method": f"lora r={r}",
            "dtype": str(dtype).removeprefix("torch."),
            "k": None,
            "params": params,
            "op": "hotswap_adapter (from file)",
            "seconds": summarize(samples),
            "floor_s": None,
            "bytes": 0,
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 20])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("switch.json"))
    args = parser.parse_args()
    set_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bandwidth = copy_bandwidth(device)
    rows = []
    for dtype in [getattr(torch, d) for d in args.dtypes]:
        for k in args.k:
            rows.extend(ours(dtype, k, args.repeats, bandwidth, device))
        if not args.no_lora:
            for r in args.ranks:
                rows.extend(lora(dtype, r, args.repeats, bandwidth, device))
    print(f"\nmachine: {machine()}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; SmolLM2-135M, 7 projections\n")
    table = []
    for r in rows:
        s = r["seconds"]
        floor = f"{r['floor_s'] * 1e3:.3f}" if r["floor_s"] else "-"
        vs = f"{s['median'] / r['floor_s']:.1f}x" if r["floor_s"] else "-"
        line_floor = r.get("line_floor_s", r["floor_s"])  # dense rows move whole lines anyway
        vs_lines = f"{s['median'] / line_floor:.1f}x" if line_floor else "-"
        table.append(
            [
                r["method"],
                r["dtype"],
                r["k"] or "-",
                f"{r['params']:,}",
                r["op"],
                f"{s['median'] * 1e3:.3f} ({s['min'] * 1e3:.3f}-{s['max'] * 1e3:.3f})",
                floor,
                vs,
                f"{line_floor * 1e3:.3f}" if line_floor else "-",
                vs_lines,
            ]
        )
    columns = ["method", "dtype", "k", "params", "operation", "ms median (min-max)", "floor ms", "vs floor"]
    print_table(columns + ["line floor ms", "vs line floor"], table)
    write_json(args.out, {"bandwidth_bytes_per_s": bandwidth, "rows": rows})


if __name__ == "__main__":
    main()
