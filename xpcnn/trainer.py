"""The trainer: `train` and `evaluate`. A loop over `xpcnn.step.TrainStep`, with the progress
display, checkpoints and Ctrl-C as plain hooks (`Hook`).

Data path: the uint8 images go to the device once; each batch is gathered there with ``take`` and
scaled to the model's dtype there. The shuffle order is drawn on the host from the user's seed and
uploaded once per epoch. Each step's loss and correct count are written into per-epoch device
arrays and read back only when the progress display refreshes (`HostSync` counts every
read-back), together with a finiteness flag, so a diverging run stops at the refresh after the
first non-finite loss, naming that step.

Nothing is lost: no checkpoint is ever written holding non-finite weights or optimizer state,
a run never ends normally with a non-finite loss, and a resume that cannot continue exactly is
refused with the value that differs (or, where it is well defined, allowed and said so).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from . import augment as aug
from . import checkpoint as ckpt
from . import datasets as ds
from . import distributed as _dist
from . import nn
from . import random as device_random
from ._namespace import array_namespace
from .backends import Backend, get_backend, to_numpy
from .conv import INPUT_GRAD_METHODS
from .functional import correct_count, cross_entropy
from .optim import make_optimizer
from .step import TrainStep, predict_function
from .workers import auto_count as auto_workers
from .workers import check_count as check_workers

__all__ = [
    "DeviceData",
    "EvalResult",
    "HostSync",
    "Hook",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate",
    "load_checkpoint",
    "train",
    "train_epoch",
]

DEFAULTS = {  # SGD's from benchmarks/sweep_defaults.py (docs/training.md); Adam's the usual 1e-3
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "adam": {"lr": 1e-3},
}
DEFAULT_EPOCHS = 15
SCHEDULES = {  # learning-rate factor as a function of the fraction of training done
    "cosine": lambda t: 0.5 * (1.0 + math.cos(math.pi * t)),
    "constant": lambda t: 1.0,
}
INTERRUPT_PATH = "xpcnn-interrupted.ckpt"
REFRESH_SECONDS = 0.5  # progress refresh, and so host read-back, interval


class TrainingDiverged(RuntimeError):
    """The loss, the weights or the optimizer state became NaN or infinite; the message names
    the epoch and step and the last good checkpoint, if any."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: a checkpoint was saved to ``self.checkpoint`` first."""

    def __init__(self, message, checkpoint):
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass
class TrainResult:
    """What `train` returns: the trained model, per-epoch history, the optimizer, the backend,
    the step (``step.compiled`` says whether it was compiled) and the notes the run printed."""

    model: nn.Module
    history: list = field(default_factory=list)
    optimizer: object = None
    backend: Backend | None = None
    host_syncs: int = 0  # device-to-host read-backs during training (see HostSync)
    step: TrainStep | None = None
    notes: list = field(default_factory=list)


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

    def read(self, *arrays) -> list[float]:
        """Python floats of 0-d device arrays (the first one's dtype), stacked on the device
        and copied back in one counted transfer: one synchronisation, not one per value."""
        self.count += 1
        xp = array_namespace(arrays[0])
        packed = xp.stack([xp.astype(a, arrays[0].dtype) for a in arrays])
        return [float(v) for v in to_numpy(packed)]


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _dataset(dataset) -> ds.Dataset:
    if isinstance(dataset, ds.Dataset):
        return dataset
    if not isinstance(dataset, str | os.PathLike):
        raise TypeError(
            f"dataset must be a name, a directory or an xpcnn.datasets.Dataset, got "
            f"{type(dataset).__name__}"
        )
    return ds.load(dataset)


def _check_module(model, argument="model"):
    if not isinstance(model, nn.Module):
        kind = type(model).__module__.split(".")[0]
        hint = (
            " (convert a torch.nn model with xpcnn.interop.from_torch)" if kind == "torch" else ""
        )
        raise TypeError(f"{argument} must be an xpcnn Module, got {type(model).__name__}{hint}")


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


def _check_outputs(model, data):
    """The model must take the dataset's images and have an output per class."""
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
            f"model outputs shape {tuple(out.shape)} per batch, but dataset {data.name!r} "
            f"has {data.num_classes} classes: the model needs one output per class"
        )


def _evaluate_on(model, data, batch_size, sync, extra=(), forward=None, reduce=None):
    """Mean loss and accuracy of ``model`` over ``data`` in chunks (bounded memory); ``extra``
    device scalars are read back in the same transfer and returned after them. ``forward``
    (default ``model.forward``) maps a batch to logits: the trainer passes the compiled
    `xpcnn.step.predict_function` where the step is compiled. ``reduce`` (data-parallel runs)
    sums (loss, correct, count) of this rank's shard over all ranks."""
    if data.count == 0:
        raise ValueError("the test set is empty: nothing to evaluate")
    was_training = model.training
    model.eval()
    loss_sum = correct = 0.0
    try:
        with model.backend.activate():
            for start in range(0, data.count, batch_size):
                x, y = data.slice(start, min(start + batch_size, data.count), model.dtype)
                logits = (forward or model.forward)(x)
                loss, _ = cross_entropy(logits, y)
                loss_sum = loss_sum + loss * x.shape[0]
                correct = correct + correct_count(logits, y)
    finally:
        model.train(was_training)
    loss_total, correct_total, *rest = sync.read(loss_sum, correct, *extra)
    count = data.count
    if reduce is not None:  # xpcnn.distributed: every rank's shard
        loss_total, correct_total, count = reduce(loss_total, correct_total, count)
    return EvalResult(loss_total / count, correct_total / count, count), rest


def evaluate(
    model, dataset="mnist-5k", device=None, batch_size=1000, workers: int | str = "auto"
) -> EvalResult:
    """Loss and accuracy of ``model`` on the test split of ``dataset`` (name, path or Dataset).

    Runs on ``device`` if given (the model is moved there), else on the model's own backend;
    ``workers`` threads share each batch (`xpcnn.workers`; ``"auto"``: the backend's default,
    one per BLAS thread on NumPy). Returns an `EvalResult`. Raises ValueError for a model
    without an output per class or a bad ``batch_size`` or ``workers``,
    `xpcnn.datasets.DatasetError` for a missing or corrupt dataset and
    `xpcnn.backends.BackendUnavailable` for an unusable device.
    """
    _check_module(model)
    _positive_int("batch_size", batch_size)
    check_workers(workers)
    if device is not None:
        model.to(device)
    data = _dataset(dataset)
    _check_outputs(model, data)
    test = DeviceData(model.backend, data.test_images, data.test_labels)
    forward = predict_function(model, workers=workers)  # "auto": the backend's default
    return _evaluate_on(model, test, batch_size, HostSync(), forward=forward)[0]


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


# --- checkpoints ----------------------------------------------------------------------------------


def dataset_identity(data) -> dict:
    """What a checkpoint records of its dataset: name, sizes, image shape, labels digest."""
    return {
        "name": str(data.name),
        "train": int(len(data.train_labels)),
        "test": int(len(data.test_labels)),
        "image_shape": [int(s) for s in data.train_images.shape[1:]],
        "num_classes": int(data.num_classes),
        "labels_sha256": ds.labels_digest(data),
    }


def _all_finite(host_arrays):
    return all(np.isfinite(a).all() for a in host_arrays if a.dtype.kind == "f")


def _save(path, run, meta):
    """Write a checkpoint of ``run`` (refusing non-finite state) and return the path."""
    model, opt = run.model, run.optimizer
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    config, opt_arrays = opt.state_dict()
    arrays.update({f"optim/{k}": model.backend.to_host(v) for k, v in opt_arrays.items()})
    if not _all_finite(arrays.values()):
        raise TrainingDiverged(
            f"weights or optimizer state became non-finite by epoch {meta['epoch'] + 1}, "
            f"step {meta['step']}, not saving them; {run.last_good_text()}"
        )
    from . import __version__

    def write():
        ckpt.save(
            path,
            arrays,
            dict(
                meta,
                model=model.config(),
                dtype=model.dtype,
                optimizer=config,
                run=run.identity(),
                xpcnn=__version__,
            ),
        )

    if run.world is None:
        write()
    else:  # data-parallel: rank 0 writes, every rank returns once the file is complete
        run.world.leader_writes(write)
    return path


def load_checkpoint(path, device="cpu"):
    """Rebuild the model stored in a checkpoint, with its weights, on ``device``.

    Returns ``(model, meta)``. The model is first built without drawing or allocating any
    weights (`xpcnn.init.deferred`), so a config that does not match the file's arrays is
    refused before it can cost memory. Raises `xpcnn.checkpoint.CheckpointError` for a file that
    is missing, corrupt, or whose weights do not fit its architecture."""
    arrays, meta = ckpt.load(path)
    model = _model_from(path, arrays, meta, device)
    return model, meta


def _model_from(path, arrays, meta, device):
    config = ckpt.require(meta, path, "model", "dict")
    dtype = ckpt.require(meta, path, "dtype", nn.DTYPES)
    weights = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
    from . import init

    try:
        with init.deferred():
            model = nn.build(config, dtype=dtype, device=device)
        model.load_state_dict(weights)
    except (KeyError, ValueError, TypeError) as exc:
        raise ckpt.CheckpointError(f"{path}: model does not match its weights: {exc}") from None
    return model


# --- the run -------------------------------------------------------------------------------------


class _Run:
    """Everything one call of `train` works with, validated; `train` builds it, the loop and
    the hooks read it."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def identity(self) -> dict:
        """What a checkpoint records so that a resume can check it continues the same run."""
        return {
            "batch_size": self.batch_size,
            "dataset": self.dataset_id,
            "input_grad": sorted(
                {m.input_grad for m in self.model.modules() if isinstance(m, nn.Conv2d)}
            ),
            "compiled": bool(self.step.compiled),
            "device": self.backend.name,
            "seed": self.seed,
            "world_size": 1 if self.world is None else self.world.size,
            "workers": 1 if self.step.workers is None else self.step.workers.count,
            "augment": self.augment.spec,
        }

    def last_good_text(self) -> str:
        if self.last_good is None:
            return (
                "no checkpoint was written (pass checkpoint=PATH or --checkpoint PATH to keep one)"
            )
        path, epoch = self.last_good
        return f"the last good checkpoint is {path} (epoch {epoch})"


class Hook:
    """Something the training loop calls at fixed points; override what you need.

    ``refresh`` runs each time the loop reads progress back from the device (about twice a
    second, and at the end of each epoch), ``epoch_end`` after each epoch's evaluation.
    """

    def start(self, run) -> None:
        """Before the first epoch."""

    def epoch_start(self, run, epoch: int, done: int) -> None:
        """At the start of an epoch (``done`` images already trained on, when resuming)."""

    def refresh(self, run, seen: int, loss: float, accuracy: float) -> None:
        """Progress within the current epoch: images seen, mean loss and accuracy so far."""

    def epoch_end(self, run, row: dict) -> None:
        """After an epoch's test evaluation; ``row`` is its history entry."""

    def close(self, run) -> None:
        """When the loop ends, normally or not."""


class Progress(Hook):
    """A tqdm bar per epoch (``bar=True``) or one plain line per epoch; notes either way."""

    def __init__(self, bar, stream=None):
        self.bar, self.stream, self._bar = bar, stream, None

    def write(self, line):
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream or sys.stdout, flush=True)

    def epoch_start(self, run, epoch, done):
        if self.bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=run.train.count,
                initial=done,
                desc=f"epoch {epoch + 1}/{run.epochs}",
                unit="img",
                unit_scale=True,
                leave=False,
                dynamic_ncols=True,
                file=self.stream,
            )
            self._shown = done

    def refresh(self, run, seen, loss, accuracy):
        if self._bar is not None:
            self._bar.update(seen - self._shown)
            self._bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}")
            self._shown = seen

    def epoch_end(self, run, row):
        self.write(
            f"epoch {row['epoch']}/{run.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:.4f}  test loss {row['test_loss']:.4f} "
            f"acc {row['test_accuracy']:.4f}  {row['seconds']:.1f}s "
            f"{row['images_per_second']:.0f} img/s"
        )
        self.close(run)

    def close(self, run):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Checkpoints(Hook):
    """Writes a checkpoint after every epoch (atomically; never one with non-finite state)."""

    def __init__(self, path):
        self.path = path

    def epoch_end(self, run, row):
        _save(self.path, run, run.position(row["epoch"], 0, None))
        run.last_good = (os.fspath(self.path), row["epoch"])


def _resume_checks(run, meta, path, explicit_batch):
    """Refuse a resume that cannot continue the saved run, or note what differs."""
    saved = meta.get("run")
    if not isinstance(saved, dict):
        raise ckpt.CheckpointError(
            f"{path}: written by xpcnn {meta.get('xpcnn', '0.1')}, which did not record what "
            "an exact resume depends on; start a new run (evaluate still reads it)"
        )
    notes = []
    if saved.get("dataset") != run.dataset_id:
        raise ckpt.CheckpointError(
            f"{path}: saved while training on dataset {_describe(saved.get('dataset'))}, "
            f"cannot resume on {_describe(run.dataset_id)}"
        )
    saved_batch = saved.get("batch_size")
    if not isinstance(saved_batch, int) or isinstance(saved_batch, bool) or saved_batch < 1:
        raise ckpt.CheckpointError(f"{path}: metadata field 'run.batch_size' is malformed")
    if not explicit_batch:
        run.batch_size = saved_batch
    elif saved_batch != run.batch_size:
        if run.start_step > 0:
            raise ckpt.CheckpointError(
                f"{path}: saved mid-epoch (epoch {run.start_epoch + 1}, step {run.start_step}) "
                f"at batch size {saved_batch}; resume with batch size {saved_batch} "
                "(--batch-size), or from an end-of-epoch checkpoint"
            )
        notes.append(
            f"batch size {saved_batch} -> {run.batch_size} at an epoch boundary: training "
            "continues, not bit-identical to the original run"
        )
    current = run.identity()
    for key, what in (
        ("input_grad", "input-gradient method"),
        ("compiled", "compiled step"),
        ("device", "device"),
        ("augment", "augmentation"),
        ("workers", "number of worker threads"),
    ):
        old = current[key] if key == "augment" else 1 if key == "workers" else None
        if saved.get(key, old) != current[key]:
            notes.append(
                f"{what} {saved.get(key, old)} -> {current[key]}: the same math, rounded "
                "differently, so not bit-identical to the original run"
            )
    saved_world = saved.get("world_size", 1)
    if saved_world != current["world_size"]:  # each step is the same global batch either way
        notes.append(
            f"number of MPI ranks {saved_world} -> {current['world_size']}: the same global "
            "batches and math, rounded differently, so not bit-identical to the original run"
        )
    from . import __version__

    if meta.get("xpcnn") != __version__:
        notes.append(f"checkpoint written by xpcnn {meta.get('xpcnn')}, this is {__version__}")
    return notes


def _describe(identity):
    if not isinstance(identity, dict):
        return repr(identity)
    return (
        f"{identity.get('name')!r} ({identity.get('train')} train / {identity.get('test')} "
        f"test images, labels sha256 {str(identity.get('labels_sha256'))[:12]})"
    )


def train(
    model=None,
    *,
    device="cpu",
    dataset="mnist-5k",
    epochs=None,
    batch_size=None,
    optimizer=None,
    lr=None,
    momentum=None,
    weight_decay=None,
    seed=0,
    checkpoint=None,
    resume=False,
    progress=None,
    input_grad=None,
    eval_batch_size=1000,
    schedule=None,
    compile=None,
    hooks=(),
    augment=None,
    distributed=None,
    workers: int | str = "auto",
) -> TrainResult:
    """Train ``model`` (default: a fresh ``SimpleCNN(seed=seed)``) and return a `TrainResult`.

    ``model`` is an xpcnn Module, the name of a zoo model (``"simplecnn"``, ``"lenet5"``,
    ``"minivgg"``: `xpcnn.models`, built fresh from ``seed``) or the path of a JSON model
    config; a zoo model's recipe (`xpcnn.models.Recipe`) supplies every training argument
    left at None, whether the model is given by name, as a config or as an object of a zoo
    class (any other model gets SimpleCNN's). ``augment`` is data augmentation on the
    device (`xpcnn.augment.parse`: ``"crop+flip"``, ``"crop4"``, ``"flip"``, a dict, or
    ``"none"``; default none, or the checkpoint's on resume); its random numbers, like
    dropout's, come from a device generator (`xpcnn.random`) seeded from ``seed`` and saved in
    checkpoints.

    ``dataset`` is a name (``"mnist-5k"``, ``"fashion-mnist"``, ``"mnist"``), a directory of IDX
    files or a `Dataset`. ``optimizer`` is ``"sgd"`` (default lr 0.1, momentum 0.9) or
    ``"adam"`` (lr 1e-3). ``epochs`` is the total to reach (default 15), also when resuming;
    ``batch_size`` defaults to 128 (on resume, the checkpoint's). A resumed run keeps the saved
    optimizer settings except those passed explicitly.
    ``schedule="cosine"`` (the default; a resumed run keeps its saved one) lowers the learning
    rate from ``lr`` to 0 along a half cosine over all steps; ``"constant"`` keeps it.
    With ``checkpoint`` set, a checkpoint is written atomically after every epoch (the
    destination is checked writable first); with ``resume=True`` training continues from it,
    exactly where it stopped (mid-epoch after a Ctrl-C), and ends with the weights an
    uninterrupted run would have. A resume that cannot be exact (another dataset, another batch
    size mid-epoch, another model or dtype) is refused; one that is well defined but not
    bit-identical (a new batch size at an epoch boundary, another device) is noted.
    ``seed`` draws the initial weights (when ``model`` is None) and the shuffle order;
    ``progress`` shows a tqdm bar per epoch (True), one plain line per epoch (False), or,
    when None, a bar only if stderr is a terminal; ``input_grad`` overrides the convolutions'
    input-gradient method; ``eval_batch_size`` bounds the memory of the per-epoch test
    evaluation; ``compile`` compiles the training step where the backend can (None: wherever
    it can, see `xpcnn.step.TrainStep`); ``hooks`` are extra `Hook` objects.
    ``distributed`` trains data-parallel over MPI (`xpcnn.distributed`): None (default) when
    started by mpiexec/srun with more than one rank, False never, True (or a transport name,
    or an mpi4py communicator) always; ``batch_size`` is then the global batch, rank 0 prints
    and writes checkpoints, and every rank returns the same weights.
    ``workers`` threads share each batch, each with a replica of the model (`xpcnn.workers`):
    ``"auto"`` (default) uses one per BLAS thread on NumPy (one per core unless
    ``OMP_NUM_THREADS`` or the like says otherwise) and none on other backends, in an MPI job
    or for a model with batch norm (whose math they would change); a resume on the same
    backend keeps the checkpoint's count (so it stays bit-exact); an int asks for that many
    (CPU backends). The sum is the one-worker sum in another order: equal to rounding.
    Raises `TrainingDiverged` when the loss, the weights or the optimizer state become
    non-finite (naming the last good checkpoint, if any), `TrainingInterrupted` after saving a
    checkpoint on Ctrl-C, ValueError/TypeError for bad arguments naming the argument,
    `xpcnn.checkpoint.CheckpointError`, `xpcnn.datasets.DatasetError` and
    `xpcnn.backends.BackendUnavailable` for unusable checkpoints, data or devices.
    """
    world = _dist.setup(distributed)  # None outside an MPI job: nothing below changes
    # in an MPI job, a rank that cannot start stops every rank, with one message
    with contextlib.nullcontext() if world is None else world.agreement():
        from . import models

        if isinstance(model, str | os.PathLike):  # a zoo name or a JSON config
            dataset = _dataset(dataset)
            model = models.build_named(model, dataset.num_classes, seed=seed)
        # a zoo model's recipe; any other model gets the defaults (SimpleCNN's recipe)
        recipe = None if model is None else models.recipe_of(model)
        if recipe is not None and not resume:  # a resumed run keeps the checkpoint's settings
            epochs, batch_size, optimizer, lr, momentum, weight_decay, schedule, augment = (
                recipe.fill(
                    {"epochs": epochs, "batch_size": batch_size, "optimizer": optimizer,
                     "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                     "schedule": schedule, "augment": augment}
                ).values()
            )  # fmt: skip
        run = _prepare(
            model, device if world is None else world.device_for(device), dataset, epochs,
            batch_size, optimizer, lr, momentum, weight_decay, seed, checkpoint, resume,
            progress, input_grad, eval_batch_size, schedule, compile, hooks, augment,
            world=world, workers=workers,
        )  # fmt: skip
        if world is not None:
            world.prepare(run)
    return _loop(run) if world is None else world.run(_loop, run)


def _prepare(
    model, device, dataset, epochs, batch_size, optimizer, lr, momentum, weight_decay, seed,
    checkpoint, resume, progress, input_grad, eval_batch_size, schedule, compile, hooks,
    augment=None,
    world=None,
    workers="auto",
):  # fmt: skip
    """Validate every argument and build the run (model, optimizer, step, data, resume state)."""
    explicit_epochs = epochs is not None
    epochs = DEFAULT_EPOCHS if epochs is None else _positive_int("epochs", epochs)
    explicit_batch = batch_size is not None
    batch_size = 128 if batch_size is None else _positive_int("batch_size", batch_size)
    _positive_int("eval_batch_size", eval_batch_size)
    check_workers(workers)
    if world is not None and workers not in ("auto", 1):
        raise ValueError(
            f"workers={workers} in an MPI job: give each rank its cores (mpiexec -n N) or use "
            "worker threads in one process, not both"
        )
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    augmentation = None if augment is None else aug.parse(augment)
    if optimizer is not None and optimizer not in DEFAULTS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(DEFAULTS)}")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    if input_grad is not None and input_grad not in INPUT_GRAD_METHODS:
        raise ValueError(f"input_grad must be one of {INPUT_GRAD_METHODS}, got {input_grad!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=PATH")
    if optimizer == "adam" and momentum is not None:
        raise ValueError("momentum applies to sgd; Adam's are its betas")
    if model is not None:
        _check_module(model)
    for h in hooks:
        if not isinstance(h, Hook):
            raise TypeError(f"hooks must be xpcnn.trainer.Hook objects, got {type(h).__name__}")
    backend = get_backend(device)
    data = _dataset(dataset)
    if len(data.train_labels) == 0:
        raise ValueError(f"dataset {data.name!r} has no training images")
    if len(data.test_labels) == 0:
        raise ValueError(f"dataset {data.name!r} has no test images to evaluate on")
    explicit = {
        k: v
        for k, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay))
        if v is not None
    }
    for k, v in explicit.items():  # the optimizer checks too; this names the argument
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")

    arrays = meta = None
    if resume:
        arrays, meta = ckpt.load(checkpoint)
        if optimizer is None:  # the checkpoint's
            optimizer = {"SGD": "sgd", "Adam": "adam"}.get(
                (meta.get("optimizer") or {}).get("type"), "sgd"
            )
        saved_epochs = meta.get("epochs")
        if not explicit_epochs and isinstance(saved_epochs, int) and saved_epochs > 0:
            epochs = saved_epochs
        if augmentation is None:
            try:
                augmentation = aug.parse(meta.get("augment"))
            except ValueError as exc:
                raise ckpt.CheckpointError(
                    f"{checkpoint}: metadata field 'augment': {exc}"
                ) from None
        saved_model = _model_from(checkpoint, arrays, meta, "cpu")
        if model is None:
            model = saved_model
        elif model.config() != saved_model.config() or model.dtype != meta["dtype"]:
            # (the saved config rebuilt: configs saved before a layer gained an argument match)
            raise ckpt.CheckpointError(
                f"{checkpoint}: saved for {meta['model'].get('type')} ({meta['dtype']}), "
                f"cannot resume into {model.config()['type']} ({model.dtype})"
            )
        else:
            model.load_state_dict(saved_model.state_dict())
    elif model is None:
        model = nn.SimpleCNN(num_classes=data.num_classes, seed=seed)
    optimizer = optimizer or "sgd"
    augmentation = augmentation or aug.Augment()
    if checkpoint is not None:
        ckpt.check_writable(checkpoint)
    model.to(backend).train()
    if input_grad is not None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.input_grad = input_grad
    _check_outputs(model, data)

    hyper = dict(DEFAULTS[optimizer], **explicit)
    start_epoch = start_step = 0
    history, partial, base_lr = [], None, hyper["lr"]
    rng = np.random.default_rng(seed)
    if meta is not None:
        start_epoch, start_step, history, partial, base_lr, schedule, hyper, rng_state = (
            _resume_state(checkpoint, meta, optimizer, explicit, schedule)
        )
        rng.bit_generator.state = rng_state
    opt = make_optimizer(optimizer, model.parameters(), **hyper)
    if meta is not None:
        opt_arrays = {k[6:]: v for k, v in arrays.items() if k.startswith("optim/")}
        try:
            saved_hyper = dict(meta["optimizer"], hyper=opt.state_dict()[0]["hyper"])
            opt.load_state_dict(saved_hyper, opt_arrays, lambda a: backend.asarray(a, model.dtype))
        except (ValueError, KeyError, TypeError) as exc:
            raise ckpt.CheckpointError(
                f"{checkpoint}: optimizer state does not fit: {exc}"
            ) from None
    generator = device_random.generator(backend, _device_seed(seed))
    device_notes = []
    if meta is not None and meta.get("device_rng") is not None:
        saved_rng = ckpt.require(meta, checkpoint, "device_rng", "dict")
        if saved_rng.get("kind") != generator.state().get("kind"):
            device_notes.append(
                "the device random stream (dropout, augmentation) was saved by another kind of "
                "backend; it restarts from the seed, so the run is not bit-identical"
            )
        else:
            try:
                generator.set_state(saved_rng)
            except (ValueError, TypeError, KeyError) as exc:
                raise ckpt.CheckpointError(
                    f"{checkpoint}: metadata field 'device_rng' is malformed ({exc})"
                ) from None
    can_compile = backend.compiles
    if workers == "auto":
        workers = 1 if world is not None else auto_workers(model, batch_size)
        saved = (meta or {}).get("run") or {}
        count = saved.get("workers", 1)
        if (  # a resume on the same backend keeps the saved run's workers (exact resume)
            world is None
            and meta is not None
            and saved.get("device") == backend.name
            and isinstance(count, int)
            and 1 <= count <= 256
            and (count == 1 or backend.worker_threads)
        ):
            workers = count
    worker_notes = []
    if workers > 1 and any(m.batch_dependent_train for m in model.modules()):
        worker_notes.append(
            f"{workers} workers: batch norm normalises each worker's slice of the batch, "
            "not the whole batch (as with MPI ranks)"
        )
    step = TrainStep(
        model,
        opt,
        compile=can_compile if compile is None else bool(compile),
        generator=generator,
        workers=workers,
    )
    run = _Run(
        model=model,
        optimizer=opt,
        step=step,
        backend=backend,
        data=data,
        dataset_id=dataset_identity(data),
        train=DeviceData(backend, data.train_images, data.train_labels),
        test=DeviceData(backend, data.test_images, data.test_labels),
        epochs=epochs,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        rng=rng,
        generator=generator,
        augment=augmentation,
        schedule_name=schedule or "cosine",
        schedule=SCHEDULES[schedule or "cosine"],
        base_lr=base_lr,
        start_epoch=start_epoch,
        start_step=start_step,
        partial=partial,
        history=history,
        checkpoint=checkpoint,
        last_good=None,
        sync=HostSync(),
        notes=[],
        world=world,
    )
    # the per-epoch evaluation is compiled too where the step is (eager JAX ops are slow)
    run.predict = predict_function(model, compile=True) if step.compiled else None
    if step.workers is not None and not step.compiled:  # and the workers share it
        run.predict = step.workers.forward
    run.notes += worker_notes
    if compile and not step.compiled:
        run.notes.append(f"backend {backend.name} has no compiler; the step runs eagerly")
    if meta is not None:
        run.notes += _resume_checks(run, meta, checkpoint, explicit_batch) + device_notes
        run.last_good = (os.fspath(checkpoint), start_epoch)
        if start_epoch >= epochs:
            run.notes.append(
                f"the checkpoint is already at epoch {start_epoch} of the {epochs} asked for"
            )
    bar = sys.stderr.isatty() if progress is None else bool(progress)
    run.hooks = [Progress(bar)]
    if checkpoint is not None:
        run.hooks.append(Checkpoints(checkpoint))
    run.hooks += list(hooks)
    run.position = lambda epoch, step_, part: {
        "epoch": epoch,
        "step": step_,
        "base_lr": run.base_lr,
        "schedule": run.schedule_name,
        "rng_state": run.rng_state_at_epoch if step_ else run.rng.bit_generator.state,
        "device_rng": run.generator.state(),
        "augment": run.augment.spec,
        "epochs": run.epochs,
        "history": run.history,
        "partial": part,
    }
    return run


def _device_seed(seed):
    """The device generator's seed: derived from the run's seed, a stream apart from the
    host generator that draws the shuffle order."""
    return int(np.random.SeedSequence([seed, 1]).generate_state(1, np.uint32)[0])


def _resume_state(path, meta, optimizer, explicit, schedule):
    """The position and settings a checkpoint resumes from, each field checked."""
    req = ckpt.require
    epoch = req(meta, path, "epoch", "count")
    step = req(meta, path, "step", "count")
    history = req(meta, path, "history", "list")
    base_lr = req(meta, path, "base_lr", "number")
    saved_schedule = req(meta, path, "schedule", tuple(SCHEDULES))
    rng_state = req(meta, path, "rng_state", "dict")
    partial = req(meta, path, "partial", "dict", optional=True)
    if partial is not None:
        req(meta, path, "partial.loss_sum", "number")
        req(meta, path, "partial.correct", "number")
    if base_lr < 0:
        raise ckpt.CheckpointError(f"{path}: metadata field 'base_lr' must be >= 0, got {base_lr}")
    saved_type = req(meta, path, "optimizer.type", "str")
    if saved_type != {"sgd": "SGD", "adam": "Adam"}[optimizer]:
        raise ckpt.CheckpointError(
            f"{path}: saved with optimizer {saved_type!r}, not {optimizer!r} "
            "(pass --optimizer to match)"
        )
    saved_hyper = req(meta, path, "optimizer.hyper", "dict")
    hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in saved_hyper.items()}
    if "momentum" in explicit and bool(explicit["momentum"]) != bool(hyper.get("momentum")):
        raise ckpt.CheckpointError(
            f"{path}: saved with momentum {hyper.get('momentum')}; switching momentum on or "
            "off on resume is not supported"
        )
    hyper.update(explicit)
    hyper["lr"] = explicit.get("lr", base_lr)
    try:
        np.random.default_rng().bit_generator.state = rng_state
    except (TypeError, ValueError, KeyError) as exc:
        raise ckpt.CheckpointError(
            f"{path}: metadata field 'rng_state' is invalid ({exc})"
        ) from None
    return epoch, step, history, partial, hyper["lr"], schedule or saved_schedule, hyper, rng_state


# --- the loop ------------------------------------------------------------------------------------


def _loop(run) -> TrainResult:
    """Epochs of steps over ``run``, calling its hooks; see `train`."""
    result = TrainResult(run.model, run.history, run.optimizer, run.backend, step=run.step)
    result.notes = run.notes
    for hook in run.hooks:
        hook.start(run)
    for note in run.notes:
        run.hooks[0].write(f"note: {note}")
    try:
        flag = _InterruptFlag() if run.world is None else run.world.interrupt_flag()
        with flag as interrupt, run.backend.activate():
            for epoch in range(run.start_epoch, run.epochs):
                resumed = epoch == run.start_epoch
                row = _epoch(run, epoch, run.start_step if resumed else 0, interrupt)
                run.history.append(row)
                for hook in run.hooks:
                    hook.epoch_end(run, row)
                if interrupt.set and epoch + 1 < run.epochs:
                    _interrupted(run, epoch + 1, 0, None)
    finally:
        for hook in run.hooks:
            hook.close(run)
        result.host_syncs = run.sync.count
        if run.step.workers is not None:  # its threads; a later call starts them again
            run.step.workers.close()
    return result


def _epoch(run, epoch, start, interrupt):
    """One pass over the training set from step ``start``; returns the history row."""
    backend, data, bs = run.backend, run.train, run.batch_size
    xp = backend.xp
    steps = math.ceil(data.count / bs)
    run.rng_state_at_epoch = run.rng.bit_generator.state
    order = backend.asarray(run.rng.permutation(data.count), "int64")
    dtype = backend.dtype(run.model.dtype)
    losses = xp.zeros((steps,), dtype=dtype, device=backend.device)
    corrects = xp.zeros((steps,), dtype=dtype, device=backend.device)
    sizes = backend.asarray([min(bs, data.count - i * bs) for i in range(steps)], run.model.dtype)
    offset = run.partial if start and run.partial else {"loss_sum": 0.0, "correct": 0.0}
    done = min(start * bs, data.count)
    for hook in run.hooks:
        hook.epoch_start(run, epoch, done)
    t0 = last = time.perf_counter()
    import array_api_extra as xpx

    for step in range(start, steps):
        lr = run.base_lr * run.schedule((epoch * steps + step) / (run.epochs * steps))
        if run.world is None:
            x, y = data.batch(order[step * bs : min((step + 1) * bs, data.count)], run.model.dtype)
            if run.augment:
                x = run.augment(x, run.generator)
            loss, correct = run.step(x, y, lr)
            now = time.perf_counter()
            due = now - last >= REFRESH_SECONDS
        else:  # data-parallel (xpcnn.distributed): this rank's slice, one allreduce, agreed flags
            due = time.perf_counter() - last >= REFRESH_SECONDS
            stop = min((step + 1) * bs, data.count)
            loss, correct, due = run.world.step(data, order, step * bs, stop, lr, due)
            now = time.perf_counter()
        losses = xpx.at(losses)[step].set(loss)
        corrects = xpx.at(corrects)[step].set(correct)
        if step == steps - 1 or interrupt.set or due:
            last = now
            total, right, finite = run.sync.read(
                xp.sum(losses * sizes), xp.sum(corrects), xp.all(xp.isfinite(losses))
            )
            seen = min((step + 1) * bs, data.count)
            if not finite:
                bad = int(np.flatnonzero(~np.isfinite(to_numpy(losses)))[0]) + 1
                raise TrainingDiverged(
                    f"loss became non-finite at epoch {epoch + 1}, step {bad} of {steps}; "
                    f"{run.last_good_text()}; try a lower learning rate than lr={run.base_lr}"
                )
            total += offset["loss_sum"]
            right += offset["correct"]
            for hook in run.hooks:
                hook.refresh(run, seen, total / seen, right / seen)
            if interrupt.set and step < steps - 1:
                _interrupted(run, epoch, step + 1, {"loss_sum": total, "correct": right})
    seconds = time.perf_counter() - t0
    arrays = [*run.step.state()[0], *run.step.state()[1]]
    opt_arrays = list(run.optimizer.state_dict()[1].values())
    finite_flag = xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in arrays + opt_arrays]))
    reduce = None if run.world is None else run.world.reduce_eval  # data-parallel: shards
    test, (weights_finite,) = _evaluate_on(
        run.model,
        run.test,
        run.eval_batch_size,
        run.sync,
        (xp.astype(finite_flag, dtype),),
        run.predict,
        reduce,
    )
    if not weights_finite or not (math.isfinite(test.loss) and math.isfinite(total)):
        raise TrainingDiverged(
            f"weights, optimizer state or test loss became non-finite by the end of epoch "
            f"{epoch + 1} (step {steps}); {run.last_good_text()}; "
            f"try a lower learning rate than lr={run.base_lr}"
        )
    row = {
        "epoch": epoch + 1,
        "train_loss": total / data.count,
        "train_accuracy": right / data.count,
        "test_loss": test.loss,
        "test_accuracy": test.accuracy,
        "seconds": seconds,
        "images_per_second": (data.count - done) / seconds,
    }
    return row


def train_epoch(step, data, order, batch_size, lr, *, sync=None, stop=None):
    """One pass of ``step`` (a `TrainStep`) over ``data`` (a `DeviceData`) in ``order`` (a
    device index array) at a constant learning rate: the bare loop, for benchmarks.

    ``stop()``, checked between steps (after the first), ends the pass early when it returns
    True. Returns
    ``(mean loss, accuracy, images trained on)``, read back once (through ``sync``, a `HostSync`,
    when given).
    """
    backend = data.backend
    xp = backend.xp
    loss_sum = xp.zeros((), dtype=backend.dtype(step.model.dtype), device=backend.device)
    correct = xp.zeros_like(loss_sum)
    seen = 0
    with backend.activate():
        for start in range(0, data.count, batch_size):
            if stop is not None and seen and stop():  # at least one step, always
                break
            x, y = data.batch(order[start : min(start + batch_size, data.count)], step.model.dtype)
            loss, right = step(x, y, lr)
            loss_sum = loss_sum + loss * x.shape[0]
            correct = correct + right
            seen += x.shape[0]
        total, right = (sync or HostSync()).read(loss_sum, correct)
    return total / max(seen, 1), right / max(seen, 1), seen


def _interrupted(run, epoch, step, partial):
    """Save the exact state after ``step`` steps of epoch ``epoch`` (0-based), then stop."""
    path = run.checkpoint or INTERRUPT_PATH
    _save(path, run, run.position(epoch, step, partial))
    where = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
    raise TrainingInterrupted(
        f"interrupted at {where}; checkpoint saved to {path}; continue with: "
        f"xpcnn train --resume --checkpoint {path} (or train(..., checkpoint=path, resume=True))",
        path,
    )
