"""Long schema fuzzing run: schemathesis against `neuroada serve` (embedded model) on loopback.

    python benchmarks/fuzz.py [--max-examples 200] [--workers 2]

Starts the server with a temporary copy of the shipped adapters (generation capped at 8 new
tokens so each generated request is cheap), runs `schemathesis run` over every operation of the
server's OpenAPI schema with the response checks (no 5xx; status code, content type, headers and
body as the schema declares), then checks the base weights (`/health?deep=1`) and that the
adapters on disk are the adapters served. Exit status 0 only if all of that holds.
`tests/neuroada_server/test_fuzz.py` is the short version of this run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import start_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        for f in (ROOT / "adapters").glob("*.safetensors"):
            shutil.copy(f, store / f.name)
        os.environ["NEUROADA_MAX_NEW_TOKENS"] = "8"  # read by the server start_server spawns
        server, url = start_server("neuroada", store, args.threads, max_batch=16)
        try:
            started = time.monotonic()
            fuzz = subprocess.run(
                [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", CHECKS]
                + ["--max-examples", str(args.max_examples), "--workers", str(args.workers), "--seed", str(args.seed)]
                + ["--suppress-health-check", "all"],
            )
            elapsed = time.monotonic() - started
            health = httpx.get(f"{url}/health", params={"deep": 1}, timeout=120).json()
            served = {a["name"] for a in httpx.get(f"{url}/adapters", timeout=30).json()["adapters"]}
            on_disk = {p.stem for p in store.glob("*.safetensors")}
        finally:
            server.terminate()
            server.wait(timeout=60)

    print(f"\nfuzzing: {elapsed:.0f} s, schemathesis exit status {fuzz.returncode} (0: no failing check)")
    print(f"base weights intact: {'yes' if health.get('base_weights_intact') else 'no'}")
    print(f"adapters on disk == adapters served: {'yes' if served == on_disk else 'no'} ({len(served)} served)")
    return 0 if fuzz.returncode == 0 and health.get("base_weights_intact") and served == on_disk else 1


if __name__ == "__main__":
    sys.exit(main())
