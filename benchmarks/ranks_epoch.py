"""The whole 2-core machine on one training run: PyTorch's eager loop with 2 threads against
data-parallel ranks at 1 thread each, xpcnn's (MPI) and PyTorch's own (DDP over gloo).

    python benchmarks/ranks_epoch.py --rounds 3 --epochs 3      # Fashion-MNIST, ~7 minutes
    python benchmarks/ranks_epoch.py --dataset mnist-5k --rounds 1 --epochs 2   # a smoke run

A contender is one training command, run in its own process(es) so that its thread counts are
set before anything loads; every round runs each contender once, back to back, so a slow spell
of this shared machine hits all of them. Every contender trains SimpleCNN from the same seed at
global batch 128 with SGD, momentum 0.9 (on 2 ranks each rank computes 64 images of every
global batch and the gradients are averaged), for ``--epochs`` epochs; the first epoch is a
warm-up (JAX's trace and compile fall in it) and the figure of a run is its median images/s over
the others, counting training steps only (no evaluation):

- ``torch``: PyTorch's textbook eager loop (zero_grad, forward, loss, backward, step) in one
  process, ``torch.set_num_threads(2)``: the reference, as in `train_epoch.py`;
- ``torch-ddp``: the same loop under ``DistributedDataParallel`` (gloo), 2 processes x 1 thread;
- ``xpcnn/...``: ``mpiexec -n 2 xpcnn train`` with 1 thread per rank (NumPy with an
  input-gradient method, or JAX's compiled step); images/s is the trainer's own figure.

Results: benchmarks/results/ranks_epoch-2cores.{log,json}.
"""

import os
import sys

if "--worker" in sys.argv:  # a PyTorch contender's process: its threads, set before torch loads
    _threads = sys.argv[sys.argv.index("--threads") + 1]
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]
from common import Log, machine, median, spread  # noqa: E402

RESULTS = HERE / "results" / "ranks_epoch-2cores"
GLOBAL_BATCH = 128
DEFAULT = "torch,torch-ddp,xpcnn/cpu/dilation,xpcnn/cpu/col2im,xpcnn/jax:cpu/col2im"


# --- PyTorch contenders: this script, run again as a worker -------------------------------------


def torch_worker(args):
    """Train with PyTorch (one process, or one DDP rank under mpiexec); print per-epoch seconds
    as JSON on rank 0."""
    import numpy as np
    import torch

    import xpcnn
    from xpcnn.interop import to_torch

    torch.set_num_threads(args.threads)
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")))
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", "1")))
    if size > 1:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=size
        )
    data = xpcnn.datasets.load(args.dataset)
    net = to_torch(xpcnn.SimpleCNN(seed=args.seed)).train()
    for p in net.parameters():
        p.requires_grad_(True)
    model = torch.nn.parallel.DistributedDataParallel(net) if size > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    images = torch.from_numpy(data.train_images[:, None])
    labels = torch.from_numpy(data.train_labels.astype(np.int64))
    n, local = len(images), GLOBAL_BATCH // size
    rng = np.random.default_rng(args.seed)
    seconds = []
    for _ in range(args.epochs):
        order = torch.from_numpy(rng.permutation(n))
        if size > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for start in range(0, n, GLOBAL_BATCH):  # this rank's slice of every global batch
            idx = order[start : start + GLOBAL_BATCH][rank * local : (rank + 1) * local]
            x = images.index_select(0, idx).float().div_(255.0)
            y = labels.index_select(0, idx)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if size > 1:
            dist.barrier()
        seconds.append(time.perf_counter() - t0)
    if rank == 0:
        print(json.dumps({"images": n, "seconds": seconds}))
    if size > 1:
        dist.destroy_process_group()


# --- the parent: launch every contender, round after round ---------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name, args, tmp):
    """Run one contender; returns (images/s per epoch, test accuracy or None, command)."""
    from distributed import env, mpiexec  # (its import pins this process to one thread)

    e = env()
    if name.startswith("torch"):
        ranks, threads = (2, 1) if name == "torch-ddp" else (1, 2)
        cmd = [sys.executable, __file__, "--worker", "--threads", str(threads)]
        cmd += ["--dataset", args.dataset, "--epochs", str(args.epochs), "--seed", str(args.seed)]
        cmd += ["--lr", str(args.lr), "--port", str(free_port())]
    else:
        _, device, method = name.split("/")
        ranks, threads = 2, 1
        history = pathlib.Path(tmp) / "history.json"
        cmd = [sys.executable, "-m", "xpcnn.cli", "train", "--device", device]
        cmd += ["--input-grad", method, "--dataset", args.dataset, "--epochs", str(args.epochs)]
        cmd += ["--seed", str(args.seed), "--lr", str(args.lr), "--schedule", "constant"]
        cmd += ["--no-progress", "--history", str(history)]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        e[var] = str(threads)
    if threads == 1:  # JAX's CPU backend: no thread pool of its own either
        e["XLA_FLAGS"] = f"{e.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
    if ranks > 1:
        cmd = mpiexec(ranks) + cmd
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    if name.startswith("torch"):
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return [out["images"] / s for s in out["seconds"]], None, " ".join(cmd)
    rows = json.loads(history.read_text())
    ips = [r["images_per_second"] for r in rows]
    return ips, rows[-1]["test_accuracy"], " ".join(cmd)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="per run; the first is a warm-up")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--contenders", default=DEFAULT)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS), help="results path without suffix")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return torch_worker(args)
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is a warm-up)")
    names = args.contenders.split(",")
    log = Log()
    log(f"$ python benchmarks/ranks_epoch.py {' '.join(sys.argv[1:])}")
    log(f"machine: {machine()}  started {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    runs = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(1, args.rounds + 1):
            for name in names:
                ips, acc, cmd = launch(name, args, tmp)
                load = os.getloadavg()[0]
                runs[name].append({"images_per_second": ips, "test_accuracy": acc,
                                   "command": cmd, "load_average_1min_after": load})  # fmt: skip
                acc_text = "" if acc is None else f", test accuracy {acc:.4f}"
                log(f"round {rnd}: {name:<22} " + " ".join(f"{v:.0f}" for v in ips)
                    + f" img/s per epoch{acc_text}, load average {load:.1f}")  # fmt: skip
    per_round = {n: [median(r["images_per_second"][1:]) for r in rs] for n, rs in runs.items()}
    ref = per_round.get("torch")
    log(f"\n{'contender':<24}{'img/s':>9}{'min-max':>16}{'epoch time vs torch':>22}{'min-max':>14}")
    report = {"machine": machine(), "rounds": args.rounds, "epochs": args.epochs, "results": {}}
    for name, ips in per_round.items():
        ratios = [t / v for v, t in zip(ips, ref, strict=True)] if ref else None
        report["results"][name] = {"runs": runs[name], "images_per_second": ips,
                                   "time_ratio_to_torch": ratios}  # fmt: skip
        lo, hi = spread(ips)
        cells = ""
        if ratios:
            rlo, rhi = spread(ratios)
            cells = f"{median(ratios):>22.2f}{f'{rlo:.2f}-{rhi:.2f}':>14}"
        log(f"{name:<24}{median(ips):>9.0f}{f'{lo:.0f}-{hi:.0f}':>16}{cells}")
    out = pathlib.Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    log.save(out.with_suffix(".log"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
