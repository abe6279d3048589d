"""Serving against llama.cpp's `llama-server`, same weights, one client, interleaved: the base model,
and many adapters (ours sparse, llama.cpp's LoRA chosen per request).

    python benchmarks/vs_llama_cpp.py --llama-server PATH [--engines ...] [--adapters 0 8 32]
                                      [--concurrency 4 16] [--requests 48] [--rounds 2]

Starts `neuroada serve` (embedded SmolLM2-135M, fp32) with our decoder (`--runner auto`) and with
Hugging Face's forward (`--runner hf`), and `llama-server` on the same weights dequantised to an
F32 GGUF (`benchmarks/peers/llama_cpp.py`), all with the same threads and batch size. Two more
engines pair up on bf16 weights: ours with `--weight-dtype bfloat16` (float32 activations) and
`llama-server` on a BF16 GGUF of the same rounded weights (norms F32).

`--adapters N` (0: the base model) gives each request one of N adapters, uniformly: ours from a
store of N random k = 1 NeuroAda adapters (`serve_load.make_store`), llama.cpp's from N PEFT LoRA
r = 8 adapters on the same seven projections, converted by the llama.cpp tree's own
`convert_lora_to_gguf.py` (next to the binary's build folder, or `--lora-converter`), all loaded at
start with their global scales set to 0, each request naming every adapter's scale (1.0 for its
own: `lora_field`). A server with adapters loaded serves the base rows too (llama.cpp's with
explicit zero scales).

Each scenario (c closed-loop clients, `--requests` streamed requests of the same prompt,
`--new-tokens` tokens each with ignore_eos, greedy) runs on each engine in turn, round after round,
so that a machine whose speed drifts moves every engine alike. Both engines' prompt caches are off
(ours: `NEUROADA_PREFIX_CACHE_BYTES=0`; llama.cpp's: `cache_prompt: false`), every prefill computed;
`--prompt-cache` turns both on (the same prompt every time: a cache's best case). Before the load,
one greedy completion per engine shows whether they generate the same text from the same weights.
Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path

import httpx
from common import machine, print_table, write_json
from peers import llama_cpp
from serve_load import PROMPT, free_port, make_store, one_request, start_server, summary, timed_stream

ENGINES = ("neuroada", "neuroada-hf", "llama.cpp", "neuroada-bf16w", "llama.cpp-bf16")
PEERS = {"llama.cpp": "f32", "llama.cpp-bf16": "bf16"}  # llama-server engines: their GGUF's weights
OURS_ENV = {
    "neuroada": {"NEUROADA_RUNNER": "auto"},
    "neuroada-hf": {"NEUROADA_RUNNER": "hf"},
    "neuroada-bf16w": {"NEUROADA_RUNNER": "auto", "NEUROADA_WEIGHT_DTYPE": "bfloat16"},
}


async def llama_cpp_request(
    client: httpx.AsyncClient, adapter: int | None, loaded: int, new_tokens: int, cache_prompt: bool
) -> tuple[float, float]:
    body = {"prompt": PROMPT, "n_predict": new_tokens, "stream": True, "ignore_eos": True}
    body |= {"temperature": 0, "cache_prompt": cache_prompt}
    if loaded:
        body["lora"] = llama_cpp.lora_field(loaded, adapter)
    return await timed_stream(client, "/completion", body, "content")


async def run_scenario(
    url: str,
    engine: str,
    concurrency: int,
    requests: int,
    new_tokens: int,
    adapters: int,
    loaded: int,
    seed: int,
    prompt_cache: bool = False,
) -> dict:
    """One pass: `requests` requests, each for one of `adapters` adapters (uniform; 0: the base)."""
    rng = random.Random(seed)
    plan = [rng.randrange(adapters) if adapters else None for _ in range(requests)]
    results: list[tuple[float, float]] = []
    # A connection per request: llama-server may close a kept-alive connection just as the next
    # request goes out on it ("server disconnected"); every engine is driven the same way.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def client_loop():
            while plan:
                chosen = plan.pop()
                if engine in PEERS:
                    results.append(await llama_cpp_request(client, chosen, loaded, new_tokens, prompt_cache))
                else:
                    name = f"task{chosen:02d}" if chosen is not None else None  # make_store's names
                    results.append(await one_request(client, name, new_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"latencies": results, "seconds": elapsed, "switches": 0.0}


def greedy_text(url: str, engine: str, loaded: int, adapter: int | None = None, tokens: int = 24) -> str:
    if engine in PEERS:
        body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0, "cache_prompt": False}
        if loaded:
            body["lora"] = llama_cpp.lora_field(loaded, adapter)
        return httpx.post(f"{url}/completion", json=body, timeout=120).json()["content"]
    body = {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0}
    params = {"adapter": f"task{adapter:02d}"} if adapter is not None else {}
    return httpx.post(f"{url}/generate", params=params, json=body, timeout=120).json()["text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", type=Path, required=True, help="the llama-server binary")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES[:3]), choices=ENGINES)
    parser.add_argument("--adapters", type=int, nargs="+", default=[0], help="adapters per scenario (0: base)")
    parser.add_argument(
        "--lora-converter", type=Path, help="convert_lora_to_gguf.py (default: the llama.cpp tree's, beside build/)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--prompt-cache",
        action="store_true",
        help="both engines' prompt caches on (ours: the prefix cache; llama.cpp: cache_prompt); default: both off",
    )
    parser.add_argument(
        "--peer-log", type=Path, default=Path(tempfile.gettempdir()) / "llama-server.log", help="llama-server's output"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("vs_llama_cpp.json"))
    args = parser.parse_args()
    loaded = max(args.adapters)

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "adapters"
        store.mkdir()
        loras = []
        if loaded:
            make_store(store, loaded)
            if any(e in PEERS for e in args.engines):
                converter = args.lora_converter or args.llama_server.resolve().parents[2] / "convert_lora_to_gguf.py"
                (Path(tmp) / "lora").mkdir()
                loras = llama_cpp.lora_ggufs(Path(tmp) / "lora", loaded, converter)
        servers = {}
        try:
            for engine in args.engines:
                if engine in PEERS:
                    weights = PEERS[engine]
                    gguf = llama_cpp.dequantized_gguf(Path(tmp) / f"model-{weights}.gguf", weights)
                    port = free_port()
                    context = 512  # per slot: prompt + output fit many times over
                    proc = llama_cpp.start(
                        args.llama_server, gguf, port, args.max_batch, args.threads, context, args.peer_log, loras
                    )
                    servers[engine] = (proc, f"http://127.0.0.1:{port}")
                else:
                    servers[engine] = start_server(
                        "neuroada",
                        store,
                        args.threads,
                        args.max_batch,
                        OURS_ENV[engine],
                        prefix_cache=args.prompt_cache,
                    )
            texts = {engine: greedy_text(url, engine, len(loras)) for engine, (_, url) in servers.items()}
            if loaded:  # with the first adapter, for the record (whether it moves the text off the base's)
                texts |= {f"{e}, adapter 0": greedy_text(url, e, len(loras), 0) for e, (_, url) in servers.items()}
            for engine, text in texts.items():
                print(f"  greedy, {engine}: {text!r}", flush=True)
            for engine, (_, url) in servers.items():  # warm-up, not recorded: the base, then every adapter path
                for n in sorted({0, loaded}):
                    asyncio.run(run_scenario(url, engine, max(args.concurrency), 8, args.new_tokens, n, len(loras), 0))
            passes = {(e, n, c): [] for e in servers for n in args.adapters for c in args.concurrency}
            for round_ in range(args.rounds):
                for c in args.concurrency:
                    for n in args.adapters:
                        for engine, (_, url) in servers.items():
                            result = asyncio.run(
                                run_scenario(
                                    url, engine, c, args.requests, args.new_tokens, n, len(loras), round_,
                                    args.prompt_cache,
                                )
                            )  # fmt: skip
                            passes[engine, n, c].append(result)
                            tok_s = args.requests * args.new_tokens / result["seconds"]
                            print(f"  round {round_}, concurrency {c}, {n} adapters, {engine}: {tok_s:.1f} tok/s")
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)

    rows = [
        {"engine": e, **summary(runs, [f"task{i:02d}" for i in range(n)], "uniform", c, args.new_tokens)}
        for (e, n, c), runs in passes.items()
    ]
    tok_s = {(r["engine"], r["adapters"], r["concurrency"]): r["tokens_per_s"] for r in rows}
    print(
        f"\nmachine: {machine()}; SmolLM2-135M (F32 weights, or BF16 where named), max batch {args.max_batch}, "
        f"{args.threads} threads; {args.requests} requests x {args.new_tokens} tokens, {args.rounds} rounds; "
        f"adapters: ours NeuroAda k = 1, llama.cpp LoRA r = 8\n"
    )

    def ratio(r: dict, engine: str, adapters: int | None = None) -> str:
        other = tok_s.get((engine, r["adapters"] if adapters is None else adapters, r["concurrency"]))
        return f"{r['tokens_per_s'] / other:.2f}x" if other else "-"

    print_table(
        [
            "engine",
            "adapters",
            "conc",
            "out tok/s",
            "vs own base",
            "vs llama.cpp",
            "vs llama.cpp-bf16",
            "TTFT p50/p99 s",
            "e2e p50/p99 s",
        ],
        [
            [
                r["engine"],
                r["adapters"] or "base",
                r["concurrency"],
                f"{r['tokens_per_s']:.1f}",
                ratio(r, r["engine"], 0),
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
