#!/usr/bin/env bash
# Issues 15 and 19 in one device call: everything a lent GPU should run, prepared here first.
#
#   bash benchmarks/gpu_session.sh prepare   # here, on the CPU: wheels and model files into ignored folders
#   bash benchmarks/gpu_session.sh run       # there: the device tool's command, carry [".whl", ".gpu"]
#   bash benchmarks/gpu_session.sh setup server   # there: some steps alone (setup first)
#
# The GPU machine (benchmarks/RESULTS.md, DEVELOPERS.md) has Python 3.12 with its own CUDA torch,
# transformers, triton and httpx, and no network: the server's other packages travel as wheels
# (`prepare` downloads them for cp312, without their dependencies: the ones listed are what that
# image lacks). Nor can the embedded model travel (a 98 MB GGUF; 64 MiB a call), so the server
# checks run on a model of its shape and tokenizer with random weights (`random_model.py`), made
# there from the 3.4 MB of config and tokenizer files `prepare` copies. `run` writes every result
# under $OUT (it comes back) and goes on past a failed step; the steps' timeouts fit one device call.
set -u
cd "$(dirname "$0")/.."
WHEELS="fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic-core==2.50.5
pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5
xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 jsonschema==4.26.0 referencing==0.37.0
jsonschema-specifications==2025.9.1 rpds-py==2026.9.1 opentelemetry-api==1.45.2"

prepare() {
    grep -qxs '/.whl/' .git/info/exclude || echo '/.whl/' >>.git/info/exclude
    grep -qxs '/.gpu/' .git/info/exclude || echo '/.gpu/' >>.git/info/exclude
    rm -rf .whl && mkdir -p .whl .gpu/smollm2
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS || exit 1
    folder=$(python3 -c "from neuroada.base_model import load_tokenizer; print(load_tokenizer().name_or_path)")
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        [ -e "$folder/$f" ] && cp "$folder/$f" .gpu/smollm2/
    done
    du -sh .whl .gpu
}

setup() {
    : "${OUT:?the device tool sets OUT}"
    export PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        exit 1
    export PYTHONPATH=/tmp/site:$PWD
    # The `serve` command is an entry point: the package's metadata must be installed (no dependencies pulled).
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -3
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, \
triton.__version__, transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
}

suite() {
    # perf_hints: inductor says so where it skips CUDA graphs (a compiled step would then pay launches).
    TORCH_LOGS=perf_hints timeout 300 python3 benchmarks/gpu_suite.py --out "$OUT/gpu_suite.json" 2>&1 |
        tee "$OUT/gpu_suite.log"
}

server() {
    # Each serve_check leaves the server's own output beside its JSON (NAME.server.log). Both adapters
    # have k = 4 (magnitude selection: one index set), so the compiled server's mixed steps replay
    # the one mixed graph it traces at start.
    python3 benchmarks/random_model.py /tmp/smollm2-random --like .gpu/smollm2 --k 4 2>&1 | tail -1
    timeout 90 python3 benchmarks/serve_check.py --device cuda --model /tmp/smollm2-random \
        --adapters /tmp/smollm2-random/adapters/*.safetensors --out "$OUT/serve_check.json" 2>&1
    # Last, as the one most likely cut off: the server with its decode step compiled (CUDA graphs),
    # buckets 4 and 16 (the most rows), merged and mixed: four compilations at start.
    timeout 280 python3 benchmarks/serve_check.py --device cuda --model /tmp/smollm2-random --compile-decode 4 \
        --adapters /tmp/smollm2-random/adapters/*.safetensors --out "$OUT/serve_check_compiled.json" 2>&1
}

run() {
    setup
    suite
    server
}

[ $# -gt 0 ] || { echo "usage: $0 prepare | run | STEP... (setup suite server)" >&2; exit 2; }
for step in "$@"; do "$step"; done

