"""The trainer: `train` and `evaluate`, with device-resident data, a progress bar, checkpoints,
resume, divergence detection and a clean Ctrl-C.

Data path: the uint8 images go to the device once; each batch is gathered there with ``take`` and
scaled to the model's dtype there. The shuffle order is drawn on the host from the user's seed and
uploaded once per epoch. Loss and accuracy are summed on the device and read back only when the
progress bar refreshes (`HostSync` counts every read-back).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint as ckpt
from . import datasets as ds
from . import nn
from ._namespace import array_namespace
from .backends import get_backend, to_numpy
from .functional import cross_entropy
from .optim import make_optimizer

__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted", "evaluate", "train"]

DEFAULTS = {  # chosen with benchmarks/sweep_defaults.py (results in docs/training.md)
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "adam": {"lr": 1e-3},
}
DEFAULT_EPOCHS = 15
SCHEDULES = {  # learning-rate factor as a function of the fraction of training done
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
    "constant": lambda t: 1.0,
}
INTERRUPT_PATH = "xpcnn-interrupted.ckpt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and step."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: a checkpoint was saved to ``self.checkpoint`` first."""

    def __init__(self, message, checkpoint):
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    """What `train` returns: the trained model, per-epoch history, the optimizer and backend."""

    model: nn.Module
    history: list = field(default_factory=list)
    optimizer: object = None
    backend: object = None
    host_syncs: int = 0  # device-to-host read-backs during training (see HostSync)


@dataclass
class EvalResult:
    """What `evaluate` returns: mean cross-entropy, accuracy in [0, 1], number of images."""

    loss: float
    accuracy: float
    count: int


class HostSync:
    """Reads device scalars back to the host and counts how often it had to."""

    def __init__(self):
        self.count = 0

    def read(self, *arrays):
        """Python floats of 0-d device arrays (the first one's dtype), stacked on the device
        and copied back in one counted transfer: one synchronisation, not one per value."""
        self.count += 1
        xp = array_namespace(arrays[0])
        packed = xp.stack([xp.astype(a, arrays[0].dtype) for a in arrays])
        return [float(v) for v in to_numpy(packed)]


def _dataset(dataset):
    return dataset if isinstance(dataset, ds.Dataset) else ds.load(dataset)


class DeviceData:
    """One split of a dataset on the device: uint8 images (N, 1, H, W) and integer labels."""

    def __init__(self, backend, images, labels):
        self.backend = backend
        self.images = backend.asarray(images[:, None, :, :], "uint8")
        self.labels = backend.asarray(labels, "int64")
        self.count = int(images.shape[0])

    def batch(self, index, dtype):
        """Images scaled to [0, 1] in ``dtype`` and labels, for a device index array."""
        xp = self.backend.xp
        x = xp.take(self.images, index, axis=0)
        x = xp.astype(x, self.backend.dtype(dtype)) / 255.0
        return x, xp.take(self.labels, index, axis=0)

    def slice(self, start, stop, dtype):
        """Images ``start:stop`` scaled to [0, 1] in ``dtype``, and their labels."""
        xp = self.backend.xp
        x = xp.astype(self.images[start:stop, ...], self.backend.dtype(dtype)) / 255.0
        return x, self.labels[start:stop]


def _accuracy_sum(logits, labels):
    xp = array_namespace(logits)
    return xp.sum(xp.astype(xp.argmax(logits, axis=1) == labels, logits.dtype))


def _evaluate_on(model, data, batch_size, sync):
    """Mean loss and accuracy of ``model`` over ``data`` in chunks (bounded memory)."""
    if data.count == 0:
        raise ValueError("the test set is empty: nothing to evaluate")
    was_training = model.training
    model.eval()
    loss_sum = correct = 0.0
    try:
        for start in range(0, data.count, batch_size):
            x, y = data.slice(start, min(start + batch_size, data.count), model.dtype)
            logits = model(x)
            loss, _ = cross_entropy(logits, y)
            loss_sum = loss_sum + loss * x.shape[0]
            correct = correct + _accuracy_sum(logits, y)
    finally:
        model.train(was_training)
    loss_total, correct_total = sync.read(loss_sum, correct)
    return EvalResult(loss_total / data.count, correct_total / data.count, data.count)


def evaluate(model, dataset="mnist-5k", device=None, batch_size=1000):
    """Loss and accuracy of ``model`` on the test split of ``dataset`` (name, path or Dataset).

    Runs on ``device`` if given (the model is moved there), else on the model's own backend.
    Returns an `EvalResult`. Raises `xpcnn.datasets.DatasetError` for a missing or corrupt
    dataset and `xpcnn.backends.BackendUnavailable` for an unusable device.
    """
    if device is not None:
        model.to(device)
    data = _dataset(dataset)
    test = DeviceData(model.backend, data.test_images, data.test_labels)
    return _evaluate_on(model, test, batch_size, HostSync())


class _InterruptFlag:
    """Turns the first Ctrl-C into a flag checked between steps (so a save never sees a
    half-updated model); a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _check_model(model, data):
    h, w = data.train_images.shape[1:]
    try:
        probe = model.backend.asarray(np.zeros((1, 1, h, w)), model.dtype)
        was = model.training
        out = model.eval()(probe)
        model.train(was)
    except ValueError as exc:
        raise ValueError(
            f"model does not fit dataset {data.name!r} ({h}x{w} images): {exc}"
        ) from None
    if out.ndim != 2 or out.shape[1] < data.num_classes:
        raise ValueError(
            f"model outputs shape {tuple(out.shape)} per image, dataset "
            f"{data.name!r} has {data.num_classes} classes"
        )


def _save(path, model, optimizer, meta):
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    config, opt_arrays = optimizer.state_dict()
    arrays.update({f"optim/{k}": model.backend.to_host(v) for k, v in opt_arrays.items()})
    ckpt.save(path, arrays, dict(meta, model=model.config(), dtype=model.dtype, optimizer=config))


def load_checkpoint(path, device="cpu"):
    """Rebuild the model stored in a checkpoint, with its weights, on ``device``.
    Returns ``(model, meta)``; raises `xpcnn.checkpoint.CheckpointError` for a file that is
    missing, corrupt, or whose weights do not fit its architecture."""
    arrays, meta = ckpt.load(path)
    try:
        model = nn.build(meta["model"], dtype=meta["dtype"], device=device)
        model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model/")})
    except (KeyError, ValueError, TypeError) as exc:
        raise ckpt.CheckpointError(f"{path}: model does not match its weights: {exc}") from None
    return model, meta


def train(
    model=None,
    *,
    device="cpu",
    dataset="mnist-5k",
    epochs=None,
    batch_size=128,
    optimizer="sgd",
    lr=None,
    momentum=None,
    weight_decay=None,
    seed=0,
    checkpoint=None,
    resume=False,
    progress=True,
    input_grad=None,
    eval_batch_size=1000,
    schedule=None,
):
    """Train ``model`` (default: a fresh ``SimpleCNN(seed=seed)``) and return a `TrainResult`.

    ``dataset`` is a name (``"mnist-5k"``, ``"fashion-mnist"``, ``"mnist"``), a directory of IDX
    files or a `Dataset`. ``optimizer`` is ``"sgd"`` (default lr 0.1, momentum 0.9) or
    ``"adam"`` (lr 1e-3). ``epochs`` is the total to reach (default 15), also when resuming;
    a resumed run keeps the saved optimizer settings except those passed explicitly.
    ``schedule="cosine"`` (the default; a resumed run keeps its saved one) lowers the learning
    rate from ``lr`` to 0 along a half cosine over all steps; ``"constant"`` keeps it.
    With ``checkpoint`` set, a checkpoint is written atomically after every epoch; with
    ``resume=True`` training continues from it, exactly where it stopped (mid-epoch after a
    Ctrl-C), and ends with the weights an uninterrupted run would have.
    ``seed`` draws the initial weights (when ``model`` is None) and the shuffle order;
    ``progress`` shows a tqdm bar per epoch (False: one plain line per epoch); ``input_grad``
    overrides the convolutions' input-gradient method; ``eval_batch_size`` bounds the memory of
    the per-epoch test evaluation.
    Raises `TrainingDiverged` on a non-finite loss (the last checkpoint stays intact),
    `TrainingInterrupted` after saving a checkpoint on Ctrl-C, ValueError for bad arguments,
    `xpcnn.checkpoint.CheckpointError`, `xpcnn.datasets.DatasetError` and
    `xpcnn.backends.BackendUnavailable` for unusable checkpoints, data or devices.
    """
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    for name, value in (
        ("epochs", epochs),
        ("batch_size", batch_size),
        ("eval_batch_size", eval_batch_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if optimizer not in DEFAULTS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(DEFAULTS)}")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=PATH")
    backend = get_backend(device)
    data = _dataset(dataset)
    if optimizer == "adam" and momentum is not None:
        raise ValueError("momentum applies to sgd; Adam's are its betas")
    explicit = {
        k: v
        for k, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay))
        if v is not None
    }
    hyper = dict(DEFAULTS[optimizer], **explicit)

    meta = None
    if resume:
        arrays, meta = ckpt.load(checkpoint)
        if model is None:
            model = nn.build(meta["model"], dtype=meta["dtype"])
        if model.config() != meta["model"] or model.dtype != meta["dtype"]:
            raise ckpt.CheckpointError(
                f"{checkpoint}: saved for {meta['model']['type']} ({meta['dtype']}), "
                f"cannot resume into {model.config()['type']} ({model.dtype})"
            )
        model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model/")})
    elif model is None:
        model = nn.SimpleCNN(num_classes=data.num_classes, seed=seed)
    model.to(backend).train()
    if input_grad is not None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.input_grad = input_grad
    _check_model(model, data)
    opt = make_optimizer(optimizer, model.parameters(), **hyper)

    rng = np.random.default_rng(seed)
    history, start_epoch, start_step, partial = [], 0, 0, None
    if meta is not None:
        opt_arrays = {k[6:]: v for k, v in arrays.items() if k.startswith("optim/")}
        try:
            opt.load_state_dict(
                meta["optimizer"], opt_arrays, lambda a: backend.asarray(a, model.dtype)
            )
        except (ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(
                f"{checkpoint}: optimizer state does not fit: {exc}"
            ) from None
        opt.hyper.update(explicit)  # what the caller asked for now beats what was saved
        opt.hyper["lr"] = explicit.get("lr", meta["base_lr"])
        schedule = schedule or meta["schedule"]
        rng.bit_generator.state = meta["rng_state"]
        history, start_epoch = list(meta["history"]), meta["epoch"]
        start_step, partial = meta["step"], meta.get("partial")
    schedule = schedule or "cosine"

    train_data = DeviceData(backend, data.train_images, data.train_labels)
    test_data = DeviceData(backend, data.test_images, data.test_labels)
    result = TrainResult(model, history, opt, backend)
    sync = HostSync()
    run = _EpochRunner(
        model, opt, train_data, batch_size, sync, progress, epochs, SCHEDULES[schedule]
    )
    with _InterruptFlag() as interrupt, backend.activate():
        for epoch in range(start_epoch, epochs):
            rng_at_epoch_start = rng.bit_generator.state
            order = backend.asarray(rng.permutation(train_data.count), "int64")
            resumed = (start_step, partial) if epoch == start_epoch else (0, None)
            row = run(epoch, order, resumed, interrupt)
            if row is None:  # Ctrl-C: save the exact mid-epoch state, then stop
                path = checkpoint or INTERRUPT_PATH
                _save(
                    path,
                    model,
                    opt,
                    {
                        "epoch": epoch,
                        "step": run.step,
                        "base_lr": run.base_lr,
                        "schedule": schedule,
                        "rng_state": rng_at_epoch_start,
                        "history": history,
                        "partial": run.partial,
                    },
                )
                result.host_syncs = sync.count
                raise TrainingInterrupted(
                    f"interrupted at epoch {epoch + 1}, step {run.step}; checkpoint saved to "
                    f"{path}; continue with: xpcnn train --resume --checkpoint {path} "
                    "(or train(..., checkpoint=path, resume=True))",
                    path,
                )
            if row == "diverged":
                where = f" ({os.fspath(checkpoint)})" if checkpoint else ""
                raise TrainingDiverged(
                    f"loss became non-finite at epoch {epoch + 1}, step {run.bad_step} of "
                    f"{run.steps}; the last checkpoint{where} is intact; try a lower learning "
                    f"rate than lr={run.base_lr}"
                )
            test = _evaluate_on(model, test_data, eval_batch_size, sync)
            row.update(test_loss=test.loss, test_accuracy=test.accuracy)
            history.append(row)
            _report(progress, row, epochs)
            if checkpoint:
                _save(
                    checkpoint,
                    model,
                    opt,
                    {
                        "epoch": epoch + 1,
                        "step": 0,
                        "base_lr": run.base_lr,
                        "schedule": schedule,
                        "rng_state": rng.bit_generator.state,
                        "history": history,
                        "partial": None,
                    },
                )
    result.host_syncs = sync.count
    return result


class _EpochRunner:
    """One pass over the training set in the given order, from a given step."""

    REFRESH_SECONDS = 0.5  # progress-bar refresh, and so host read-back, interval

    def __init__(self, model, opt, data, batch_size, sync, progress, epochs, schedule):
        self.model, self.opt, self.data, self.batch_size = model, opt, data, batch_size
        self.sync, self.progress, self.epochs = sync, progress, epochs
        self.steps = math.ceil(data.count / batch_size)
        self.base_lr, self.schedule = opt.hyper["lr"], schedule

    def __call__(self, epoch, order, resumed, interrupt):
        """Returns the epoch's stats, None if interrupted, or "diverged"."""
        model, data, bs, steps = self.model, self.data, self.batch_size, self.steps
        backend = data.backend
        xp = backend.xp
        start, partial = resumed
        loss_sum = xp.zeros((), dtype=backend.dtype(model.dtype), device=backend.device)
        correct = xp.zeros_like(loss_sum)
        first_bad = xp.full((), steps, dtype=xp.int64, device=backend.device)
        done = min(start * bs, data.count)  # images already trained on (resume)
        if partial:
            loss_sum += partial["loss_sum"]
            correct += partial["correct"]
        bar = _progress_bar(self.progress, epoch, self.epochs, data.count, done)
        shown, t0 = done, time.perf_counter()
        last_refresh = t0
        for step in range(start, steps):
            x, y = data.batch(order[step * bs : min((step + 1) * bs, data.count)], model.dtype)
            logits = model(x)
            loss, grad = cross_entropy(logits, y)
            model.backward(grad, need_input_grad=False)
            progress_ = (epoch * steps + step) / (self.epochs * steps)
            self.opt.hyper["lr"] = self.base_lr * self.schedule(progress_)
            self.opt.step()
            loss_sum += loss * x.shape[0]
            correct += _accuracy_sum(logits, y)
            first_bad = xp.where(~xp.isfinite(loss) & (first_bad == steps), step, first_bad)
            now = time.perf_counter()
            if step == steps - 1 or interrupt.set or now - last_refresh >= self.REFRESH_SECONDS:
                total, right, bad = self.sync.read(loss_sum, correct, first_bad)
                seen = min((step + 1) * bs, data.count)
                if bad < steps:
                    self.bad_step = int(bad) + 1
                    _close(bar)
                    return "diverged"
                if bar:
                    bar.update(seen - shown)
                    bar.set_postfix(loss=f"{total / seen:.4f}", acc=f"{right / seen:.3f}")
                shown, last_refresh = seen, now
                if interrupt.set:
                    self.step, self.partial = step + 1, {"loss_sum": total, "correct": right}
                    _close(bar)
                    return None
        seconds = time.perf_counter() - t0
        _close(bar)
        return {
            "epoch": epoch + 1,
            "train_loss": total / data.count,
            "train_accuracy": right / data.count,
            "seconds": seconds,
            "images_per_second": (data.count - done) / seconds,
        }


def _close(bar):
    if bar:
        bar.close()


def _progress_bar(progress, epoch, epochs, total, initial):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=f"epoch {epoch + 1}/{epochs}",
        unit="img",
        unit_scale=True,
        leave=False,
        dynamic_ncols=True,
    )


def _report(progress, row, epochs):
    line = (
        f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} "
        f"acc {row['train_accuracy']:.4f}  test loss {row['test_loss']:.4f} "
        f"acc {row['test_accuracy']:.4f}  {row['seconds']:.1f}s "
        f"{row['images_per_second']:.0f} img/s"
    )
    if progress:
        from tqdm import tqdm

        tqdm.write(line)
    else:
        print(line, flush=True)
