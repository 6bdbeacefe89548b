#!/usr/bin/env bash
# One prepared GPU session: the GPU tests and both GPU benchmarks, in one call.
#
# Here (a machine with network), once per checkout: fetch the wheels the GPU image lacks
#     bench/gpu_session.sh fetch           # faiss-cpu for Python 3.12 into .whl/ (ignored)
# There (the GPU machine, no network), from the repository root, carrying .whl:
#     bash bench/gpu_session.sh run         # logs and JSON under $OUT (or out/ without it)
#
# `run` stops each step at its own time limit so the whole call ends inside ~9 minutes:
#   1. bench/ivf_gpu.py      10M items, nlist 4096, nprobe 32, k 1024, B 16 vs faiss-cpu
#   2. tests/test_gpu.py     every Pallas kernel compiled for real == its XLA twin
#   3. bench/kernel_gpu.py   flat Int8 top-k kernel vs twin at 10M items
# and copies bench/results/*gpu*.json / kernel_*.json to $OUT for committing.
set -uo pipefail
cd "$(dirname "$0")/.."
FAISS=faiss-cpu==1.15.1

case "${1:-}" in
fetch)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$FAISS"
    ls -la .whl
    ;;
run)
    out="${OUT:-out}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
    timeout 330 python3 bench/ivf_gpu.py 2>&1 | grep -v "k-means C=" | tee "$out/ivf_gpu.log"
    timeout 120 python3 -m pytest -q -x tests/test_gpu.py 2>&1 | tee "$out/test_gpu.log"
    timeout 90 python3 bench/kernel_gpu.py 2>&1 | tee "$out/kernel_gpu.log"
    cp bench/results/ivf_gpu_*.json bench/results/kernel_*.json "$out"/ 2>/dev/null
    ls -la "$out"
    ;;
*)
    echo "usage: $0 fetch|run" >&2
    exit 2
    ;;
esac
