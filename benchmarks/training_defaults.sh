#!/usr/bin/env bash
# The runs behind docs/training.md's table, docs/quickstart.md and README's first rows: each
# command with the default workers (auto) and then with --workers 1, wall seconds each. Run it
# where `xpcnn` is a fresh `pip install .` of this tree:
#
#     bash benchmarks/training_defaults.sh > benchmarks/results/training-defaults-DATE.log 2>&1
set -uo pipefail
echo "# $(python -c 'import sys; sys.path.insert(0, "benchmarks"); from common import machine; print(machine())'), $(date -u '+%F %H:%M') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "# auto here = $(python -c 'from xpcnn.backends import blas_threads; print(blas_threads())') workers (BLAS threads)"
for extra in "" "--optimizer adam" "--schedule constant" "--dataset fashion-mnist --epochs 5"; do
    for workers in "" "--workers 1"; do
        echo "\$ xpcnn train --no-progress $extra $workers"
        start=$(date +%s.%N)
        # shellcheck disable=SC2086
        xpcnn train --no-progress $extra $workers
        echo "wall seconds: $(python -c "print(round($(date +%s.%N) - $start, 1))")  (load $(cut -d' ' -f1-3 /proc/loadavg))"
    done
done
