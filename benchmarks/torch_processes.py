"""Why PyTorch's batch-1000 inference speed differs from process to process on this machine.

    python benchmarks/torch_processes.py --threads 2 --processes 8

Starts ``--processes`` fresh Python processes, one after another; each builds PyTorch's copy
of SimpleCNN (`xpcnn.interop.to_torch`), classifies a batch of 1000 images 3 times to warm up
and 10 times timed, with oneDNN's verbose log on. Prints per process its images/s and the time
oneDNN reports for each primitive of the last call (convolutions and the layout reorders
around them), so a fast and a slow process can be compared primitive by primitive.
"""

import os
import subprocess
import sys

CHILD = r"""
import time, torch, xpcnn
from xpcnn.interop import to_torch
torch.set_num_threads(int(__import__("os").environ["OMP_NUM_THREADS"]))
net = to_torch(xpcnn.SimpleCNN(seed=0)).eval()
x = torch.rand(1000, 1, 28, 28)
with torch.no_grad():
    for _ in range(3):
        net(x)
    t0 = time.perf_counter()
    for _ in range(10):
        net(x)
print("images/s", round(10000 / (time.perf_counter() - t0)), flush=True)
"""


def last_call(log):
    """(kind, shape, ms) of the primitives oneDNN ran in the last forward pass."""
    rows = [line.split(",") for line in log.splitlines() if line.startswith("onednn_verbose")]
    rows = [r for r in rows if len(r) > 5 and r[3] == "exec"]
    per_call = len(rows) // 13  # 3 warm-up calls + 10 timed ones
    return [(r[5], r[-2], float(r[-1])) for r in rows[-per_call:]] if per_call else []


def main():
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    count = int(sys.argv[sys.argv.index("--processes") + 1]) if "--processes" in sys.argv else 8
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    print(f"threads: {threads}; per process: images/s, then each primitive of the last call")
    for i in range(count):
        out = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
        ).stdout
        speed = next(line for line in out.splitlines() if line.startswith("images/s"))
        prims = "  ".join(f"{kind} {shape} {ms:.2f}" for kind, shape, ms in last_call(out))
        print(f"process {i + 1}: {speed}\n    {prims}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
