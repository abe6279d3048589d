"""Serving under multi-adapter load: an async httpx client against a server on loopback.

    python benchmarks/serve_load.py [--engines neuroada per-adapter lora] [--adapters 1 8 32]
                                    [--concurrency 4 16] [--requests 48] [--rounds 1]

For each engine, starts a server (embedded SmolLM2-135M) on a free port with a temporary store
of N random k=1 adapters, then for each scenario sends `--requests` streamed requests from
`--concurrency` closed-loop clients, each choosing its adapter uniformly or by Zipf (s = 1.1),
with fixed prompt and output lengths (ignore_eos), the prefix cache off (every request sends the
same prompt; `prefix_cache.py` measures the cache). Engines:
- neuroada: `neuroada serve` as shipped (continuous batching, mixed-adapter batches);
- per-adapter: `neuroada serve` with NEUROADA_MIXED_BATCHES=false (one adapter per batch);
- lora: the PEFT-LoRA engine of `benchmarks/peers/` (r = 8, same names) behind the same front end.
Base-only traffic on the first engine is the reference. With `--rounds N` the scenarios of
one concurrency run N times round-robin and their requests are pooled. Prints req/s, output
tokens/s, p50/p99 time to first token and end-to-end latency, and adapter switches per second
(from /metrics).
Bounded in count and time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

PROMPT = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nWrite a short story about a robot.\n\n### Response:\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(folder: Path, count: int) -> None:
    import torch
    from switch import random_adapter

    from neuroada.base_model import load_base_model
    from neuroada.fingerprint import BaseModelSpec
    from neuroada.format import save_adapter

    model = load_base_model()
    base = BaseModelSpec.from_model(model, "SmolLM2-135M-Instruct")
    for i in range(count):
        torch.manual_seed(i)
        save_adapter(random_adapter(model, base, k=1, seed=100 + i), folder / f"task{i:02d}.safetensors")


def start_server(
    engine: str,
    store: Path,
    threads: int,
    max_batch: int,
    extra_env: dict | None = None,
    ready_timeout: float = 300,
    prefix_cache: bool = True,
    log: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """`neuroada serve` (or the LoRA peer) on a free loopback port. `prefix_cache=False` turns the
    prefix cache off: a load of one prompt repeated would otherwise measure the cache, not the engine.
    The server's output goes to `log` (default: a temporary file); a server that exits before it
    answers raises at once, with the end of that output."""
    port = free_port()
    env = dict(
        os.environ,
        **(extra_env or {}),
        **({} if prefix_cache else {"NEUROADA_PREFIX_CACHE_BYTES": "0"}),
        NEUROADA_ADAPTER_DIR=str(store),
        NEUROADA_PORT=str(port),
        NEUROADA_MAX_BATCH_SIZE=str(max_batch),
        NEUROADA_MIXED_BATCHES=str(engine != "per-adapter").lower(),
        OMP_NUM_THREADS=str(threads),
    )
    command = [sys.executable, "-m", "neuroada.cli", "serve"]
    if engine == "lora":
        peer = Path(__file__).with_name("peers") / "lora_server.py"
        command = [sys.executable, str(peer), "--adapter-dir", str(store), "--port", str(port)]
        command += ["--max-batch-size", str(max_batch), "--threads", str(threads)]
    if log is None:
        log = Path(tempfile.mkstemp(prefix="neuroada-server-", suffix=".log")[1])
    with log.open("wb") as output:
        proc = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"server did not start (exit code {proc.wait()}); the end of {log}:\n{tail}")


def switches(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("neuroada_adapter_switches_total"):
            return float(line.split()[-1])
    return 0.0


def pick(names: list[str], traffic: str, rng: random.Random) -> str | None:
    if not names:
        return None
    if traffic == "uniform":
        return rng.choice(names)
    weights = [1 / (i + 1) ** 1.1 for i in range(len(names))]
    return rng.choices(names, weights)[0]


async def timed_stream(
    client: httpx.AsyncClient, path: str, body: dict, text_key: str, params: dict | None = None
) -> tuple[float, float]:
    """A streamed request's (time to first text, end-to-end time); `text_key` names the text field
    of its server-sent events."""
    started = time.perf_counter()
    first = None
    async with client.stream("POST", path, params=params or {}, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and json.loads(line[6:]).get(text_key):
                first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - started, end - started


async def one_request(client: httpx.AsyncClient, adapter: str | None, new_tokens: int) -> tuple[float, float]:
    body = {"prompt": PROMPT, "max_new_tokens": new_tokens, "stream": True, "ignore_eos": True}
    return await timed_stream(client, "/generate", body, "text", {"adapter": adapter} if adapter else None)


async def scenario(
    url: str, names: list[str], traffic: str, concurrency: int, requests: int, new_tokens: int, seed: int
) -> dict:
    """One pass of `requests` requests: their (TTFT, end-to-end) latencies, wall time and switches."""
    rng = random.Random(seed)
    plan = [pick(names, traffic, rng) for _ in range(requests)]
    results: list[tuple[float, float]] = []
    before = switches(url)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        queue = list(plan)

        async def worker():
            while queue:
                results.append(await one_request(client, queue.pop(), new_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"latencies": results, "seconds": elapsed, "switches": switches(url) - before}


def summary(passes: list[dict], names: list[str], traffic: str, concurrency: int, new_tokens: int) -> dict:
    """A scenario's row over its passes: throughput from the summed wall time, percentiles over
    every request, and each pass's tokens/s for the spread."""
    latencies = [r for p in passes for r in p["latencies"]]
    elapsed = sum(p["seconds"] for p in passes)
    ttft = sorted(r[0] for r in latencies)
    e2e = sorted(r[1] for r in latencies)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {
        "adapters": len(names),
        "traffic": traffic if names else "base",
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": elapsed,
        "req_per_s": len(latencies) / elapsed,
        "tokens_per_s": len(latencies) * new_tokens / elapsed,
        "pass_tokens_per_s": [len(p["latencies"]) * new_tokens / p["seconds"] for p in passes],
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": pct(ttft, 0.99),
        "e2e_p50": statistics.median(e2e),
        "e2e_p99": pct(e2e, 0.99),
        "switches_per_s": sum(p["switches"] for p in passes) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["neuroada", "per-adapter", "lora"])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--traffic", nargs="+", default=["uniform", "zipf"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=1, help="round-robin passes over the scenarios, pooled")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("serve_load.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        make_store(store, max(args.adapters))
        names = sorted(p.stem for p in store.glob("*.safetensors"))
        rows = []
        for engine in args.engines:
            proc, url = start_server(engine, store, args.threads, args.max_batch, prefix_cache=False)
            try:
                # Warm-up (not recorded): the first requests after start-up run cold, on every path
                # (base, one adapter, mixed); the base row at the lowest concurrency used to run slow.
                for warm in ([], names[:1], names[:8]):
                    asyncio.run(scenario(url, warm, "uniform", max(args.concurrency), 8, args.new_tokens, 0))
                for c in args.concurrency:
                    plan = [(0, "base")] if engine == args.engines[0] else []
                    plan += [(n, traffic) for n in args.adapters for traffic in args.traffic]
                    # Round-robin passes: a machine whose speed drifts over minutes moves every scenario alike.
                    passes = {key: [] for key in plan}
                    for round_ in range(args.rounds):
                        for n, traffic in plan:
                            passes[n, traffic].append(
                                asyncio.run(
                                    scenario(url, names[:n], traffic, c, args.requests, args.new_tokens, n + round_)
                                )
                            )
                    for (n, traffic), runs in passes.items():
                        row = {"engine": engine, **summary(runs, names[:n], traffic, c, args.new_tokens)}
                        rows.append(row)
                        print(
                            f"  {engine}: {n or 'base'} adapters, {traffic}, concurrency {c}: "
                            f"{row['tokens_per_s']:.1f} tok/s, TTFT p99 {row['ttft_p99']:.2f} s",
                            flush=True,
                        )
            finally:
                proc.terminate()
                proc.wait(timeout=60)

    base = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["adapters"] == 0}
    print(
        f"\nmachine: {machine()}; server: SmolLM2-135M fp32, max batch {args.max_batch}; "
        f"{args.requests} requests per scenario, {args.new_tokens} output tokens\n"
    )
    print_table(
        [
            "engine",
            "adapters",
            "traffic",
            "conc",
            "req/s",
            "out tok/s",
            "vs base",
            "TTFT p50/p99 s",
            "e2e p50/p99 s",
            "switch/s",
        ],
        [
            [
                r["engine"],
                r["adapters"] or "base",
                r["traffic"],
                r["concurrency"],
                f"{r['req_per_s']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['tokens_per_s'] / base[r['concurrency']]:.2f}x",
                f"{r['ttft_p50']:.2f}/{r['ttft_p99']:.2f}",
                f"{r['e2e_p50']:.2f}/{r['e2e_p99']:.2f}",
                f"{r['switches_per_s']:.1f}",
            ]
            for r in rows
        ],
    )
    write_json(
        args.out, {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    )


if __name__ == "__main__":
    main()
