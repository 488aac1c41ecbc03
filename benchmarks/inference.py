"""Inference speed of xpcnn against PyTorch (same weights), and xpcnn's peak memory.

    python benchmarks/inference.py --threads 2
    python benchmarks/inference.py --threads 1 --rounds 7
    python benchmarks/inference.py --threads 2 --model minivgg   # another zoo model

Per-image latency at batch 1 and throughput at batch 1000, both in eval mode (no_grad for
torch), for xpcnn on NumPy (eager; and with one worker thread per core sharing each
batch, `xpcnn.workers`, when ``--threads`` is above 1), xpcnn on JAX with the forward
compiled by ``jax.jit`` (`xpcnn.step.predict_function`; ``--no-jax`` leaves it out) and
PyTorch. The compiled
contender's first calls (trace and compile, one per batch shape) are timed apart.
Each round times a block of calls of one library, then a block of the other, so a thread
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
from xpcnn.step import predict_function  # noqa: E402


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
    p.add_argument("--no-jax", action="store_true", help="leave out the compiled JAX contender")
    p.add_argument("--no-workers", action="store_true", help="leave out xpcnn with worker threads")
    p.add_argument("--model", default="simplecnn", help="a zoo model (xpcnn.models.names())")
    args = p.parse_args()
    torch.set_num_threads(THREADS)

    data = xpcnn.datasets.load("mnist-5k")
    model = xpcnn.models.create(args.model, seed=0).eval()
    net = to_torch(model).eval()
    images = (data.test_images[:, None] / 255.0).astype(np.float32)
    batch1000 = images[:1000]
    one = [images[i : i + 1] for i in range(200)]
    tone = [torch.from_numpy(a) for a in one]
    t1000 = torch.from_numpy(batch1000)

    def ours_latency():
        for a in one:
            model(a)

    contenders = {"xpcnn": (ours_latency, lambda: model(batch1000))}
    if not args.no_workers and THREADS > 1:  # one worker thread per core (xpcnn.workers)
        shared = predict_function(model, workers=THREADS)

        def workers_latency():
            for a in one:
                shared(a)

        contenders["xpcnn-workers"] = (workers_latency, lambda: shared(batch1000))
    compile_s = {}
    if not args.no_jax:
        jb = xpcnn.get_backend("jax:cpu")
        jmodel = xpcnn.models.create(args.model, seed=0, device="jax:cpu").eval()
        predict = predict_function(jmodel, compile=True)
        jone = [jb.asarray(a, "float32") for a in one]
        j1000 = jb.asarray(batch1000, "float32")
        for key, x in (("batch 1", jone[0]), ("batch 1000", j1000)):
            t0 = time.perf_counter()
            predict(x).block_until_ready()
            compile_s[key] = time.perf_counter() - t0

        def jax_latency():
            for a in jone:
                predict(a).block_until_ready()

        contenders["xpcnn-jax"] = (jax_latency, lambda: predict(j1000).block_until_ready())

    def torch_latency():
        with torch.no_grad():
            for a in tone:
                net(a)

    def torch_batch():
        with torch.no_grad():
            net(t1000)

    contenders["torch"] = (torch_latency, torch_batch)
    results = {k: {"latency": [], "throughput": []} for k in contenders}
    print(f"machine: {machine()}  threads: {THREADS}  model: {args.model}", flush=True)
    if compile_s:
        print(f"xpcnn-jax first calls (trace + compile): {compile_s}", flush=True)
    for rnd in range(args.rounds + 1):  # round 0 warms up
        line = []
        for name, (latency, batch) in contenders.items():
            lat = timed_block(latency, 3) / len(one)
            thr = 1000 / timed_block(batch, 5)
            if rnd:
                results[name]["latency"].append(lat)
                results[name]["throughput"].append(thr)
            line.append(f"{name} {lat * 1e3:.3f} ms {thr:.0f} img/s")
        if rnd:
            print(f"round {rnd}: " + "; ".join(line), flush=True)

    ten_thousand = np.concatenate([images] * 10)
    tracemalloc.start()
    model(ten_thousand)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    report = {"machine": machine(), "threads": THREADS, "rounds": args.rounds, "model": args.model}
    report["compile_s"] = compile_s
    names = [n for n in results if n != "torch"]
    head = "".join(f"{n:>12}" for n in [*names, "torch"])
    ratios = "".join(f"{n + '/torch':>18}" for n in names)
    print(f"\n{'':<26}{head}{ratios}")
    for key, unit, scale in (
        ("latency", "ms/image, batch 1", 1e3),
        ("throughput", "img/s, batch 1000", 1),
    ):
        t = median(results["torch"][key])
        report[key] = {"torch": results["torch"][key], "torch_median": t}
        cells, rcells = [], []
        for n in names:
            x = median(results[n][key])
            lo, hi = spread(results[n][key])
            report[key].update({n: results[n][key], f"{n}_median": x, f"{n}_ratio": x / t})
            report[key][f"{n}_spread"] = [lo, hi]
            cells.append(f"{x * scale:>12.3f}")
            rcells.append(f"{x / t:>18.2f}")
        print(f"{key + ' (' + unit + ')':<26}{''.join(cells)}{t * scale:>12.3f}{''.join(rcells)}")
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
