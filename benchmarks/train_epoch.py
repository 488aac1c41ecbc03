"""Training-epoch time of xpcnn against PyTorch's own nn.Module, in one process, interleaved.

    python benchmarks/train_epoch.py --threads 2 --epochs 3
    python benchmarks/train_epoch.py --contenders cpu/dilation,cpu/col2im,jax:cpu/col2im+compile

Same initial weights, same batch order (one host permutation per epoch, shared), batch 128,
SGD with momentum 0.9 and a constant learning rate, Fashion-MNIST's 60000 training images
(``--dataset``). A contender is ``DEVICE/METHOD[+compile][+workers[N]]``: an xpcnn backend,
the convolutions' input-gradient method, whether the step is compiled (`xpcnn.step.TrainStep`:
jax.jit on ``jax:*``), and whether N worker threads (default: ``--threads``) share each batch
(`xpcnn.workers`, what ``xpcnn train`` does by default on NumPy); without ``+workers`` the
step runs in one thread, BLAS using ``--threads``. Each round runs one epoch of every
contender back to back, so a slow spell of this shared machine hits all of them; the report
gives each xpcnn/PyTorch ratio per round and their median. xpcnn runs
`xpcnn.trainer.train_epoch` over a `TrainStep`, the code `xpcnn.train` runs; PyTorch runs
the textbook loop (zero_grad, forward, loss, backward, step). A compiled contender's first
call (trace and compile) is timed separately and reported, never counted in an epoch; round 0
is a warm-up for everyone.
"""

import sys

from common import machine, median, pin_threads, spread, write_json

THREADS = pin_threads()

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import xpcnn  # noqa: E402
from xpcnn import trainer  # noqa: E402
from xpcnn.interop import to_torch  # noqa: E402
from xpcnn.step import TrainStep  # noqa: E402

DEFAULT = (
    "cpu/dilation,cpu/dilation-zeros,cpu/col2im,cpu/dilation+workers,cpu/col2im+workers,"
    "jax:cpu/dilation+compile,jax:cpu/col2im+compile"
)


def torch_epoch(net, opt, images, labels, order, batch_size):
    """One epoch of the textbook PyTorch loop; loss summed on the tensor side, read once."""
    total = torch.zeros(())
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x = images.index_select(0, idx).float().div_(255.0)
        y = labels.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        total += loss.detach() * x.shape[0]
    return float(total) / len(order)


class XpcnnContender:
    """xpcnn's SimpleCNN on one backend, with one input-gradient method, maybe compiled."""

    def __init__(self, spec, data, lr, momentum, batch_size, seed):
        device, _, rest = spec.partition("/")
        method, *flags = rest.split("+")
        workers = [f for f in flags if f.startswith("workers")]
        count = (int(workers[0][7:]) if workers[0][7:] else THREADS) if workers else 1
        self.backend = xpcnn.get_backend(device)
        self.model = xpcnn.SimpleCNN(seed=seed, input_grad=method or "dilation", device=device)
        opt = xpcnn.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        self.step = TrainStep(self.model, opt, compile="compile" in flags, workers=count)
        if "compile" in flags and not self.step.compiled:
            raise SystemExit(f"{spec}: backend {device} has no compiler")
        self.data = trainer.DeviceData(self.backend, data.train_images, data.train_labels)
        self.lr, self.batch_size = lr, batch_size
        self.compile_s = None
        if self.step.compiled:  # time the first call (trace + compile) apart from the epochs
            x, y = self.data.batch(self.backend.asarray(np.arange(batch_size), "int64"), "float32")
            self.step.model.train()
            saved = self.step.state()
            copies = [self.backend.asarray(trainer.to_numpy(a), "float32") for a in saved[0]]
            t0 = time.perf_counter()
            loss, _ = self.step(x, y, 0.0)  # lr 0: the weights do not move
            trainer.HostSync().read(loss)
            self.compile_s = time.perf_counter() - t0
            for p, c in zip(self.step.params, copies, strict=True):
                p.data = c
            opt.state = opt.init_state(copies)  # and the momentum buffers back to zero

    def epoch(self, order):
        order = self.backend.asarray(order, "int64")
        loss, _, _ = trainer.train_epoch(self.step, self.data, order, self.batch_size, self.lr)
        return loss


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="timed rounds (after one warm-up)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--contenders", default=DEFAULT)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(THREADS)

    data = xpcnn.datasets.load(args.dataset)
    if args.limit:
        data = xpcnn.datasets.Dataset(
            data.name, data.train_images[: args.limit], data.train_labels[: args.limit],
            data.test_images, data.test_labels, data.source,
        )  # fmt: skip
    n = len(data.train_images)
    names = args.contenders.split(",")
    ours = {
        c: XpcnnContender(c, data, args.lr, args.momentum, args.batch_size, args.seed)
        for c in names
    }
    net = to_torch(xpcnn.SimpleCNN(seed=args.seed)).train()
    for prm in net.parameters():
        prm.requires_grad_(True)
    topt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    timages = torch.from_numpy(data.train_images[:, None])
    tlabels = torch.from_numpy(data.train_labels.astype(np.int64))

    rng = np.random.default_rng(args.seed)
    times = {name: [] for name in ["torch", *names]}
    losses = {name: [] for name in times}
    print(f"machine: {machine()}  threads: {THREADS}  images/epoch: {n}", flush=True)
    for c in ours.values():
        if c.compile_s is not None:
            print(f"first call (trace + compile): {c.compile_s:.2f} s", flush=True)
    for rnd in range(args.epochs + 1):  # round 0 is the warm-up
        order = rng.permutation(n)
        torder = torch.from_numpy(order)
        for name in times:
            t0 = time.perf_counter()
            if name == "torch":
                loss = torch_epoch(net, topt, timages, tlabels, torder, args.batch_size)
            else:
                loss = ours[name].epoch(order)
            dt = time.perf_counter() - t0
            if rnd:
                times[name].append(dt)
                losses[name].append(loss)
        if rnd:
            line = "  ".join(
                f"{k} {v[-1]:6.2f}s (x{v[-1] / times['torch'][-1]:.2f})" for k, v in times.items()
            )
            print(f"round {rnd}: {line}", flush=True)
    report = {
        "machine": machine(),
        "threads": THREADS,
        "images": n,
        "batch_size": args.batch_size,
        "rounds": args.epochs,
        "results": {},
    }
    print(
        f"\n{'contender':<30}{'median s':>10}{'min-max s':>16}{'ratio vs torch':>16}"
        f"{'ratio min-max':>16}{'img/s':>10}{'compile s':>11}"
    )
    for name, ts in times.items():
        ratios = [t / tt for t, tt in zip(ts, times["torch"], strict=True)]
        lo, hi = spread(ts)
        rlo, rhi = spread(ratios)
        compile_s = ours[name].compile_s if name in ours else None
        report["results"][name] = {
            "median_s": median(ts),
            "times_s": ts,
            "ratio_median": median(ratios),
            "ratios": ratios,
            "final_loss": losses[name][-1],
            "compile_s": compile_s,
        }
        cs = "" if compile_s is None else f"{compile_s:.2f}"
        print(
            f"{name:<30}{median(ts):>10.2f}{f'{lo:.2f}-{hi:.2f}':>16}{median(ratios):>16.2f}"
            f"{f'{rlo:.2f}-{rhi:.2f}':>16}{n / median(ts):>10.0f}{cs:>11}"
        )
    print("\nlast-round mean training loss (same weights and order: should agree):")
    for name in times:
        print(f"  {name:<30}{losses[name][-1]:.5f}")
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
