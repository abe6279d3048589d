"""The server end to end on one device: what issue 19 asks of a lent GPU, in one command that runs anywhere.

    python benchmarks/serve_check.py [--device cuda] [--dtype auto] [--out benchmarks/serve_check.json]
                                     [--model PATH --adapters A.safetensors ...] [--compile-decode 1,4,16]

Starts `neuroada serve` (default: the embedded model and the shipped adapters, copied into a
temporary store) on a loopback port and checks, one row each:
- generate with every adapter and without one, each request alone (200 and a text);
- every (adapter, prompt) pair sent at once, a mixed batch, against the pair served alone: equal
  text is required on the CPU in float32, where a row's arithmetic does not depend on its batch;
  elsewhere (a GPU's GEMMs pick kernels by batch size; bf16 rounds merged and unmerged deltas
  differently) the equal count and the shared leading characters are reported;
- the mixed path ran (`/metrics`);
- an upload (a copy of the first adapter under a new name: 201) served at once with the
  original's text, then a delete (a later request for it: 404);
- the base weights bit-identical after all of it (`/health?deep=1`);
- with `--compile-decode SIZES` (the server's compiled decode step, those batch-size buckets):
  compiled steps ran and none failed.
And, reported, not checked: a burst of 16 requests at once (`ignore_eos`), on the base and then
spread over the base and every adapter (mixed steps), in tokens per second, to set compiled
decoding beside eager and mixed steps beside merged ones.
Prints the table, writes JSON, and exits 1 if a required check fails. Loopback only, bounded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import machine, print_table, write_json
from serve_load import start_server

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "### Instruction:\nTom has 3 apples and buys 5 more. How many apples does he have?\n\n### Response:\n",
    "### Instruction:\nIs the sky blue? Answer true or false.\n\n### Response:\n",
    "### Instruction:\nName a colour.\n\n### Response:\n",
]
UPLOADED = "uploaded-copy"


def generate(client: httpx.Client, adapter: str | None, prompt: str, new_tokens: int) -> str | None:
    """The greedy text, or None for any status but 200."""
    params = {"adapter": adapter} if adapter else {}
    r = client.post("/generate", params=params, json={"prompt": prompt, "max_new_tokens": new_tokens})
    return r.json()["text"] if r.status_code == 200 else None


def metric(client: httpx.Client, sample: str) -> float:
    """A sample of /metrics, with its labels (`name{path="mixed"}`); 0 where it is not there."""
    lines = [x for x in client.get("/metrics").text.splitlines() if x.rpartition(" ")[0] == sample]
    return float(lines[0].split()[-1]) if lines else 0.0


def burst(client: httpx.Client, requests: int, new_tokens: int, adapters: tuple[str | None, ...]) -> tuple[int, float]:
    """`requests` requests at once, each exactly `new_tokens` long, request i on adapters[i % len]
    (None: the base): (tokens, seconds)."""

    def one(i: int) -> int:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": new_tokens, "ignore_eos": True}
        adapter = adapters[i % len(adapters)]
        r = client.post("/generate", params={"adapter": adapter} if adapter else {}, json=body)
        return r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0

    started = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        tokens = sum(pool.map(one, range(requests)))
    return tokens, time.perf_counter() - started


def shared_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_checks(client: httpx.Client, adapters: list[Path], new_tokens: int) -> list[dict]:
    checks = []

    def check(name: str, ok: bool, detail: str, required: bool = True) -> None:
        checks.append({"check": name, "ok": ok, "required": required, "detail": detail})
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)

    health = client.get("/health").json()
    exact = health["device"] == "cpu" and health["dtype"] == "float32"
    pairs = [(a, p) for a in [None, *(f.stem for f in adapters)] for p in PROMPTS]
    alone = {pair: generate(client, *pair, new_tokens) for pair in pairs}
    answered = sum(text is not None for text in alone.values())
    check("generate alone", answered == len(pairs), f"{answered}/{len(pairs)} answered")

    before = metric(client, 'neuroada_steps_total{path="mixed"}')
    with ThreadPoolExecutor(len(pairs)) as pool:  # all at once: the server batches them together
        together = dict(zip(pairs, pool.map(lambda pair: generate(client, *pair, new_tokens), pairs)))
    equal = sum(together[p] == alone[p] for p in pairs)
    shared = sum(shared_prefix(together[p] or "", alone[p] or "") for p in pairs) / len(pairs)
    length = sum(len(alone[p] or "") for p in pairs) / len(pairs)
    detail = f"{equal}/{len(pairs)} equal; {shared:.1f} of {length:.1f} leading characters shared"
    check("mixed batch equals alone", equal == len(pairs) or not exact, detail, required=exact)
    ran = metric(client, 'neuroada_steps_total{path="mixed"}') - before
    check("mixed path ran", ran > 0, f"{ran:.0f} mixed steps")

    first = adapters[0]
    put = client.put(f"/adapters/{UPLOADED}", content=first.read_bytes())
    copy = generate(client, UPLOADED, PROMPTS[0], new_tokens)
    ok = put.status_code == 201 and copy is not None and copy == alone[first.stem, PROMPTS[0]]
    check("upload, then serve", ok, f"PUT {put.status_code}, the text {'equal to' if ok else 'unlike'} the original's")
    gone = client.delete(f"/adapters/{UPLOADED}")
    after = client.post("/generate", params={"adapter": UPLOADED}, json={"prompt": PROMPTS[0], "max_new_tokens": 1})
    check(
        "delete",
        gone.status_code in (200, 204) and after.status_code == 404,
        f"{gone.status_code}, then {after.status_code}",
    )

    intact = client.get("/health", params={"deep": 1}).json().get("base_weights_intact")
    check("base weights bit-identical", intact is True, f"base_weights_intact={intact}")

    for name, rows in (("base", (None,)), ("mixed", (None, *(f.stem for f in adapters)))):
        tokens, seconds = burst(client, 16, 4 * new_tokens, rows)  # mixed: every step's rows on several adapters
        detail = f"{tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tok/s"
        check(f"{name} burst (reported)", tokens > 0, detail, False)
    if compiled := client.get("/health").json().get("compiled_decode"):
        merged, mixed = (
            metric(client, f'neuroada_compiled_decode_steps_total{{path="{p}"}}') for p in ("merged", "mixed")
        )
        detail = (
            f"{merged:.0f} merged and {mixed:.0f} mixed steps compiled; buckets {compiled['batch_sizes']}, mixed "
            f"shapes {compiled['mixed_shapes']}, in {compiled['compile_seconds']} s"
        )
        check(
            "compiled decode ran", merged > 0 and compiled["broken"] is None, detail + f"; broken: {compiled['broken']}"
        )
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", default=None, help="a local Hugging Face folder (default: the embedded model)")
    parser.add_argument("--adapters", type=Path, nargs="+", default=sorted((ROOT / "adapters").glob("*.safetensors")))
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("serve_check.json"))
    parser.add_argument(
        "--compile-decode", metavar="SIZES", help="serve with the decode step compiled for these buckets (else eager)"
    )
    args = parser.parse_args()

    env = {"NEUROADA_DEVICE": args.device, "NEUROADA_DTYPE": args.dtype}
    if args.model:
        env["NEUROADA_MODEL"] = args.model
    env["NEUROADA_COMPILE_DECODE"] = (
        "1" if args.compile_decode else "0"
    )  # eager unless asked: on a GPU the default compiles
    if args.compile_decode:
        env["NEUROADA_COMPILE_BATCH_SIZES"] = args.compile_decode
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        for f in args.adapters:
            shutil.copy(f, store / f.name)
        log = args.out.with_suffix(".server.log")  # beside the results: it travels back from a lent GPU
        proc, url = start_server("neuroada", store, args.threads, 16, env, ready_timeout=900, log=log)
        try:
            with httpx.Client(base_url=url, timeout=600) as client:
                health = client.get("/health").json()
                print(f"server on {health['device']}, {health['dtype']}: {url}", flush=True)
                checks = run_checks(client, [store / f.name for f in args.adapters], args.new_tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\nmachine: {machine()}\n")
    print_table(
        ["check", "ok", "required", "detail"],
        [[c["check"], c["ok"], c["required"], c["detail"]] for c in checks],
    )
    config = vars(args) | {"adapters": [str(f) for f in args.adapters], "out": str(args.out)}
    write_json(args.out, {"config": config, "health": health, "checks": checks})
    if not all(c["ok"] for c in checks if c["required"]):
        sys.exit("a required check failed")


if __name__ == "__main__":
    main()
