#!/usr/bin/env bash
# The one command to run on a lent GPU machine, from the repository root (see docs/gpu.md):
#     bash scripts/gpu_check.sh            # with .whl/ carried (scripts/fetch_gpu_wheels.sh)
# Installs the carried wheels, puts them and this checkout on PYTHONPATH, shows the GPU, then runs
# scripts/gpu_check.py (arguments are passed on), teeing its output to $OUT/gpu_check.log, and
# the extras below (skip them with XPCNN_GPU_EXTRAS=0): the CPU benchmarks on two pinned cores of
# this quiet machine, and the 2-rank MPI run sharing the GPU (scripts/mpi_gpu_check.sh).
set -uo pipefail
cd "$(dirname "$0")/.."

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
else
    echo "warning: no .whl/*.whl here; run scripts/fetch_gpu_wheels.sh and carry .whl" >&2
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX shares the GPU with CuPy and torch

nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,temperature.gpu,clocks.sm \
    --format=csv || echo "nvidia-smi failed or is missing"

OUT_DIR="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT_DIR"
python3 scripts/gpu_check.py "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
status=${PIPESTATUS[0]}

if [ "${XPCNN_GPU_EXTRAS:-1}" = 1 ]; then
    echo; echo "== CPU benchmarks on two pinned cores (taskset -c 2,3) =="
    ( cd benchmarks && timeout 60 taskset -c 2,3 python3 train_epoch.py --threads 2 --epochs 3 \
        --dataset mnist-5k \
        --contenders cpu/dilation,cpu/dilation+workers,cpu/col2im,jax:cpu/dilation+compile,jax:cpu/col2im+compile \
        --json "$OUT_DIR/cpu_train_epoch.json" ) 2>&1 | tee "$OUT_DIR/cpu_benchmarks.log"
    ( cd benchmarks && timeout 30 taskset -c 2,3 python3 inference.py --threads 2 --rounds 3 ) \
        2>&1 | tee -a "$OUT_DIR/cpu_benchmarks.log"
    if [ -f scripts/mpi_gpu_check.sh ]; then
        echo; echo "== MPI: two ranks sharing the GPU =="
        timeout 90 bash scripts/mpi_gpu_check.sh || echo "mpi_gpu_check.sh failed or timed out"
    fi
fi
exit "$status"
