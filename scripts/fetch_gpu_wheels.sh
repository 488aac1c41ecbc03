#!/usr/bin/env bash
# Download into .whl/ the pure-Python wheels the lent GPU machine lacks, pinned to the versions in
# the local virtualenv. Run here, from anywhere in the repo:   bash scripts/fetch_gpu_wheels.sh
# xpcnn itself travels with the working tree and is put on PYTHONPATH there (scripts/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV_PIP="${VENV_PIP:-/tmp/venv/bin/pip}"
PACKAGES=(array-api-compat array-api-extra array-api-strict tqdm)

# .whl/ must never be committed, but must travel to the device machine as a carried path.
mkdir -p .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

mkdir -p .whl
for name in "${PACKAGES[@]}"; do
    version="$("$VENV_PIP" show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
    if [ -z "$version" ]; then
        echo "error: $name is not installed in the virtualenv of $VENV_PIP" >&2
        exit 1
    fi
    # one version of each package only: two would stop the install on the device machine
    rm -f .whl/"$(echo "$name" | tr - _)"-*.whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$name==$version"
done
ls -l .whl
