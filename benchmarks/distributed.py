"""Data-parallel training over MPI on this machine, measured, and a model of it past one machine.

    python benchmarks/distributed.py --rounds 3 --epochs 2     # measure; writes results/
    python benchmarks/distributed.py --plot                     # redraw docs/img/ from the JSON

Measures, at 1 thread per process (OMP_NUM_THREADS=1):

1. training throughput of ``xpcnn train`` alone and of ``mpiexec -n 2 xpcnn train`` (global
   batch 128 either way, same seed), interleaved round by round so a slow spell of this shared
   machine hits both; images/s is the trainer's own figure (training images over the time of
   the training steps of an epoch, evaluation excluded), plus the wall time of each command and
   the test accuracy after the last epoch;
2. the compute time of one training step against its batch (1 to 128 images, one process),
   fitted as ``fixed + per_image * batch`` (`xpcnn.distributed.step_seconds`);
3. ``MPI_Allreduce`` of SimpleCNN's flat gradient buffer (556072 + 4 float32 values, 2.2 MB)
   between 2 ranks, and of smaller buffers, and the whole per-step exchange of the trainer's
   host path (flatten, allreduce, unflatten).

The model (`xpcnn.distributed.ring_allreduce_seconds`) extends the step time to 8, 64 and 512
ranks on 25 Gb/s Ethernet and 200 Gb/s InfiniBand; docs/distributed.md explains it. Results go
to benchmarks/results/distributed-2cores.json and .log; --plot draws
docs/img/distributed-scaling.png with `xpcnn.plots.plot_scaling`.
"""

import os
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before NumPy loads: one thread per process, every process

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]  # this checkout's xpcnn, also for the subprocesses
from common import Log, machine, median, spread  # noqa: E402

RESULTS = HERE / "results" / "distributed-2cores.json"
FIGURE = ROOT / "docs" / "img" / "distributed-scaling.png"
NETWORKS = {  # name -> (bandwidth bytes/s, latency s)
    "25 Gb/s Ethernet": (25e9 / 8, 30e-6),
    "200 Gb/s InfiniBand": (200e9 / 8, 2e-6),
}
RANKS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
GLOBAL_BATCH = 128
WEAK_BATCH = 64  # per rank: what each of the 2 ranks computes at global batch 128
STEP_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128]


def mpiexec(n):
    exe = shutil.which("mpiexec") or shutil.which("mpiexec", path=os.path.dirname(sys.executable))
    if exe is None:
        sys.exit("no mpiexec: pip install 'xpcnn[mpi]'")
    cmd = [exe, "-n", str(n)]
    if "Open MPI" in subprocess.run([exe, "--version"], capture_output=True, text=True).stdout:
        # a shared machine: no pinning to a busy core, and a waiting rank yields its core
        cmd += ["--oversubscribe", "--allow-run-as-root", "--bind-to", "none"]
        cmd += ["--mca", "mpi_yield_when_idle", "1"]
    return cmd


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "PMIX_"))}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


# --- 1. throughput -------------------------------------------------------------------------------


def train_run(ranks, dataset, epochs, seed):
    """One ``xpcnn train`` (alone or under mpiexec): its history and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        history = pathlib.Path(tmp) / "history.json"
        cmd = [sys.executable, "-m", "xpcnn.cli", "train", "--dataset", dataset]
        cmd += ["--epochs", str(epochs), "--seed", str(seed), "--no-progress"]
        cmd += ["--history", str(history)]
        if ranks > 1:
            cmd = mpiexec(ranks) + cmd
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        load = os.getloadavg()[0]  # other jobs on this shared machine: context for the numbers
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
        return json.loads(history.read_text()), wall, " ".join(cmd), load


def throughput(args, log):
    rows = {1: [], 2: []}
    for rnd in range(1, args.rounds + 1):
        for ranks in (1, 2):
            history, wall, cmd, load = train_run(ranks, args.dataset, args.epochs, args.seed)
            ips = [h["images_per_second"] for h in history]
            rows[ranks].append(
                {
                    "images_per_second": ips,
                    "wall_s": wall,
                    "test_accuracy": history[-1]["test_accuracy"],
                    "train_loss": history[-1]["train_loss"],
                    "command": cmd,
                    "load_average_1min_after": load,
                }
            )
            log(
                f"round {rnd}: {ranks} rank(s): "
                + " ".join(f"{v:.0f}" for v in ips)
                + f" img/s per epoch, wall {wall:.1f} s, test accuracy "
                f"{history[-1]['test_accuracy']:.4f}, load average {load:.1f}"
            )
    out = {}
    for ranks, rs in rows.items():
        per_round = [median(r["images_per_second"]) for r in rs]
        out[ranks] = {
            "runs": rs,
            "images_per_second_median": median(per_round),
            "images_per_second_spread": spread(per_round),
            "wall_s_median": median([r["wall_s"] for r in rs]),
            "test_accuracy": [r["test_accuracy"] for r in rs],
        }
    speedups = [
        median(b["images_per_second"]) / median(a["images_per_second"])
        for a, b in zip(rows[1], rows[2], strict=True)
    ]
    out["speedup_per_round"] = speedups
    out["speedup_median"] = median(speedups)
    out["wall_speedup_per_round"] = [
        a["wall_s"] / b["wall_s"] for a, b in zip(rows[1], rows[2], strict=True)
    ]
    log(
        f"images/s: 1 rank {out[1]['images_per_second_median']:.0f}, 2 ranks "
        f"{out[2]['images_per_second_median']:.0f}: speedup {out['speedup_median']:.2f}x "
        f"(per round {', '.join(f'{s:.2f}' for s in speedups)}); wall-time speedup per round "
        f"{', '.join(f'{s:.2f}' for s in out['wall_speedup_per_round'])}"
    )
    return out


# --- 2. compute per step -------------------------------------------------------------------------


def step_times(repeats, log):
    import xpcnn
    from xpcnn.step import TrainStep

    model = xpcnn.SimpleCNN(seed=0)
    step = TrainStep(model, xpcnn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    rng = np.random.default_rng(0)
    out = {}
    for b in STEP_BATCHES:
        x = rng.random((b, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, b)
        for _ in range(3):
            step(x, y, 0.01)
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(x, y, 0.01)
            ts.append(time.perf_counter() - t0)
        out[b] = median(ts)
        log(f"step on {b:>3} images: {out[b] * 1e3:7.2f} ms ({out[b] / b * 1e3:.3f} ms/image)")
    bs = np.array(STEP_BATCHES, float)
    ts = np.array([out[b] for b in STEP_BATCHES])
    a = np.stack([np.ones_like(bs), bs], axis=1)
    (fixed, per_image), *_ = np.linalg.lstsq(a, ts, rcond=None)
    log(f"fit: {fixed * 1e3:.2f} ms + {per_image * 1e3:.3f} ms/image")
    return {"seconds": out, "fixed_s": float(fixed), "per_image_s": float(per_image)}


# --- 3. allreduce --------------------------------------------------------------------------------


def slowest(comm, MPI, times):
    """Median over repeats of the slower rank's time."""
    times = np.array(times)
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return median(times.tolist())


def allreduce_worker(repeats):
    """Run under mpiexec -n 2: time Allreduce of several sizes and the trainer's exchange."""
    from mpi4py import MPI

    import xpcnn
    from xpcnn import distributed as D

    comm = MPI.COMM_WORLD
    model = xpcnn.SimpleCNN(seed=0)
    count = sum(p.data.size for p in model.parameters()) + 4
    result = {"count": count, "bytes": {}}
    for n in sorted({1, 16, 256, 4096, 65536, 262144, count}):
        buf = np.ones(n, np.float32)
        for _ in range(10):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        ts = []
        for _ in range(repeats):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            ts.append(time.perf_counter() - t0)
        result["bytes"][n * 4] = slowest(comm, MPI, ts)
    # the trainer's host path around it: gradients -> flat * weight -> allreduce -> views
    world = D.World(comm, comm.Get_rank(), comm.Get_size(), "host")
    step = xpcnn.step.TrainStep(model, xpcnn.optim.SGD(model.parameters(), lr=0.0))
    parallel = D._ParallelStep(world, step, "host")
    grads = [np.ones_like(p.data) for p in step.params]
    tail = np.zeros(4, np.float32)
    ts = []
    for i in range(repeats + 10):
        comm.Barrier()
        t0 = time.perf_counter()
        flat = np.concatenate([np.concatenate([g.reshape(-1) for g in grads]) * 0.5, tail])
        flat, _ = parallel._host(flat, 0.0, 0.0)
        o = parallel.offsets
        _ = [flat[o[j] : o[j + 1]].reshape(s) for j, s in enumerate(parallel.shapes)]
        if i >= 10:
            ts.append(time.perf_counter() - t0)
    result["exchange_s"] = slowest(comm, MPI, ts)
    if comm.Get_rank() == 0:
        print(json.dumps(result))


def allreduce(repeats, log):
    cmd = mpiexec(2) + [sys.executable, "-m", "mpi4py", __file__]  # an exception aborts all
    cmd += ["--allreduce-worker", "--repeats", str(repeats)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    if proc.returncode:
        sys.exit(f"allreduce worker failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["bytes"] = {int(k): v for k, v in result["bytes"].items()}
    for n, t in sorted(result["bytes"].items()):
        log(f"allreduce of {n:>9} bytes, 2 ranks: {t * 1e6:9.1f} us")
    log(f"the trainer's whole exchange per step (flatten, allreduce, views): "
        f"{result['exchange_s'] * 1e3:.2f} ms")  # fmt: skip
    return result


# --- the model -----------------------------------------------------------------------------------


def model_rows(steps, comm_measured):
    """Predicted images/s and efficiency for weak and strong scaling on each network: the
    measured compute time of a step, plus for p > 1 the measured host-side cost of the exchange
    (flatten, copies: the whole exchange minus the 2-rank allreduce) and the modelled ring
    allreduce of the gradient."""
    from xpcnn.distributed import ring_allreduce_seconds, step_seconds

    fixed, per_image = steps["fixed_s"], steps["per_image_s"]
    nbytes = comm_measured["count"] * 4
    by_size = {int(k): v for k, v in comm_measured["bytes"].items()}
    overhead = max(comm_measured["exchange_s"] - by_size[nbytes], 0.0)
    rows = []
    for net, (bw, alpha) in NETWORKS.items():
        for p in RANKS:
            comm = ring_allreduce_seconds(nbytes, p, bw, alpha) + (overhead if p > 1 else 0.0)
            weak = step_seconds(WEAK_BATCH, fixed, per_image) + comm
            local = GLOBAL_BATCH / p
            strong = step_seconds(local, fixed, per_image) + comm if local >= 1 else None
            one = step_seconds(GLOBAL_BATCH, fixed, per_image)
            rows.append(
                {
                    "network": net,
                    "ranks": p,
                    "exchange_s": comm,
                    "weak_step_s": weak,
                    "weak_images_per_second": p * WEAK_BATCH / weak,
                    "weak_efficiency": step_seconds(WEAK_BATCH, fixed, per_image) / weak,
                    "strong_step_s": strong,
                    "strong_images_per_second": GLOBAL_BATCH / strong if strong else None,
                    "strong_speedup": one / strong if strong else None,
                }
            )
    return rows


def print_model(rows, log):
    log(f"\nmodel: weak scaling at {WEAK_BATCH} images per rank, strong scaling at global batch "
        f"{GLOBAL_BATCH}")  # fmt: skip
    log(f"{'network':<22}{'ranks':>6}{'exchange ms':>14}{'weak img/s':>12}{'weak eff':>10}"
        f"{'strong img/s':>14}{'strong speedup':>16}")  # fmt: skip
    for r in rows:
        if r["ranks"] not in (1, 2, 8, 64, 128, 512):
            continue
        strong = r["strong_images_per_second"]
        log(
            f"{r['network']:<22}{r['ranks']:>6}{r['exchange_s'] * 1e3:>14.2f}"
            f"{r['weak_images_per_second']:>12.0f}{r['weak_efficiency']:>10.2f}"
            + (f"{strong:>14.0f}{r['strong_speedup']:>16.2f}" if strong else f"{'-':>14}{'-':>16}")
        )


def plot(report):
    from xpcnn.plots import plot_scaling

    FIGURE.parent.mkdir(exist_ok=True)
    report["model"] = model_rows(report["step_compute"], report["allreduce"])
    measured = {
        1: report["throughput"]["1"]["images_per_second_median"],
        2: report["throughput"]["2"]["images_per_second_median"],
    }
    plot_scaling(
        report["model"], measured, FIGURE, weak_batch=WEAK_BATCH, global_batch=GLOBAL_BATCH
    )
    print(f"wrote {FIGURE.relative_to(ROOT)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved 1-rank/2-rank rounds")
    p.add_argument("--epochs", type=int, default=2, help="epochs per training run")
    p.add_argument("--dataset", default=None, help="default: fashion-mnist if found, else mnist-5k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=200, help="timed allreduces / steps")
    p.add_argument("--plot", action="store_true", help="only redraw the figure from the JSON")
    p.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=str(RESULTS))
    args = p.parse_args()
    if args.allreduce_worker:
        return allreduce_worker(args.repeats)
    if args.plot:  # the model from the saved measurements: table, JSON and figure
        path = pathlib.Path(args.json)
        report = json.loads(path.read_text())
        plot(report)
        print_model(report["model"], print)
        path.write_text(json.dumps(report, indent=1))
        return 0
    if args.dataset is None:
        import xpcnn

        try:
            xpcnn.datasets.load("fashion-mnist")
            args.dataset = "fashion-mnist"
        except xpcnn.datasets.DatasetError:
            args.dataset = "mnist-5k"
    log = Log()
    log(f"machine: {machine()}  threads per process: 1  dataset: {args.dataset}")
    log(f"command: python benchmarks/distributed.py {' '.join(sys.argv[1:])}")
    steps = step_times(max(args.repeats // 10, 10), log)
    comm = allreduce(args.repeats, log)
    tp = throughput(args, log)
    rows = model_rows(steps, comm)
    print_model(rows, log)
    report = {
        "machine": machine(),
        "dataset": args.dataset,
        "epochs": args.epochs,
        "global_batch": GLOBAL_BATCH,
        "threads_per_process": 1,
        "throughput": {str(k): v for k, v in tp.items()},
        "step_compute": steps,
        "allreduce": comm,
        "networks": {k: {"bandwidth_bytes_s": b, "latency_s": a} for k, (b, a) in NETWORKS.items()},
        "model": rows,
    }
    path = pathlib.Path(args.json)
    path.write_text(json.dumps(report, indent=1))
    log.save(path.with_suffix(".log"))
    print(f"wrote {path} and {path.with_suffix('.log')}")
    plot(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
