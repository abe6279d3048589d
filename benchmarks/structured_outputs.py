"""Structured outputs against llama.cpp's `llama-server`: chat completions held to a JSON schema,
and the same requests free, on the same F32 weights, one client, interleaved.

    python benchmarks/structured_outputs.py [--llama-server PATH] [--concurrency 1 4 16]
                                            [--requests 32] [--rounds 2]

Each request asks the embedded SmolLM2-135M-Instruct to describe a person as a JSON record
(`PROMPTS`), greedy, up to `--max-tokens` tokens; with `response_format` json_schema (`SCHEMA`) the
text must follow the schema (ours: xgrammar; llama.cpp: its JSON-schema-to-GBNF grammar), free
without. Both prompt caches are off (ours: `NEUROADA_PREFIX_CACHE_BYTES=0`, llama.cpp's:
`cache_prompt: false`): the prompts share their chat template's opening. Each concurrency runs on
freshly started servers, the engines' passes interleaved round by round. Per engine, mode and
concurrency: output tokens/s (from each response's usage), end-to-end latency, and how many texts
parse as JSON that the schema validates (`jsonschema`). Without `--llama-server`, ours alone.
Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
from common import machine, print_table, write_json
from peers import llama_cpp
from serve_load import free_port, start_server

from neuroada.base_model import EMBEDDED_MODEL

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 32},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PEOPLE = [
    ("Alice Martin", 31, "Paris", "chess and tea"),
    ("Bob Okafor", 45, "Lagos", "cycling"),
    ("Chen Wei", 27, "Shanghai", "painting, hiking and jazz"),
    ("Dana Levi", 62, "Haifa", "gardening"),
    ("Erik Berg", 19, "Oslo", "skiing and video games"),
    ("Fatima Zahra", 38, "Rabat", "poetry and running"),
    ("Gustavo Lima", 54, "Recife", "fishing"),
    ("Hana Sato", 23, "Kyoto", "photography and origami"),
]
PROMPTS = [
    f"{name} is {age} years old, lives in {city} and enjoys {hobbies}. "
    "Give this person's record as JSON with the keys name, age, city and hobbies."
    for name, age, city, hobbies in PEOPLE
]
MODES = ("json_schema", "free")
ENGINES = ("neuroada", "llama.cpp")


def body(prompt: str, mode: str, max_tokens: int, engine: str) -> dict:
    request = {"model": EMBEDDED_MODEL, "messages": [{"role": "user", "content": prompt}]}
    request |= {"max_tokens": max_tokens, "temperature": 0}
    if mode == "json_schema":
        request["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    if engine == "llama.cpp":
        request["cache_prompt"] = False
    return request


def follows_schema(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


async def run_pass(url: str, engine: str, mode: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """`requests` chat completions (the prompts in turn) from `concurrency` closed-loop clients."""
    todo = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    done: list[dict] = []
    # A connection per request: llama-server may close a kept-alive connection as the next request goes out.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def client_loop():
            while todo:
                started = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body(todo.pop(), mode, max_tokens, engine))
                r.raise_for_status()
                answer = r.json()
                done.append(
                    {
                        "seconds": time.perf_counter() - started,
                        "tokens": answer["usage"]["completion_tokens"],
                        "text": answer["choices"][0]["message"]["content"],
                        "finish_reason": answer["choices"][0]["finish_reason"],
                    }
                )

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return {"seconds": time.perf_counter() - started, "requests": done}


def summary(passes: list[dict]) -> dict:
    done = [r for p in passes for r in p["requests"]]
    seconds = sum(p["seconds"] for p in passes)
    e2e = sorted(r["seconds"] for r in done)
    return {
        "requests": len(done),
        "req_per_s": len(done) / seconds,
        "tokens_per_s": sum(r["tokens"] for r in done) / seconds,
        "pass_tokens_per_s": [sum(r["tokens"] for r in p["requests"]) / p["seconds"] for p in passes],
        "mean_tokens": statistics.mean(r["tokens"] for r in done),
        "e2e_p50": statistics.median(e2e),
        "e2e_p99": e2e[min(len(e2e) - 1, int(0.99 * len(e2e)))],
        "valid": sum(follows_schema(r["text"]) for r in done),
        "stopped": sum(r["finish_reason"] == "stop" for r in done),
        "example": done[0]["text"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", type=Path, help="the llama-server binary (default: ours alone)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--peer-log", type=Path, default=Path(tempfile.gettempdir()) / "llama-server.log", help="llama-server's output"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("structured_outputs.json"))
    args = parser.parse_args()

    passes = {(e, m, c): [] for e in ENGINES[: 1 + bool(args.llama_server)] for m in MODES for c in args.concurrency}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "adapters"
        store.mkdir()
        gguf = llama_cpp.dequantized_gguf(Path(tmp) / "model-f32.gguf", "f32") if args.llama_server else None
        for c in args.concurrency:
            # Fresh servers per concurrency: llama-server serves 4 clients of these requests markedly
            # slower after a pass of 16 clients than from a fresh start (benchmarks/RESULTS.md).
            servers = {}
            try:
                servers["neuroada"] = start_server("neuroada", store, args.threads, args.max_batch, prefix_cache=False)
                if gguf is not None:
                    port = free_port()
                    context = 512  # per slot, as vs_llama_cpp.py: a prompt and its output fit three times over
                    proc = llama_cpp.start(
                        args.llama_server, gguf, port, args.max_batch, args.threads, context, args.peer_log
                    )
                    servers["llama.cpp"] = (proc, f"http://127.0.0.1:{port}")
                for engine, (_, url) in servers.items():  # warm-up, not recorded
                    for mode in MODES:
                        asyncio.run(run_pass(url, engine, mode, c, 8, args.max_tokens))
                for round_ in range(args.rounds):
                    for mode in MODES:
                        for engine, (_, url) in servers.items():
                            result = asyncio.run(run_pass(url, engine, mode, c, args.requests, args.max_tokens))
                            passes[engine, mode, c].append(result)
                            tokens = sum(r["tokens"] for r in result["requests"])
                            valid = sum(follows_schema(r["text"]) for r in result["requests"])
                            print(
                                f"  concurrency {c}, round {round_}, {mode}, {engine}: "
                                f"{tokens / result['seconds']:.1f} tok/s, {valid}/{args.requests} valid",
                                flush=True,
                            )
            finally:
                for proc, _ in servers.values():
                    proc.terminate()
                    proc.wait(timeout=60)

    rows = [{"engine": e, "mode": m, "concurrency": c, **summary(runs)} for (e, m, c), runs in passes.items()]
    by_key = {(r["engine"], r["mode"], r["concurrency"]): r for r in rows}
    print(
        f"\nmachine: {machine()}; SmolLM2-135M-Instruct (F32 weights), max batch {args.max_batch}, "
        f"{args.threads} threads; {args.requests} chat completions, greedy, up to {args.max_tokens} tokens, "
        f"{args.rounds} rounds\n"
    )

    def ratio(r: dict, engine: str, mode: str, key: str) -> str:
        other = by_key.get((engine, mode, r["concurrency"]))
        return f"{r[key] / other[key]:.2f}x" if other else "-"

    # Tokens/s against the same engine's free requests (the constraint's cost a token); requests/s
    # against llama.cpp's (the engines write JSON with different whitespace: their token counts differ).
    print_table(
        [
            "engine",
            "mode",
            "conc",
            "out tok/s",
            "tok/s vs free",
            "req/s",
            "req/s vs llama.cpp",
            "tokens/req",
            "e2e p50/p99 s",
            "valid",
        ],
        [
            [
                r["engine"],
                r["mode"],
                r["concurrency"],
                f"{r['tokens_per_s']:.1f}",
                ratio(r, r["engine"], "free", "tokens_per_s"),
                f"{r['req_per_s']:.2f}",
                ratio(r, "llama.cpp", r["mode"], "req_per_s"),
                f"{r['mean_tokens']:.1f}",
                f"{r['e2e_p50']:.2f}/{r['e2e_p99']:.2f}",
                f"{r['valid']}/{r['requests']}",
            ]
            for r in rows
        ],
    )
    for r in rows:
        if r["concurrency"] == args.concurrency[0]:
            print(f"  {r['engine']}, {r['mode']}: {r['example']!r}")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {"config": config, "schema": SCHEMA, "rows": rows})


if __name__ == "__main__":
    main()
