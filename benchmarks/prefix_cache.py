"""The prefix cache: prefill time and serving with it on and off, on prompts that share a prefix or not.

    python benchmarks/prefix_cache.py [--shots 2] [--rounds 5] [--serve-rounds 2] [--requests 32]
                                      [--adapters 0 8] [--kinds few-shot chat distinct]
                                      [--budget-bytes N] [--threads 2]

Prompts (embedded SmolLM2-135M's tokenizer; questions from `../shared/data/addsub_test.json`, a
different one per request):
- few-shot: `--shots` worked examples of `math_10k.json` in the LLM-Adapters template, then the
  question in it (every prompt starts with the same few hundred tokens);
- chat: the question as a user turn through the model's chat template (its default system prompt,
  a few dozen tokens, is the shared part);
- distinct: the bare question (nothing shared past a block; the cache's overhead).
First `LlamaForward.prefill` of 1 and of 16 few-shot prompts, with no prefix cache (every token
computed), with an empty one (blocks the prompts share are computed once), with the examples
cached (a prompt before them stored the blocks) and with them cached for half the prompts (the
others under other adapters' keys: a wave of cached and uncached prompts), round after round, in
one process: milliseconds, medians. Then serving: two `neuroada serve` on loopback, one as shipped and one with
`NEUROADA_PREFIX_CACHE_BYTES=0`, driven in turn (the order alternating by round): 16 closed-loop
clients, `--requests` streamed requests of 32 tokens per pass, on the base and on `--adapters`
adapters (uniform); output tokens/s, time to first token, and the share of prompt tokens served
from the cache (`/metrics`). Writes JSON beside this file. Reads `../shared/data`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bf16_weights import DATA  # noqa: E402
from common import machine, print_table, set_threads, write_json  # noqa: E402
from serve_load import make_store, start_server, summary, timed_stream  # noqa: E402

from neuroada.base_model import load_base_model, load_tokenizer  # noqa: E402
from neuroada.data import build_prompt  # noqa: E402
from neuroada_server.engine import place_for_serving_  # noqa: E402
from neuroada_server.forward.llama import LlamaForward  # noqa: E402
from neuroada_server.forward.prefix_cache import PrefixCache  # noqa: E402

KINDS = ("few-shot", "chat", "distinct")
CACHES = ("on", "off")
CLIENTS, NEW_TOKENS = 16, 32


def prompt_texts(kind: str, shots: int, questions: list[dict], tokenizer) -> list[str]:
    if kind == "few-shot":
        examples = json.loads((DATA / "math_10k.json").read_text())[:shots]
        preamble = "".join(build_prompt(e) + e["output"] + "\n\n" for e in examples)
        return [preamble + build_prompt(q) for q in questions]
    if kind == "chat":
        turn = lambda q: [{"role": "user", "content": q["instruction"]}]  # noqa: E731
        return [tokenizer.apply_chat_template(turn(q), tokenize=False, add_generation_prompt=True) for q in questions]
    return [q["instruction"] for q in questions]


# No prefix cache; an empty one; one holding the examples; the examples held for half the prompts, the
# others each under a key of their own (other adapters) with nothing held for them.
STATES = ("off", "cold", "warm", "half")


def prefill_speed(prompts: list[list[int]], rounds: int) -> list[dict]:
    """Prefill ms of 1 and of 16 prompts: with no prefix cache (every token computed), with an empty
    one (blocks the prompts share computed once), with the examples cached by a prompt before, and
    with them cached for half the prompts (the first (n + 1) // 2; the rest under other keys)."""
    model = load_base_model()
    place_for_serving_(model, torch.device("cpu"))  # as the server lays it out
    times = {(n, state): [] for n in (1, 16) for state in STATES}
    cached = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for n in (1, 16):
                batch = prompts[1 : 1 + n]
                for state in STATES:
                    cache = PrefixCache(budget_bytes=1 << 30) if state != "off" else None
                    forward = LlamaForward(model, prefix_cache=cache)
                    if state in ("warm", "half"):  # another prompt stored the examples' blocks
                        forward.prefill(prompts[:1], [("base",)])
                        forward = LlamaForward(model, prefix_cache=cache)
                    keys = [("base",)] * n
                    if state == "half":
                        keys[(n + 1) // 2 :] = [("adapter", f"task{i:02d}", 1) for i in range(n - (n + 1) // 2)]
                    started = time.perf_counter()
                    _, found, _, _ = forward.prefill(batch, keys)
                    times[n, state].append(time.perf_counter() - started)
                    cached[n, state] = sum(found) / n
    return [
        {"prompts": n, "tokens": sum(len(p) for p in prompts[1 : 1 + n]) / n}
        | {f"ms_{state}": statistics.median(times[n, state]) * 1e3 for state in STATES}
        | {f"cached_tokens_{state}": cached[n, state] for state in STATES}
        for n in (1, 16)
    ]


def cache_counters(url: str) -> tuple[float, float]:
    """(prompt tokens looked up, found) so far."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("neuroada_prefix_cache_queries_total", "neuroada_prefix_cache_hits_total"):
            values[name] = float(value)
    return values.get("neuroada_prefix_cache_queries_total", 0.0), values.get("neuroada_prefix_cache_hits_total", 0.0)


async def serve_pass(url: str, prompts: list[str], names: list[str], seed: int) -> dict:
    """Every prompt once, over CLIENTS closed-loop clients, each with a uniformly chosen adapter."""
    rng = random.Random(seed)
    plan = [(p, rng.choice(names) if names else None) for p in prompts]
    results: list[tuple[float, float]] = []
    queried, hit = cache_counters(url)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def client_loop():
            while plan:
                prompt, adapter = plan.pop()
                body = {"prompt": prompt, "max_new_tokens": NEW_TOKENS, "stream": True, "ignore_eos": True}
                params = {"adapter": adapter} if adapter else None
                results.append(await timed_stream(client, "/generate", body, "text", params))

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(CLIENTS)))
        elapsed = time.perf_counter() - started
    queried_after, hit_after = cache_counters(url)
    return {
        "latencies": results,
        "seconds": elapsed,
        "switches": 0.0,
        "prompt_tokens": queried_after - queried,
        "cached_tokens": hit_after - hit,
    }


def serving(
    texts: dict[str, list[str]],
    warm_up: list[str],
    adapters: list[int],
    requests: int,
    rounds: int,
    threads: int,
    budget: int | None,
) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="neuroada-prefix-") as tmp:
        store = Path(tmp) / "store"
        make_store(store, max(adapters))
        servers = {}
        try:
            budget_env = {} if budget is None else {"NEUROADA_PREFIX_CACHE_BYTES": str(budget)}
            servers["on"] = start_server("neuroada", store, threads, CLIENTS, budget_env)
            servers["off"] = start_server("neuroada", store, threads, CLIENTS, prefix_cache=False)
            names = {n: [f"task{i:02d}" for i in range(n)] for n in adapters}
            for _, url in servers.values():  # warm-up, unrecorded: prompts the passes do not send
                asyncio.run(serve_pass(url, warm_up, names[max(adapters)], seed=0))
            passes = {(c, k, n): [] for c in CACHES for k in texts for n in adapters}
            for round_ in range(rounds):
                order = CACHES if round_ % 2 == 0 else CACHES[::-1]
                for kind, prompts in texts.items():
                    chosen = prompts[round_ * requests : (round_ + 1) * requests]  # new questions each round
                    for n in adapters:
                        for cache in order:
                            one = asyncio.run(serve_pass(servers[cache][1], chosen, names[n], seed=round_))
                            passes[cache, kind, n].append(one)
                            row = summary([one], names[n], "uniform", CLIENTS, NEW_TOKENS)
                            print(
                                f"  round {round_}, {kind}, {n} adapters, cache {cache}: {row['tokens_per_s']:.1f} "
                                f"tok/s, TTFT p50 {row['ttft_p50']:.2f} s",
                                flush=True,
                            )
        finally:
            for proc, _ in servers.values():
                proc.kill()
                proc.wait()
    rows = []
    for (cache, kind, n), runs in passes.items():
        row = summary(runs, names[n], "uniform", CLIENTS, NEW_TOKENS)
        prompt_tokens = sum(r["prompt_tokens"] for r in runs)
        row |= {"cache": cache, "prompts": kind, "cached_share": sum(r["cached_tokens"] for r in runs) / prompt_tokens}
        row["mean_prompt_tokens"] = prompt_tokens / row["requests"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve-rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, nargs="+", default=[0, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="prompt kinds served")
    parser.add_argument("--budget-bytes", type=int, help="the cached server's budget (default: the server's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("prefix_cache.json"))
    args = parser.parse_args()
    set_threads(args.threads)
    tokenizer = load_tokenizer(None)
    questions = json.loads((DATA / "addsub_test.json").read_text())
    needed = args.serve_rounds * args.requests + 8
    if len(questions) < needed:
        sys.exit(
            f"{args.serve_rounds} rounds of {args.requests} requests need {needed} questions; the set has "
            f"{len(questions)}"
        )
    texts = {kind: prompt_texts(kind, args.shots, questions[:needed], tokenizer) for kind in KINDS}

    few_shot = [tokenizer(t, add_special_tokens=False).input_ids for t in texts["few-shot"][:17]]
    speed_rows = prefill_speed(few_shot, args.rounds)
    serving_rows = []
    if args.serve_rounds:
        served = {kind: texts[kind] for kind in args.kinds}
        warm_up = texts["distinct"][-8:]  # questions no pass asks
        serving_rows = serving(
            served, warm_up, args.adapters, args.requests, args.serve_rounds, args.threads, args.budget_bytes
        )

    print(f"\nmachine: {machine()}; SmolLM2-135M fp32; {args.shots}-shot prompts; medians of {args.rounds} rounds\n")
    print_table(
        ["prompts", "tokens each", "ms, no cache", "ms, empty cache", "ms, examples cached", "cached each",
         "ms, cached for half"],
        [
            [r["prompts"], f"{r['tokens']:.0f}", f"{r['ms_off']:.0f}", f"{r['ms_cold']:.0f}",
             f"{r['ms_warm']:.0f}", f"{r['cached_tokens_warm']:.0f}", f"{r['ms_half']:.0f}"]
            for r in speed_rows
        ],
    )  # fmt: skip
    if serving_rows:
        print(
            f"\nserving: {CLIENTS} clients, {args.serve_rounds} rounds of {args.requests} requests x "
            f"{NEW_TOKENS} tokens\n"
        )
        print_table(
            ["prompts", "adapters", "cache", "prompt tokens", "cached", "out tok/s", "TTFT p50/p99 s"],
            [
                [r["prompts"], r["adapters"] or "base", r["cache"], f"{r['mean_prompt_tokens']:.0f}",
                 f"{r['cached_share']:.0%}", f"{r['tokens_per_s']:.1f}", f"{r['ttft_p50']:.2f}/{r['ttft_p99']:.2f}"]
                for r in serving_rows
            ],
        )  # fmt: skip
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    write_json(args.out, {"config": config, "prefill": speed_rows, "serving": serving_rows})


if __name__ == "__main__":
    main()
