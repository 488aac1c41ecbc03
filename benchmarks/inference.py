"""Inference speed of xpcnn against PyTorch (same weights), and xpcnn's peak memory.

    python benchmarks/inference.py --threads 2
    python benchmarks/inference.py --threads 1 --rounds 7

Per-image latency at batch 1 and throughput at batch 1000, both in eval mode (no_grad for
torch). Each round times a block of calls of one library, then a block of the other, so a thread
pool that went to sleep is woken once per block rather than on every call; the report gives
medians over rounds and the ratio of the medians. Peak memory: NumPy's allocations traced with
tracemalloc while xpcnn classifies 10000 images in one call (eval mode processes them
the CPU backend's `eval_chunk`, 128, at a time).
"""

import sys

from common import machine, median, pin_threads, spread, write_json

THREADS = pin_threads()

import argparse  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import xpcnn  # noqa: E402
from xpcnn.interop import to_torch  # noqa: E402


def timed_block(fn, calls):
    """Median seconds per call over a block of calls."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(THREADS)

    data = xpcnn.datasets.load("mnist-5k")
    model = xpcnn.SimpleCNN(seed=0).eval()
    net = to_torch(model).eval()
    images = (data.test_images[:, None] / 255.0).astype(np.float32)
    batch1000 = images[:1000]
    one = [images[i : i + 1] for i in range(200)]
    tone = [torch.from_numpy(a) for a in one]
    t1000 = torch.from_numpy(batch1000)

    def ours_latency():
        for a in one:
            model(a)

    def torch_latency():
        with torch.no_grad():
            for a in tone:
                net(a)

    results = {
        "xpcnn": {"latency": [], "throughput": []},
        "torch": {"latency": [], "throughput": []},
    }
    print(f"machine: {machine()}  threads: {THREADS}", flush=True)
    for rnd in range(args.rounds + 1):  # round 0 warms up
        lat_x = timed_block(ours_latency, 3) / len(one)
        lat_t = timed_block(torch_latency, 3) / len(one)
        thr_x = 1000 / timed_block(lambda: model(batch1000), 5)
        with torch.no_grad():
            thr_t = 1000 / timed_block(lambda: net(t1000), 5)
        if rnd:
            results["xpcnn"]["latency"].append(lat_x)
            results["torch"]["latency"].append(lat_t)
            results["xpcnn"]["throughput"].append(thr_x)
            results["torch"]["throughput"].append(thr_t)
            print(
                f"round {rnd}: latency ms xpcnn {lat_x * 1e3:.3f} torch {lat_t * 1e3:.3f}; "
                f"img/s xpcnn {thr_x:.0f} torch {thr_t:.0f}",
                flush=True,
            )

    ten_thousand = np.concatenate([images] * 10)
    tracemalloc.start()
    model(ten_thousand)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    report = {"machine": machine(), "threads": THREADS, "rounds": args.rounds}
    print(f"\n{'':<26}{'xpcnn':>12}{'torch':>12}{'xpcnn/torch':>14}")
    for key, unit, scale in (
        ("latency", "ms/image, batch 1", 1e3),
        ("throughput", "img/s, batch 1000", 1),
    ):
        x, t = median(results["xpcnn"][key]), median(results["torch"][key])
        report[key] = {
            "xpcnn": results["xpcnn"][key],
            "torch": results["torch"][key],
            "xpcnn_median": x,
            "torch_median": t,
            "ratio": x / t,
        }
        lo, hi = spread(results["xpcnn"][key])
        print(
            f"{key + ' (' + unit + ')':<26}{x * scale:>12.3f}{t * scale:>12.3f}{x / t:>14.2f}"
            f"   xpcnn spread {lo * scale:.3f}-{hi * scale:.3f}"
        )
    report["peak_bytes_10000"] = peak
    print(
        f"peak NumPy memory classifying 10000 images in one call: {peak / 2**20:.1f} MiB "
        f"(eval_chunk={model.backend.eval_chunk}; "
        f"the input alone is {ten_thousand.nbytes / 2**20:.1f} MiB)"
    )
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
