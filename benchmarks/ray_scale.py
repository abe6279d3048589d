"""Ray Serve against the plain server: the Ray path's overhead, adapter affinity, Ray's memory.

    python benchmarks/ray_scale.py [--replicas 1 2] [--adapters 64] [--max-resident 32]
                                   [--concurrency 8] [--requests 96] [--rounds 2]

Engines: `direct` (`neuroada serve`), and `ray-N` (`neuroada serve --replicas N` on a local Ray
instance). In each round every engine is started alone, warmed up, measured and stopped, in
turn, so no engine runs beside another's idle processes. Per engine and round:
- latency: 20 sequential non-streamed base requests of one new token (the per-request cost of
  the path, with the model's own work as small as it gets);
- base and zipf: `--requests` streamed requests from `--concurrency` closed-loop clients (the
  `serve_load.py` workload), base-only and over `--adapters` k=1 adapters by Zipf (s = 1.1),
  each replica keeping at most `--max-resident` adapters resident (Ray's multiplexing LRU too);
- affinity hit rate: the share of adapter requests whose adapter was already resident on the
  replica that served them (`X-Adapter-Tier: resident`), after a warm-up that sent every adapter
  once and then a Zipf pass;
- memory: the resident set of the server's whole process tree once warm, and for Ray the part
  that is not the replicas (controller, proxy, ingress, raylet, GCS).
Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import closed_loop, machine, print_table, write_json  # noqa: E402
from serve_load import PROMPT, make_store, pick, start_server  # noqa: E402


async def one_request(client: httpx.AsyncClient, adapter: str | None, new_tokens: int) -> dict:
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "stream": True, "ignore_eos": True}
    started, first = time.perf_counter(), None
    params = {"adapter": adapter} if adapter else {}
    async with client.stream("POST", "/generate", params=params, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and json.loads(line[6:]).get("text"):
                first = time.perf_counter()
    end = time.perf_counter()
    tier = r.headers.get("x-adapter-tier")
    return {"ttft": (first or end) - started, "e2e": end - started, "tier": tier, "replica": r.headers.get("x-replica")}


async def requests_pass(url: str, plan: list[str | None], concurrency: int, new_tokens: int) -> dict:
    return await closed_loop(url, plan, concurrency, lambda client, adapter: one_request(client, adapter, new_tokens))


def sequential_latency(url: str, count: int = 20) -> list[float]:
    times = []
    with httpx.Client(base_url=url, timeout=120) as c:
        for _ in range(count):
            started = time.perf_counter()
            r = c.post("/generate", json={"prompt": "Hello", "max_new_tokens": 1, "ignore_eos": True})
            r.raise_for_status()
            times.append(time.perf_counter() - started)
    return times


def tree_rss_mb(root: int) -> tuple[float, float]:
    """(the whole process tree's resident memory, that of its Ray Serve replicas), in MB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total = replicas = 0.0
    stack = [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            title = Path(f"/proc/{pid}/cmdline").read_text()
        except OSError:
            continue
        rss = next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)
        total += rss
        if "ServeReplica:neuroada:Replica" in title:
            replicas += rss
    return total, replicas


def zipf_plan(names: list[str], requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [pick(names, "zipf", rng) for _ in range(requests)]


def run_engine(engine: str, store: Path, names: list[str], args, round_: int) -> dict:
    extra = {"NEUROADA_MAX_RESIDENT_ADAPTERS": str(args.max_resident)}
    if engine != "direct":
        extra["NEUROADA_REPLICAS"] = engine.split("-")[1]
    started = time.perf_counter()
    proc, url = start_server("neuroada", store, args.threads, args.max_batch, extra, prefix_cache=False)
    startup = time.perf_counter() - started
    try:
        # Warm-up, not recorded: the base path, then every adapter once (each finds its replica),
        # then a Zipf pass (the hot ones stay resident), so that hits measure affinity, not first uses.
        asyncio.run(requests_pass(url, [None] * 8, args.concurrency, args.new_tokens))
        asyncio.run(requests_pass(url, names, args.concurrency, 4))
        asyncio.run(requests_pass(url, zipf_plan(names, args.requests, 1000 + round_), args.concurrency, 8))
        time.sleep(1)
        latency = sequential_latency(url)
        base = asyncio.run(requests_pass(url, [None] * args.requests, args.concurrency, args.new_tokens))
        zipf = asyncio.run(
            requests_pass(url, zipf_plan(names, args.requests, round_), args.concurrency, args.new_tokens)
        )
        rss, replica_rss = tree_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return {
        "engine": engine,
        "round": round_,
        "startup_s": startup,
        "latency": latency,
        "base": base,
        "zipf": zipf,
        "rss_mb": rss,
        "replica_rss_mb": replica_rss,
    }


def summary(engine: str, runs: list[dict], new_tokens: int) -> dict:
    def tok_s(kind):
        return sum(len(r[kind]["results"]) for r in runs) * new_tokens / sum(r[kind]["seconds"] for r in runs)

    zipf = [x for r in runs for x in r["zipf"]["results"]]
    ttft = sorted(x["ttft"] for x in zipf)
    return {
        "engine": engine,
        "latency_p50_ms": 1000 * statistics.median(x for r in runs for x in r["latency"]),
        "base_tokens_per_s": tok_s("base"),
        "zipf_tokens_per_s": tok_s("zipf"),
        "round_tokens_per_s": [len(r["zipf"]["results"]) * new_tokens / r["zipf"]["seconds"] for r in runs],
        "zipf_ttft_p50": statistics.median(ttft),
        "zipf_ttft_p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "hit_rate": sum(x["tier"] == "resident" for x in zipf) / len(zipf),
        "replica_ids_over_rounds": len({x["replica"] for x in zipf if x["replica"]}),  # new ids each round
        "rss_mb": statistics.median(r["rss_mb"] for r in runs),
        "ray_own_rss_mb": statistics.median(r["rss_mb"] - r["replica_rss_mb"] for r in runs)
        if engine != "direct"
        else 0,
        "startup_s": statistics.median(r["startup_s"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--max-resident", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("ray_scale.json"))
    args = parser.parse_args()

    engines = ["direct"] + [f"ray-{n}" for n in args.replicas]
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        make_store(store, args.adapters)
        names = sorted(p.stem for p in store.glob("*.safetensors"))
        for round_ in range(args.rounds):
            for engine in engines:
                run = run_engine(engine, store, names, args, round_)
                runs[engine].append(run)
                tok_s = len(run["zipf"]["results"]) * args.new_tokens / run["zipf"]["seconds"]
                print(f"  round {round_}, {engine}: zipf {tok_s:.1f} tok/s", flush=True)

    rows = [summary(e, runs[e], args.new_tokens) for e in engines]
    direct = rows[0]
    print(
        f"\nmachine: {machine()}; SmolLM2-135M fp32, max batch {args.max_batch}, {args.adapters} k=1 adapters, "
        f"at most {args.max_resident} resident per replica; {args.requests} requests x {args.new_tokens} tokens, "
        f"{args.concurrency} clients, {args.rounds} rounds\n"
    )
    print_table(
        [
            "engine",
            "latency p50 ms",
            "base tok/s",
            "zipf tok/s",
            "vs direct",
            "TTFT p50/p99 s",
            "hit rate",
            "RSS MB",
            "Ray's own MB",
            "start s",
        ],
        [
            [
                r["engine"],
                f"{r['latency_p50_ms']:.1f}",
                f"{r['base_tokens_per_s']:.1f}",
                f"{r['zipf_tokens_per_s']:.1f}",
                f"{r['zipf_tokens_per_s'] / direct['zipf_tokens_per_s']:.2f}x",
                f"{r['zipf_ttft_p50']:.2f}/{r['zipf_ttft_p99']:.2f}",
                f"{r['hit_rate']:.2f}",
                f"{r['rss_mb']:.0f}",
                f"{r['ray_own_rss_mb']:.0f}" if r["engine"] != "direct" else "-",
                f"{r['startup_s']:.0f}",
            ]
            for r in rows
        ],
    )
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {"config": config, "rows": rows})


if __name__ == "__main__":
    main()
