"""Thousands of adapters: serving with tiered residency, against 8 resident adapters.

    python benchmarks/many_adapters.py [--scenarios ref8 zipf1000 cliff uniform10000]
                                       [--concurrency 16] [--requests 128] [--max-resident 64] [--rounds 1]

A store of up to 10,000 k=1 magnitude adapters for the embedded SmolLM2-135M (one shared index
set, random values; written once under `--store-dir` and reused), served by `neuroada serve`
with at most `--max-resident` adapters resident (other budgets at their defaults). Each scenario
starts a server on a store of N of them (hard links), warms it with one unrecorded pass, then
runs closed-loop streamed clients like `serve_load.py` (the prefix cache off, as there):
- ref8: 8 adapters, uniform (all resident): the reference;
- zipf1000: 1,000 adapters, Zipf (s = 1.0);
- cliff: 2x`--max-resident` hot adapters, uniform: twice as many as the resident slots;
- uniform10000: 10,000 adapters, uniform: nearly every request a miss.
Reports req/s, output tok/s, TTFT p50/p99 split by hit and miss (the `X-Adapter-Tier` header
each response carries), loads/s and evictions/s (from /metrics), start-up time beyond the model
load (the store scan, `neuroada_adapter_scan_seconds`; the wall time to ready beside that of a
server on an empty store) and the server's peak RSS.
Bounded in count and time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import closed_loop, machine, print_table, write_json  # noqa: E402
from serve_load import PROMPT, start_server  # noqa: E402

SCENARIOS = {  # name -> (adapters in the store, traffic, hot adapters: None = all)
    "ref8": (8, "uniform", None),
    "zipf1000": (1000, "zipf", None),
    "cliff": (1000, "uniform", "2x"),
    "uniform10000": (10_000, "uniform", None),
}


def make_store(folder: Path, count: int) -> list[str]:
    """`count` adapters sharing one magnitude index set; files already there are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"task{i:05d}" for i in range(count)]
    missing = [n for n in names if not (folder / f"{n}.safetensors").exists()]
    if missing:
        import torch
        from switch import TARGETS

        from neuroada.base_model import load_base_model
        from neuroada.fingerprint import BaseModelSpec
        from neuroada.format import LayerDelta, adapter_to_bytes, build_adapter
        from neuroada.selection import select_topk

        model = load_base_model()
        base = BaseModelSpec.from_model(model, "SmolLM2-135M-Instruct")
        indices = {
            name: select_topk(model.get_submodule(name).weight, 1)
            for name in base.linear_shapes
            if name.rsplit(".", 1)[-1] in TARGETS
        }
        started = time.perf_counter()
        for n in missing:
            g = torch.Generator().manual_seed(int(n[4:]))
            layers = {
                name: LayerDelta(idx, torch.randn(idx.shape, generator=g) * 1e-2) for name, idx in indices.items()
            }
            # Plain writes: a benchmark's scratch store needs no fsync (thousands of them are slow).
            data = adapter_to_bytes(build_adapter(layers, base=base, selection="magnitude"))
            (folder / f"{n}.safetensors").write_bytes(data)
        print(f"wrote {len(missing)} adapters in {time.perf_counter() - started:.0f} s", flush=True)
    return names


def linked_store(source: Path, names: list[str], into: Path) -> Path:
    """A store of `names` as hard links (the store serves regular files, never symlinks)."""
    into.mkdir()
    for n in names:
        os.link(source / f"{n}.safetensors", into / f"{n}.safetensors")
    return into


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    wanted = {
        "loads": r'^neuroada_adapter_loads_total\{tier="resident"\} (\S+)$',
        "host_loads": r'^neuroada_adapter_loads_total\{tier="host"\} (\S+)$',
        "evictions": r'^neuroada_adapter_evictions_total\{tier="resident"\} (\S+)$',
        "resident": r'^neuroada_adapters\{tier="resident"\} (\S+)$',
        "host_bytes": r'^neuroada_adapter_bytes\{tier="host"\} (\S+)$',
        "scan_s": r"^neuroada_adapter_scan_seconds (\S+)$",
        "load_s_sum": r"^neuroada_adapter_load_seconds_sum (\S+)$",
        "load_s_count": r"^neuroada_adapter_load_seconds_count (\S+)$",
    }
    return {k: float(m.group(1)) if (m := re.search(p, text, re.M)) else 0.0 for k, p in wanted.items()}


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


async def one_request(client: httpx.AsyncClient, adapter: str, new_tokens: int) -> tuple[float, float, str]:
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "stream": True, "ignore_eos": True}
    started = time.perf_counter()
    first = None
    async with client.stream("POST", "/generate", params={"adapter": adapter}, json=body) as r:
        r.raise_for_status()
        tier = r.headers["x-adapter-tier"]
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and json.loads(line[6:]).get("text"):
                first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - started, end - started, tier


async def run_pass(url: str, plan: list[str], concurrency: int, new_tokens: int) -> dict:
    return await closed_loop(url, plan, concurrency, lambda client, name: one_request(client, name, new_tokens))


def traffic_plan(names: list[str], traffic: str, requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    if traffic == "uniform":
        return [rng.choice(names) for _ in range(requests)]
    order = names[:]
    rng.shuffle(order)  # which adapters are hot is arbitrary
    weights = [1 / (i + 1) for i in range(len(order))]  # Zipf, s = 1.0
    return rng.choices(order, weights, k=requests)


def start(store: Path, args) -> tuple[object, str, float]:
    env = {"NEUROADA_MAX_RESIDENT_ADAPTERS": str(args.max_resident)}
    started = time.perf_counter()
    proc, url = start_server("neuroada", store, args.threads, args.max_batch, env, prefix_cache=False)
    return proc, url, time.perf_counter() - started


def one_pass(name: str, source: Path, all_names: list[str], tmp: Path, args, round_: int) -> dict:
    """A fresh server on the scenario's store, warmed by one unrecorded pass, then one measured pass."""
    count, traffic, hot = SCENARIOS[name]
    names = all_names[:count]
    store = tmp / f"{name}-{round_}"
    linked_store(source, names, store)
    proc, url, startup = start(store, args)
    try:
        served = names[: 2 * args.max_resident] if hot == "2x" else names
        warm = traffic_plan(served, traffic, args.requests, 1 + 2 * round_)
        warm += served if len(served) <= args.max_resident else []  # a reference with every adapter resident
        asyncio.run(run_pass(url, warm, args.concurrency, args.new_tokens))
        before = metrics(url)
        plan = traffic_plan(served, traffic, args.requests, 2 + 2 * round_)
        measured = asyncio.run(run_pass(url, plan, args.concurrency, args.new_tokens))
        after = metrics(url)
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    delta = {k: after[k] - before[k] for k in ("loads", "host_loads", "evictions", "load_s_sum", "load_s_count")}
    return {**measured, **delta, "hot": len(served), "startup": startup, "scan_s": after["scan_s"], "rss": rss}


def summary(name: str, passes: list[dict], args, empty_start: float) -> dict:
    """A scenario's row over its passes: rates from the summed wall time, percentiles over every request."""
    count, traffic, _ = SCENARIOS[name]
    results = [r for p in passes for r in p["results"]]
    seconds = sum(p["seconds"] for p in passes)
    total = lambda key: sum(p[key] for p in passes)  # noqa: E731
    pct = lambda xs, q: sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    hits = [r[0] for r in results if r[2] == "resident"]
    misses = [r[0] for r in results if r[2] != "resident"]
    ttft = [r[0] for r in results]
    return {
        "scenario": name,
        "adapters": count,
        "hot": passes[0]["hot"],
        "traffic": traffic,
        "concurrency": args.concurrency,
        "passes": len(passes),
        "requests": len(results),
        "seconds": seconds,
        "req_per_s": len(results) / seconds,
        "tokens_per_s": len(results) * args.new_tokens / seconds,
        "pass_tokens_per_s": [len(p["results"]) * args.new_tokens / p["seconds"] for p in passes],
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": pct(ttft, 0.99),
        "hit_share": len(hits) / len(results),
        "ttft_hit_p50": statistics.median(hits) if hits else None,
        "ttft_hit_p99": pct(hits, 0.99),
        "ttft_miss_p50": statistics.median(misses) if misses else None,
        "ttft_miss_p99": pct(misses, 0.99),
        "loads_per_s": total("loads") / seconds,
        "file_reads_per_s": total("host_loads") / seconds,
        "evictions_per_s": total("evictions") / seconds,
        "load_ms_mean": 1e3 * total("load_s_sum") / max(1.0, total("load_s_count")),
        "startup_s": max(p["startup"] for p in passes),
        "startup_beyond_empty_s": max(p["startup"] for p in passes) - empty_start,
        "store_scan_s": max(p["scan_s"] for p in passes),
        "peak_rss_mb": max(p["rss"] for p in passes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--store-dir", type=Path, default=Path(tempfile.gettempdir()) / "neuroada-many-adapters")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-resident", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="round-robin passes over the scenarios, pooled")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("many_adapters.json"))
    args = parser.parse_args()

    all_names = make_store(args.store_dir, max(SCENARIOS[s][0] for s in args.scenarios))
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty"
        empty.mkdir()
        proc, _, empty_start = start(empty, args)  # start-up with no adapters: the model load alone
        empty_rss = peak_rss_mb(proc.pid)
        proc.terminate()
        proc.wait(timeout=60)
        passes = {name: [] for name in args.scenarios}
        # Round-robin: a machine whose speed drifts over minutes moves every scenario alike.
        for round_ in range(args.rounds):
            for name in args.scenarios:
                p = one_pass(name, args.store_dir, all_names, Path(tmp), args, round_)
                passes[name].append(p)
                tokens = len(p["results"]) * args.new_tokens / p["seconds"]
                print(f"  round {round_}, {name}: {tokens:.1f} tok/s, store listed in {p['scan_s']:.2f} s", flush=True)
        rows = [summary(name, runs, args, empty_start) for name, runs in passes.items()]

    ref = next((r for r in rows if r["scenario"] == "ref8"), None)
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print(
        f"\nmachine: {machine()}; SmolLM2-135M fp32, max batch {args.max_batch}, {args.concurrency} clients, "
        f"{args.rounds} x {args.requests} requests of {args.new_tokens} tokens per scenario, "
        f"at most {args.max_resident} resident; "
        f"start-up of an empty store {empty_start:.1f} s, its peak RSS {empty_rss:.0f} MB\n"
    )
    print_table(
        [
            "scenario",
            "adapters",
            "hot",
            "req/s",
            "out tok/s",
            "vs ref8",
            "TTFT p50/p99 s",
            "hit share",
            "hit TTFT p50/p99",
            "miss TTFT p50/p99",
            "loads/s",
            "load ms",
            "evict/s",
            "start-up s",
            "store scan s",
            "peak RSS MB",
        ],
        [
            [
                r["scenario"],
                r["adapters"],
                r["hot"],
                f"{r['req_per_s']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-",
                f"{r['ttft_p50']:.2f}/{r['ttft_p99']:.2f}",
                f"{r['hit_share']:.0%}",
                f"{fmt(r['ttft_hit_p50'])}/{fmt(r['ttft_hit_p99'])}",
                f"{fmt(r['ttft_miss_p50'])}/{fmt(r['ttft_miss_p99'])}",
                f"{r['loads_per_s']:.1f}",
                f"{r['load_ms_mean']:.0f}",
                f"{r['evictions_per_s']:.1f}",
                f"{r['startup_s']:.1f}",
                f"{r['store_scan_s']:.2f}",
                f"{r['peak_rss_mb']:.0f}",
            ]
            for r in rows
        ],
    )
    write_json(
        args.out,
        {
            "machine": machine(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "empty_store_startup_s": empty_start,
            "empty_store_peak_rss_mb": empty_rss,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
