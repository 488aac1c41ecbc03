"""FLOP count of a SimpleCNN training epoch per input-gradient method, and the floor it implies.

    python benchmarks/flops.py --threads 2

Counts the multiply-adds of every matrix product one training step performs (forward, weight
and bias gradients, input gradients except for conv1, whose input is data), for the three
input-gradient methods: ``dilation-zeros`` (the literal zero-stuffed form: one product per
kernel tap over the dilated, padded gradient), ``dilation`` (the phase form: one product per
tap over G itself, which is the useful work) and ``col2im`` (``G @ Wmat``, the same count).
Then measures this machine's float32 GEMM rate on a large square product
and on each product shape the network uses, and prints the epoch-time floor: the products
alone, at the measured rates, with nothing else (no copies, no elementwise passes).
"""

import sys

from common import machine, pin_threads

THREADS = pin_threads()

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

# (name, C, H, W, O, k, s, p) of SimpleCNN's convolutions on 28x28 inputs
CONVS = [
    ("conv1", 1, 28, 28, 32, 2, 2, 0),
    ("conv2", 32, 14, 14, 64, 2, 2, 1),
    ("conv3", 64, 8, 8, 128, 2, 2, 0),
]
LINEARS = [("fc1", 2048, 250), ("fc2", 250, 10)]


def gemms(batch, method):
    """Every matrix product of one training step as (name, M, K, N)."""
    out = []
    for name, c, h, w, o, k, s, p in CONVS:
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        rows = batch * oh * ow
        out.append((f"{name} forward", rows, k * k * c, o))
        out.append((f"{name} weight grad", o, rows, k * k * c))
        if name == "conv1":
            continue  # the input gradient of the first layer is never needed
        if method == "dilation-zeros":  # one product per tap over the dilated, padded gradient
            for tap in range(k * k):
                rows_d = batch * (h + k - 1) * (w + k - 1)
                out.append((f"{name} input grad tap {tap}", rows_d, o, c))
        elif method == "dilation":  # per phase: G itself times the taps of that phase
            out.append((f"{name} input grad (phases)", rows, o, k * k * c))
        else:  # dcol = G @ Wmat
            out.append((f"{name} input grad", rows, o, k * k * c))
    for name, i, o in LINEARS:
        out.append((f"{name} forward", batch, i, o))
        out.append((f"{name} weight grad", o, batch, i))
        out.append((f"{name} input grad", batch, o, i))
    return out


def gemm_rate(m, k, n, repeats=7):
    """Median float32 GFLOP/s of an (m x k) @ (k x n) product on this machine."""
    rng = np.random.default_rng(0)
    a = rng.random((m, k), dtype=np.float32)
    b = rng.random((k, n), dtype=np.float32)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / sorted(times)[repeats // 2] / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=60000)
    args = p.parse_args()
    steps = args.images / args.batch_size
    print(f"machine: {machine()}  threads: {THREADS}")
    peak = gemm_rate(2048, 2048, 2048)
    print(f"float32 GEMM 2048^3: {peak:.0f} GFLOP/s\n")
    for method in ("col2im", "dilation", "dilation-zeros"):
        rows = gemms(args.batch_size, method)
        flops = sum(2 * m * k * n for _, m, k, n in rows)
        t_shapes = 0.0
        print(f"{method}: {'product':<20}{'M x K x N':>22}{'GFLOP/s':>10}{'ms':>8}")
        for name, m, k, n in rows:
            rate = gemm_rate(m, k, n)
            t_shapes += 2 * m * k * n / rate / 1e9
            print(
                f"  {'':<{len(method)}}{name:<20}{f'{m} x {k} x {n}':>22}{rate:>10.0f}"
                f"{2 * m * k * n / rate / 1e6:>8.2f}"
            )
        print(
            f"  per image: {flops / args.batch_size / 1e6:.2f} MFLOP; per epoch of "
            f"{args.images}: {flops * steps / 1e9:.0f} GFLOP"
        )
        print(
            f"  floor per epoch: {flops * steps / peak / 1e9:.2f} s at the 2048^3 rate, "
            f"{t_shapes * steps:.2f} s at the rates of these shapes\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
