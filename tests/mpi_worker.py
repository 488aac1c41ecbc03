"""What tests/test_distributed.py runs under ``mpiexec -n 2``: one scenario per launch.

    mpiexec -n 2 python tests/mpi_worker.py SCENARIO OUTDIR

Every rank writes what it saw under OUTDIR (weights as .npz, messages as .json, one file per
rank); the test compares them with a single-process run. Scenarios:

- ``equivalence``: `CONFIGS` (NumPy and torch-CPU, float64 and float32, SGD and Adam, a last
  batch smaller than the number of ranks); with ``--jax``, `JAX_CONFIGS` instead (JAX on the
  CPU with the compiled halves of the step);
- ``resume``: an uninterrupted run, a run that rank 0 alone interrupts (SIGINT) mid-epoch, and
  its resume; then a run whose loss becomes NaN on rank 1 alone;
- ``fail``: rank 1 alone cannot start (an unknown device), then rank 1 raises during the
  third step;
- ``long``: many epochs; each rank writes its pid once training runs (the test kills one);
- ``gpu DEVICE...``: `GPU_CONFIG` on each device (``cuda``, ``torch:cuda``, ``jax:cuda``, no
  index: each rank takes its GPU by local rank, so on a one-GPU machine both share it).
"""

import functools
import json
import os
import pathlib
import signal
import sys
import time

import numpy as np

import xpcnn
from xpcnn import datasets, nn
from xpcnn import step as S
from xpcnn import trainer as T
from xpcnn.step import TrainStep

#: name -> (device, dtype, optimizer, training images[, augment]); batch 128, 2 epochs, seed 3
CONFIGS = {
    "cpu-float64-sgd": ("cpu", "float64", "sgd", 301),
    "cpu-float32-sgd": ("cpu", "float32", "sgd", 301),
    "cpu-float64-adam": ("cpu", "float64", "adam", 301),
    "cpu-float64-tail1": ("cpu", "float64", "sgd", 257),  # last batch: 1 image for 2 ranks
    "torch-float64-sgd": ("torch:cpu", "float64", "sgd", 301),
    "torch-float32-sgd": ("torch:cpu", "float32", "sgd", 301),
    # augmentation: each rank draws the crops and flips of the whole global batch, keeps its own
    "cpu-float64-augment": ("cpu", "float64", "sgd", 301, "crop2+flip"),
    "torch-float64-augment": ("torch:cpu", "float64", "sgd", 301, "crop2+flip"),
    "cpu-float64-tail1-augment": ("cpu", "float64", "sgd", 257, "crop2+flip"),
    # dropout, uncompiled: each rank draws the whole global batch's mask, keeps its own rows
    "cpu-float64-dropout": ("cpu", "float64", "sgd", 301, None, "dropout"),
    "torch-float32-dropout": ("torch:cpu", "float32", "sgd", 301, None, "dropout"),
    "cpu-float64-tail1-dropout": ("cpu", "float64", "sgd", 257, None, "dropout"),
}
# every step the same shapes (2 x 64 images): one trace of each compiled half per rank
JAX_CONFIGS = {"jax-float64-sgd-compiled": ("jax:cpu", "float64", "sgd", 256)}
GPU_CONFIG = ("float32", "sgd", 301)  # with the device in front


@functools.cache
def subset(train, test=101):
    """The first ``train``/``test`` images of the embedded digits (odd counts: uneven shards)."""
    d = datasets.load("mnist-5k")
    return datasets.Dataset(
        "subset", d.train_images[:train], d.train_labels[:train], d.test_images[:test],
        d.test_labels[:test], d.source,
    )  # fmt: skip


def run_config(name, config, **kw):
    """`xpcnn.train` for one of `CONFIGS`: 2 epochs at global batch 128."""
    device, dtype, optimizer, train, *extra = config
    augment, model = (*extra, None, None)[:2]
    if model == "dropout":
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 32),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(32, 10),
            dtype=dtype,
        )
        model.reset_parameters(3)
    else:
        model = nn.SimpleCNN(seed=3, dtype=dtype)
    return T.train(
        model, device=device, dataset=subset(train), epochs=2, batch_size=128,
        optimizer=optimizer, seed=3, progress=False, augment=augment, **kw,
    )  # fmt: skip


def save(out, name, result):
    rank = xpcnn.distributed._world.rank if xpcnn.distributed._world else 0
    np.savez(out / f"{name}-rank{rank}.npz", **result.model.state_dict())
    (out / f"{name}-rank{rank}.json").write_text(
        json.dumps({"history": result.history, "notes": result.notes})
    )


def equivalence(out, jax=False):
    for name, config in (JAX_CONFIGS if jax else CONFIGS).items():
        result = run_config(name, config)
        if config[0].startswith("jax"):
            assert result.step.compiled, "the jax step should be compiled"
        save(out, name, result)


def resume(out):
    rank = xpcnn.distributed.detect().rank
    config = CONFIGS["cpu-float32-sgd"]
    save(out, "full", run_config("full", config))
    calls = {"n": 0}
    real = TrainStep.gradients

    def interrupting(self, *args):
        calls["n"] += 1
        if calls["n"] == 5 and rank == 0:  # epoch 2, step 2; only rank 0 gets the signal
            signal.raise_signal(signal.SIGINT)
        return real(self, *args)

    TrainStep.gradients = interrupting
    path = out / "run.ckpt"
    record = {}
    try:
        run_config("interrupted", config, checkpoint=path)
    except T.TrainingInterrupted as exc:
        record = {"message": str(exc), "calls": calls["n"]}
    TrainStep.gradients = real
    if rank == 0:
        (out / "interrupted.ckpt").write_bytes(path.read_bytes())
    (out / f"interrupted-rank{rank}.json").write_text(json.dumps(record))
    save(out, "resumed", run_config("resumed", config, checkpoint=path, resume=True))

    real_loss = S.cross_entropy
    calls["n"] = 0

    def poisoned(logits, labels):
        calls["n"] += 1
        loss, grad = real_loss(logits, labels)
        return (loss * float("nan"), grad) if calls["n"] == 4 and rank == 1 else (loss, grad)

    S.cross_entropy = poisoned
    try:
        run_config("diverged", config)
        record = {}
    except T.TrainingDiverged as exc:
        record = {"message": str(exc)}
    (out / f"diverged-rank{rank}.json").write_text(json.dumps(record))


def fail(out):
    rank = xpcnn.distributed.detect().rank
    try:
        run_config("start", ("no-such-device" if rank == 1 else "cpu", "float32", "sgd", 64))
        record = {}
    except Exception as exc:
        record = {"type": type(exc).__name__, "message": str(exc)}
    (out / f"start-rank{rank}.json").write_text(json.dumps(record))
    calls = {"n": 0}
    real = TrainStep.gradients

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 3 and rank == 1:
            raise RuntimeError("injected failure")
        return real(self, *args)

    TrainStep.gradients = failing
    run_config("fail", CONFIGS["cpu-float32-sgd"])
    (out / f"fail-finished-rank{rank}").write_text("a rank finished: the failure did not stop it")


class _Pid(T.Hook):
    def __init__(self, out):
        self.out = out

    def refresh(self, run, seen, loss, accuracy):
        path = self.out / f"pid-rank{run.world.rank}"
        if not path.exists():
            path.write_text(str(os.getpid()))


def long(out):
    T.REFRESH_SECONDS = 0.0  # refresh (and so write the pid) from the first step
    T.train(dataset=subset(1024), epochs=1000, batch_size=32, progress=False, hooks=[_Pid(out)])


def gpu(out, devices):
    for device in devices:
        result = run_config(device, (device, *GPU_CONFIG))
        save(out, device.replace(":", "-"), result)


if __name__ == "__main__":
    scenario, out = sys.argv[1], pathlib.Path(sys.argv[2])
    t0 = time.perf_counter()
    if scenario == "equivalence":
        equivalence(out, jax="--jax" in sys.argv)
    elif scenario == "gpu":
        gpu(out, sys.argv[3:])
    else:
        {"resume": resume, "fail": fail, "long": long}[scenario](out)
