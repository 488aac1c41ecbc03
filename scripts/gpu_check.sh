#!/usr/bin/env bash
# The one command to run on a lent GPU machine, from the repository root (see docs/gpu.md):
#     bash scripts/gpu_check.sh            # with .whl/ carried (scripts/fetch_gpu_wheels.sh)
# Installs the carried wheels, puts them and this checkout on PYTHONPATH, shows the GPU, then runs
# scripts/gpu_check.py (arguments are passed on), teeing its output to $OUT/gpu_check.log.
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

nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,temperature.gpu,clocks.sm \
    --format=csv || echo "nvidia-smi failed or is missing"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    python3 scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
    python3 scripts/gpu_check.py "$@"
fi
