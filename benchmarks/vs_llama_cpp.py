"""Base-model serving against llama.cpp's `llama-server`, same F32 weights, one client, interleaved.

    python benchmarks/vs_llama_cpp.py --llama-server PATH [--engines ...] [--concurrency 4 16] [--rounds 2]

Starts `neuroada serve` (embedded SmolLM2-135M, fp32) with our decoder (`--runner auto`) and with
Hugging Face's forward (`--runner hf`), and `llama-server` on the same weights dequantised to an
F32 GGUF (`benchmarks/peers/llama_cpp.py`), all with the same threads and batch size. Two more
engines pair up on bf16 weights: ours with `--weight-dtype bfloat16` (float32 activations) and
`llama-server` on a BF16 GGUF of the same rounded weights (norms F32). Each
scenario (concurrency c: c closed-loop clients, `--requests` streamed requests of the same prompt,
`--new-tokens` tokens each with ignore_eos, greedy) runs on each engine in turn, round after round,
so that a machine whose speed drifts moves every engine alike; llama.cpp's prompt cache is off
(`cache_prompt: false`: we have none). Before the load, one greedy completion per engine shows
whether they generate the same text from the same weights. Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from common import machine, print_table, write_json
from peers import llama_cpp
from serve_load import PROMPT, free_port, one_request, start_server, summary, timed_stream

ENGINES = ("neuroada", "neuroada-hf", "llama.cpp", "neuroada-bf16w", "llama.cpp-bf16")
PEERS = {"llama.cpp": "f32", "llama.cpp-bf16": "bf16"}  # llama-server engines: their GGUF's weights
OURS_ENV = {
    "neuroada": {"NEUROADA_RUNNER": "auto"},
    "neuroada-hf": {"NEUROADA_RUNNER": "hf"},
    "neuroada-bf16w": {"NEUROADA_RUNNER": "auto", "NEUROADA_WEIGHT_DTYPE": "bfloat16"},
}


async def llama_cpp_request(client: httpx.AsyncClient, adapter: str | None, new_tokens: int) -> tuple[float, float]:
    body = {"prompt": PROMPT, "n_predict": new_tokens, "stream": True, "ignore_eos": True}
    return await timed_stream(client, "/completion", body | {"temperature": 0, "cache_prompt": False}, "content")


async def run_scenario(url: str, engine: str, concurrency: int, requests: int, new_tokens: int) -> dict:
    send = llama_cpp_request if engine in PEERS else one_request
    results: list[tuple[float, float]] = []
    # A connection per request: llama-server may close a kept-alive connection just as the next
    # request goes out on it ("server disconnected"); every engine is driven the same way.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        remaining = [requests]

        async def client_loop():
            while remaining[0] > 0:
                remaining[0] -= 1
                results.append(await send(client, None, new_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"latencies": results, "seconds": elapsed, "switches": 0.0}


def greedy_text(url: str, engine: str, tokens: int = 24) -> str:
    if engine in PEERS:
        body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0, "cache_prompt": False}
        return httpx.post(f"{url}/completion", json=body, timeout=120).json()["content"]
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0}
    return httpx.post(f"{url}/generate", json=body, timeout=120).json()["text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", type=Path, required=True, help="the llama-server binary")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES[:3]), choices=ENGINES)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--peer-log", type=Path, default=Path(tempfile.gettempdir()) / "llama-server.log", help="llama-server's output"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("vs_llama_cpp.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "adapters"
        store.mkdir()
        servers = {}
        try:
            for engine in args.engines:
                if engine in PEERS:
                    weights = PEERS[engine]
                    gguf = llama_cpp.dequantized_gguf(Path(tmp) / f"model-{weights}.gguf", weights)
                    port = free_port()
                    context = 512  # per slot: prompt + output fit many times over
                    servers[engine] = (
                        llama_cpp.start(
                            args.llama_server, gguf, port, args.max_batch, args.threads, context, args.peer_log
                        ),
                        f"http://127.0.0.1:{port}",
                    )
                else:
                    servers[engine] = start_server("neuroada", store, args.threads, args.max_batch, OURS_ENV[engine])
            texts = {engine: greedy_text(url, engine) for engine, (_, url) in servers.items()}
            for engine, text in texts.items():
                print(f"  greedy, {engine}: {text!r}", flush=True)
            for engine, (_, url) in servers.items():  # warm-up, not recorded
                asyncio.run(run_scenario(url, engine, max(args.concurrency), 8, args.new_tokens))
            passes = {(e, c): [] for e in servers for c in args.concurrency}
            for round_ in range(args.rounds):
                for c in args.concurrency:
                    for engine, (_, url) in servers.items():
                        result = asyncio.run(run_scenario(url, engine, c, args.requests, args.new_tokens))
                        passes[engine, c].append(result)
                        tok_s = args.requests * args.new_tokens / result["seconds"]
                        print(f"  round {round_}, concurrency {c}, {engine}: {tok_s:.1f} tok/s", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)

    rows = [{"engine": e, **summary(runs, [], "base", c, args.new_tokens)} for (e, c), runs in passes.items()]
    peers = {p: {r["concurrency"]: r["tokens_per_s"] for r in rows if r["engine"] == p} for p in PEERS}
    print(
        f"\nmachine: {machine()}; SmolLM2-135M (F32 weights, or BF16 where named), max batch {args.max_batch}, "
        f"{args.threads} threads; {args.requests} requests x {args.new_tokens} tokens, {args.rounds} rounds\n"
    )

    def ratio(r: dict, peer: str) -> str:
        tok_s = peers[peer].get(r["concurrency"])
        return f"{r['tokens_per_s'] / tok_s:.2f}x" if tok_s else "-"

    print_table(
        [
            "engine",
            "conc",
            "req/s",
            "out tok/s",
            "vs llama.cpp",
            "vs llama.cpp-bf16",
            "TTFT p50/p99 s",
            "e2e p50/p99 s",
        ],
        [
            [
                r["engine"],
                r["concurrency"],
                f"{r['req_per_s']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                ratio(r, "llama.cpp"),
                ratio(r, "llama.cpp-bf16"),
                f"{r['ttft_p50']:.2f}/{r['ttft_p99']:.2f}",
                f"{r['e2e_p50']:.2f}/{r['e2e_p99']:.2f}",
            ]
            for r in rows
        ],
    )
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {"config": config, "greedy_text": texts, "rows": rows})


if __name__ == "__main__":
    main()
