"""Shared benchmark plumbing: thread pinning (before NumPy/torch load), machine description."""

import json
import os
import platform
import sys


def pin_threads(argv=None):
    """Read ``--threads N`` from argv and set every BLAS/OpenMP pool to N before any import."""
    argv = sys.argv if argv is None else argv
    threads = 2
    if "--threads" in argv:
        threads = int(argv[argv.index("--threads") + 1])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1:  # JAX's CPU backend: XLA's own thread pool
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    return threads


def machine():
    """CPU model, core count and library versions, for the report."""
    import numpy as np

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:
        pass
    return info


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def spread(values):
    """(min, max) as a compact spread figure."""
    return min(values), max(values)


def write_json(path, report):
    """Write a benchmark's report as JSON when a path was given (``--json``)."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


class Log:
    """Print a line and keep it: ``log = Log(); log("..."); log.save("x.log")``."""

    def __init__(self):
        self.lines = []

    def __call__(self, line):
        print(line, flush=True)
        self.lines.append(line)

    def save(self, path):
        with open(path, "w") as f:
            f.write("\n".join(self.lines) + "\n")
