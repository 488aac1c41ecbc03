"""Training-epoch time of xpcnn against PyTorch's own nn.Module, in one process, interleaved.

    python benchmarks/train_epoch.py --threads 2 --epochs 3
    python benchmarks/train_epoch.py --threads 1 --epochs 3 --methods dilation,col2im

Same initial weights, same batch order (one host permutation per epoch, shared), batch 128,
SGD with momentum 0.9 and a constant learning rate, Fashion-MNIST's 60000 training images
(``--dataset``). Each round runs one epoch of every contender back to back, so a slow spell of
this shared machine hits all of them; the report gives each xpcnn/PyTorch ratio per round and
their median. xpcnn runs through the trainer's own epoch loop (`xpcnn.trainer._EpochRunner`),
the code users get; PyTorch runs the textbook loop (zero_grad, forward, loss, backward, step).
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
from xpcnn.interop import torch_simple_cnn  # noqa: E402


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
    def __init__(self, data, method, lr, momentum, batch_size, seed):
        self.model = xpcnn.SimpleCNN(seed=seed, input_grad=method)
        self.opt = xpcnn.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        backend = xpcnn.get_backend("cpu")
        self.data = trainer.DeviceData(backend, data.train_images, data.train_labels)
        self.runner = trainer._EpochRunner(
            self.model,
            self.opt,
            self.data,
            batch_size,
            trainer.HostSync(),
            False,
            10**9,
            trainer.SCHEDULES["constant"],
        )

    class _NoInterrupt:
        set = False

    def epoch(self, epoch, order):
        row = self.runner(epoch, np.asarray(order), (0, None), self._NoInterrupt)
        return row["train_loss"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="timed rounds (after one warm-up)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--methods", default="dilation,col2im")
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
            data.name,
            data.train_images[: args.limit],
            data.train_labels[: args.limit],
            data.test_images,
            data.test_labels,
            data.source,
        )
    n = len(data.train_images)
    methods = args.methods.split(",")
    ours = {
        m: XpcnnContender(data, m, args.lr, args.momentum, args.batch_size, args.seed)
        for m in methods
    }
    net = torch_simple_cnn()
    net.load_state_dict(
        {k: torch.from_numpy(v) for k, v in xpcnn.SimpleCNN(seed=args.seed).state_dict().items()}
    )
    topt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
    timages = torch.from_numpy(data.train_images[:, None])
    tlabels = torch.from_numpy(data.train_labels.astype(np.int64))

    rng = np.random.default_rng(args.seed)
    times = {name: [] for name in ["torch", *methods]}
    losses = {name: [] for name in times}
    print(f"machine: {machine()}  threads: {THREADS}  images/epoch: {n}", flush=True)
    for rnd in range(args.epochs + 1):  # round 0 is the warm-up
        order = rng.permutation(n)
        torder = torch.from_numpy(order)
        for name in times:
            t0 = time.perf_counter()
            if name == "torch":
                loss = torch_epoch(net, topt, timages, tlabels, torder, args.batch_size)
            else:
                loss = ours[name].epoch(rnd, order)
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
        f"\n{'contender':<16}{'median s':>10}{'min-max s':>16}{'ratio vs torch':>16}"
        f"{'ratio min-max':>16}{'img/s':>10}"
    )
    for name, ts in times.items():
        ratios = [t / tt for t, tt in zip(ts, times["torch"], strict=True)]
        lo, hi = spread(ts)
        rlo, rhi = spread(ratios)
        report["results"][name] = {
            "median_s": median(ts),
            "times_s": ts,
            "ratio_median": median(ratios),
            "ratios": ratios,
            "train_loss": losses[name],
        }
        print(
            f"{name:<16}{median(ts):>10.2f}{f'{lo:.2f}-{hi:.2f}':>16}{median(ratios):>16.2f}"
            f"{f'{rlo:.2f}-{rhi:.2f}':>16}{n / median(ts):>10.0f}"
        )
    write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
