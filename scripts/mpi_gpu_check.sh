#!/usr/bin/env bash
# On a lent GPU machine, from the repository root: does a 2-rank MPI run sharing the one GPU
# train correctly? Carry .whl (scripts/fetch_gpu_wheels.sh, scripts/fetch_mpi_wheels.sh), then
#     bash scripts/mpi_gpu_check.sh
# Reports what it finds (GPU, Python, mpi4py, the MPI library and its mpiexec, CUDA-awareness),
# falls back to the carried mpi4py + Open MPI wheels in a venv when the machine's own MPI does
# not work, then runs the GPU test of tests/test_distributed.py (CuPy, torch CUDA, JAX CUDA:
# both ranks identical, equal to one process on the GPU) and `mpiexec -n 2 xpcnn train --device
# cuda` and `--device torch:cuda` on the embedded digits. Log: $OUT/mpi_gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/mpi_gpu_check.log"
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1

section() { echo; echo "=== $*"; }
# the absolute interpreter: under mpiexec, PATH may lead "python3" to another Python
PY="$(python3 -c 'import sys; print(sys.executable)')"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "warning: installing .whl/*.whl failed"
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2

section "machine"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv || echo "no nvidia-smi"
$PY - <<'PYEOF'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "cupy", "torch", "jax", "mpi4py", "xpcnn"):
    try:
        m = importlib.import_module(name)
        print(f"{name:8} {getattr(m, '__version__', '?'):12} {getattr(m, '__file__', '')}")
    except Exception as exc:
        print(f"{name:8} missing ({type(exc).__name__}: {exc})")
PYEOF

probe_mpi() {  # $1 python, $2 mpiexec: both must work together
    [ -n "$2" ] && [ -x "$2" ] || { echo "no mpiexec"; return 1; }
    timeout 120 "$2" -n 1 $(mpi_opts "$2") "$1" -c \
        "from mpi4py import MPI; print('mpi4py under mpiexec: rank', MPI.COMM_WORLD.Get_rank())"
}
mpi_opts() { "$1" --version 2>&1 | grep -Eq "Open MPI|OpenRTE" && echo "--oversubscribe --allow-run-as-root"; }

section "MPI"
MPIEXEC="$(command -v mpiexec || true)"
echo "mpiexec on PATH: ${MPIEXEC:-none}"
[ -n "$MPIEXEC" ] && "$MPIEXEC" --version 2>&1 | head -2
$PY -c "import mpi4py; from mpi4py import MPI; print('mpi4py', mpi4py.__version__, '|', MPI.Get_library_version().strip())" \
    || echo "the machine's mpi4py does not import"
if ! probe_mpi "$PY" "$MPIEXEC"; then
    echo "the machine's MPI does not work; trying the carried wheels (.whl/mpi)"
    if compgen -G ".whl/mpi/*.whl" >/dev/null; then
        # into a target directory, not a venv: the same interpreter keeps NumPy, CuPy, torch
        $PY -m pip install -q --no-index --no-deps --target /tmp/mpi-site .whl/mpi/*.whl \
            && export PYTHONPATH="/tmp/mpi-site:$PYTHONPATH" \
            && MPIEXEC="$(ls /tmp/mpi-site/bin/mpiexec 2>/dev/null || ls /tmp/mpi-site/*/bin/mpiexec 2>/dev/null | head -1)"
        $PY -c "import mpi4py; from mpi4py import MPI; print('mpi4py', mpi4py.__version__, '|', MPI.Get_library_version().strip())"
        probe_mpi "$PY" "$MPIEXEC" || { echo "FAILED: no working MPI"; exit 1; }
    else
        echo "FAILED: no working MPI and no .whl/mpi (run scripts/fetch_mpi_wheels.sh here)"
        exit 1
    fi
fi
export PATH="$(dirname "$MPIEXEC"):$PATH"
OPTS="$(mpi_opts "$MPIEXEC")"
echo "using $PY with $MPIEXEC $OPTS"
timeout 120 "$MPIEXEC" -n 1 $OPTS "$PY" -c \
    "from xpcnn.distributed import cuda_aware_mpi; print('CUDA-aware MPI:', cuda_aware_mpi())"

status=0
section "pytest -m gpu tests/test_distributed.py (2 ranks share the GPU)"
XPCNN_REQUIRE_MPI=1 timeout 600 "$PY" -m pytest -q -rA -s -p no:cacheprovider -m gpu \
    tests/test_distributed.py || status=1

for device in cuda torch:cuda; do
    section "mpiexec -n 2 xpcnn train --device $device --epochs 3"
    timeout 300 "$MPIEXEC" -n 2 $OPTS "$PY" -m xpcnn.cli train --device "$device" --epochs 3 \
        --no-progress || status=1
done
section "done: exit status $status"
exit $status
