"""A bounded soak of `neuroada serve` on loopback: mixed traffic, churn, malformed input.

    python benchmarks/soak.py [--minutes 10] [--clients 8]

Starts the server (embedded SmolLM2-135M) on a free port with a temporary store of random k=1
adapters; `--clients` closed-loop clients send generation requests over the adapters and the
base (some streamed and abandoned), a share of them malformed and a share hostile (a sampling
temperature that overflows, an adapter whose valid but huge deltas overflow the activations,
adversarial stop strings, a prompt too long to tokenize, a non-streamed request whose client
times out); a background client uploads, replaces and deletes adapters and uploads corrupt
files. Stops by itself after `--minutes`. Prints requests by status (hostile ones apart), the
5xx count of the other requests, p50/p99 latency, adapter switches, whether the base weights'
checksum still matches (GET /health?deep=1), and whether the adapters on disk are exactly the
adapters served.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402
from serve_load import make_store, start_server, switches  # noqa: E402

PROMPT = "### Instruction:\nName three colors.\n\n### Response:\n"
MALFORMED = [
    ("POST", "/generate", {"json": {"prompt": "hi", "temperature": -1}}),
    ("POST", "/generate", {"json": {"prompt": "hi", "max_new_tokens": 10**6}}),
    ("POST", "/generate", {"json": {"prompt": ""}}),
    ("POST", "/generate", {"content": b"{not json", "headers": {"content-type": "application/json"}}),
    ("POST", "/generate", {"json": {"prompt": "hi"}, "params": {"adapter": "../../etc/passwd"}}),
    ("POST", "/generate", {"json": {"prompt": "hi"}, "params": {"adapter": "no-such-adapter"}}),
    ("POST", "/v1/completions", {"json": {"model": "nope", "prompt": "hi"}}),
    ("POST", "/v1/chat/completions", {"json": {"model": "x", "messages": []}}),
    ("PUT", "/adapters/evil..name", {"content": b"abc"}),
    ("PUT", "/adapters/junk", {"content": b"\x00" * 1000}),
    ("GET", "/adapters/%2e%2e%2fsecret", {}),
]


HOSTILE = [
    ("temperature overflow", "/generate", {"json": {"prompt": "hi", "temperature": 1e-40}}),
    (
        "huge deltas, sampled",
        "/generate",
        {"json": {"prompt": PROMPT, "temperature": 1.0}, "params": {"adapter": "huge"}},
    ),
    (
        "huge deltas, greedy",
        "/generate",
        {"json": {"prompt": PROMPT, "max_new_tokens": 8}, "params": {"adapter": "huge"}},
    ),
    (
        "adversarial stops",
        "/generate",
        {"json": {"prompt": PROMPT, "max_new_tokens": 48, "ignore_eos": True, "stop": ["\x00" * 63 + "a"] * 8}},
    ),
    ("prompt too long", "/v1/completions", {"json": {"model": "SmolLM2-135M-Instruct", "prompt": "z" * 900_000}}),
    (
        "client times out",
        "/generate",
        {"json": {"prompt": PROMPT, "max_new_tokens": 512, "ignore_eos": True}, "timeout": 0.5},
    ),
]


def huge_adapter() -> bytes:
    """Valid by every check (finite bf16 values), but deltas near bf16's largest value: the
    activations of any request on it overflow."""
    from switch import random_adapter

    from neuroada.base_model import load_base_model
    from neuroada.fingerprint import BaseModelSpec
    from neuroada.format import LayerDelta, adapter_to_bytes, build_adapter

    model = load_base_model()
    base = BaseModelSpec.from_model(model, "SmolLM2-135M-Instruct")
    layers = {
        n: LayerDelta(d.indices, d.values.float().sign() * 3e38)
        for n, d in random_adapter(model, base, k=1, seed=7).layers.items()
    }
    return adapter_to_bytes(build_adapter(layers, base=base, selection="magnitude"))


async def client_loop(url: str, names: list[str], stop_at: float, rng: random.Random, stats: dict) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        while time.monotonic() < stop_at:
            if rng.random() < 0.05:
                kind, path, kwargs = rng.choice(HOSTILE)
                try:
                    r = await c.post(path, **kwargs)
                    stats["hostile"][f"{kind} {r.status_code}"] += 1
                except httpx.TimeoutException:
                    stats["hostile"][f"{kind} client timeout"] += 1
                continue
            if rng.random() < 0.15:
                method, path, kwargs = rng.choice(MALFORMED)
                stats["malformed"] += 1
                r = await c.request(method, path, **kwargs)
                stats["status"][r.status_code] += 1
                continue
            adapter = rng.choice(names + [None])
            params = {"adapter": adapter} if adapter else {}
            body = {
                "prompt": PROMPT,
                "max_new_tokens": rng.randint(4, 24),
                "temperature": rng.choice([0, 0.8]),
                "seed": rng.randint(0, 1000),
            }
            started = time.perf_counter()
            try:
                if rng.random() < 0.1:  # a stream the client abandons after its first event
                    async with c.stream("POST", "/generate", params=params, json=body | {"stream": True}) as r:
                        stats["status"][r.status_code] += 1
                        async for _ in r.aiter_lines():
                            break
                    stats["abandoned"] += 1
                    continue
                r = await c.post("/generate", params=params, json=body)
            except httpx.HTTPError as e:
                stats["status"][type(e).__name__] += 1
                continue
            stats["status"][r.status_code] += 1
            if r.status_code == 200:
                stats["latency"].append(time.perf_counter() - started)


async def churn_loop(
    url: str, store: Path, pool: dict[str, bytes], stop_at: float, rng: random.Random, stats: dict
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        while time.monotonic() < stop_at:
            name = rng.choice(["churn0", "churn1", "churn2"])
            action = rng.random()
            if action < 0.5:
                r = await c.put(f"/adapters/{name}", content=rng.choice(list(pool.values())))
            elif action < 0.75:
                r = await c.delete(f"/adapters/{name}")
            else:
                data = bytearray(rng.choice(list(pool.values())))
                data[len(data) // 2] ^= 0xFF  # a corrupt upload: must be refused
                stats["malformed"] += 1
                r = await c.put(f"/adapters/{name}", content=bytes(data))
            stats["churn"][
                f"{'corrupt' if action >= 0.75 else 'put' if action < 0.5 else 'delete'} {r.status_code}"
            ] += 1
            await asyncio.sleep(rng.uniform(0.2, 1.0))


def cancelled(url: str) -> float:
    """Requests the server stopped because their client went away (status 499)."""
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(
        float(line.split()[-1]) for line in lines if line.startswith("neuroada_requests_total") and '"499"' in line
    )


def disk_matches_served(url: str, store: Path) -> bool:
    from neuroada.format import read_adapter

    served = {a["name"]: a for a in httpx.get(f"{url}/adapters").json()["adapters"]}
    on_disk = {p.stem: read_adapter(p) for p in store.glob("*.safetensors")}
    return set(served) == set(on_disk) and all(
        served[n]["created"] == a.metadata.created
        and served[n]["index_hash"] == a.metadata.index_hash
        and served[n]["parameters"] == a.num_params
        for n, a in on_disk.items()
    )


async def soak(url: str, store: Path, names: list[str], pool: dict[str, bytes], args) -> dict:
    stats = {
        "status": collections.Counter(),
        "churn": collections.Counter(),
        "latency": [],
        "malformed": 0,
        "abandoned": 0,
        "hostile": collections.Counter(),
    }
    stop_at = time.monotonic() + args.minutes * 60
    before = switches(url)
    rngs = [random.Random(i) for i in range(args.clients + 1)]
    await asyncio.gather(
        *(client_loop(url, names, stop_at, rngs[i], stats) for i in range(args.clients)),
        churn_loop(url, store, pool, stop_at, rngs[-1], stats),
    )
    lat = sorted(stats["latency"])
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "requests_by_status": {str(k): v for k, v in sorted(stats["status"].items(), key=str)},
        "churn": dict(stats["churn"]),
        "malformed_tried": stats["malformed"],
        "abandoned_streams": stats["abandoned"],
        "hostile_by_outcome": dict(sorted(stats["hostile"].items())),
        "server_errors_5xx": sum(v for k, v in stats["status"].items() if isinstance(k, int) and k >= 500),
        "cancelled_499_counted": cancelled(url),
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "adapter_switches": switches(url) - before,
        "base_checksum_equal": httpx.get(f"{url}/health", params={"deep": 1}, timeout=120)
        .json()
        .get("base_weights_intact"),
        "disk_equals_served": disk_matches_served(url, store),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("soak.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        make_store(store, args.adapters + 3)
        pool = {}
        for p in sorted(store.glob("*.safetensors"))[args.adapters :]:  # kept aside for the churn client
            pool[p.stem] = p.read_bytes()
            p.unlink()
        names = sorted(p.stem for p in store.glob("*.safetensors"))
        proc, url = start_server("neuroada", store, args.threads, 16)
        try:
            assert httpx.put(f"{url}/adapters/huge", content=huge_adapter(), timeout=120).status_code == 201
            result = asyncio.run(soak(url, store, names, pool, args))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\nmachine: {machine()}; {args.minutes} min, {args.clients} clients + 1 churn client\n")
    for key, value in result.items():
        print(f"{key:<22} {value}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
