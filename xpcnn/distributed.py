"""Data-parallel training over MPI: the same `xpcnn.step.TrainStep` on N processes.

    mpiexec -n 4 xpcnn train ...            # or xpcnn.train(...) in a script run by mpiexec

`xpcnn.train` detects an MPI launch from the launcher's environment variables (`detect`) before
it imports mpi4py, because importing mpi4py initialises MPI; outside mpiexec nothing changes and
mpi4py is never imported. Inside, with more than one rank:

- every rank builds the run as usual, then takes rank 0's weights, buffers and optimizer state
  (one broadcast), so all ranks start identical;
- each epoch's shuffled order comes from the shared seed (every rank draws the same one); each
  rank takes its slice of every global batch (``batch_size`` is the global batch, sliced as
  evenly as possible, the last smaller batch too);
- one ``Allreduce`` per step over one flat buffer: every gradient, weighted by the rank's share
  of the global batch (so the sum is the single-process mean gradient, uneven slices included),
  then the weighted loss, the correct count and two flags (stop, refresh the display); then
  every rank applies the same optimizer update. With a compiled step the backend compiles the
  two halves (`TrainStep.gradients`, `TrainStep.update`) and the allreduce sits between them;
- loss, accuracy and the stop decision are reduced, so every rank takes every decision at the
  same step: divergence, Ctrl-C/SIGTERM/SIGUSR1 (rank 0 saves, all stop), the end of training;
- buffers (batch-norm running statistics, should a layer have them) stay per rank during an
  epoch, are not averaged, and are taken from rank 0 at its end, as PyTorch DDP does;
- the test set is evaluated in shards, one per rank, and the sums reduced; rank 0 prints and
  writes checkpoints; ranks > 0 print nothing but their own errors;
- an exception on one rank prints one line naming the rank and calls ``MPI_Abort``, so no rank
  waits forever in a collective.

Gradients travel through host memory (one device-to-host copy of the flat buffer, the allreduce,
one copy back) unless the MPI library is CUDA-aware (then CuPy and torch CUDA buffers go to MPI
directly), or NCCL is asked for (``XPCNN_ALLREDUCE=nccl``; unverified, see docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from . import random

__all__ = [
    "DistributedError",
    "Launch",
    "TRANSPORTS",
    "World",
    "cuda_aware_mpi",
    "detect",
    "is_main_process",
    "quiet_unless_main",
    "ring_allreduce_seconds",
    "setup",
    "shard",
    "step_seconds",
]

#: (rank variable, size variable) set by MPI launchers, in the order they are checked: Open MPI,
#: MPICH/Intel MPI (Hydra) and Slurm's PMI-2, MVAPICH, PMIx (Open MPI 5, ``srun --mpi=pmix``).
LAUNCH_VARIABLES = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
    ("PMIX_RANK", "SLURM_STEP_NUM_TASKS"),
)
#: How gradients travel: through host memory, as device buffers through a CUDA-aware MPI, or
#: through NCCL (CuPy's bindings; unverified). ``auto`` picks ``device`` on a GPU when the MPI
#: library says it is CUDA-aware, else ``host``.
TRANSPORTS = ("auto", "host", "device", "nccl")
#: Signals that ask every rank to stop at the next step, rank 0 saving a checkpoint. Open MPI's
#: mpiexec answers Ctrl-C by killing the ranks itself (SIGTERM, then SIGKILL within half a
#: second) but forwards SIGUSR1: ``kill -USR1 <mpiexec pid>`` stops a job with a checkpoint.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
_TAIL = 4  # weighted loss, correct count, stop flag, refresh flag


class DistributedError(RuntimeError):
    """An MPI run that cannot start or go on (mpi4py missing, another rank failed to start)."""


@dataclass(frozen=True)
class Launch:
    """What the environment says about this process: its rank, the world size (None when the
    launcher does not say) and the variable that said so."""

    rank: int
    size: int | None
    variable: str


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def detect(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The MPI launch this process is part of, read from the launcher's variables
    (`LAUNCH_VARIABLES`) without importing mpi4py; None outside mpiexec/srun."""
    env = os.environ if environ is None else environ
    for rank_var, size_var in LAUNCH_VARIABLES:
        rank = _int(env.get(rank_var))
        if rank is not None and rank >= 0:
            return Launch(rank, _int(env.get(size_var)), rank_var)
    return None


class _Discard:
    """A text stream that keeps nothing."""

    def write(self, text):
        return len(text)

    def flush(self):
        pass


_world: World | None = None  # the world of the running (or last) data-parallel train()


def is_main_process() -> bool:
    """True unless this is a rank > 0 of an MPI job: the process that should print and write
    files. Answers from the environment before MPI is initialised."""
    if _world is not None:
        return _world.rank == 0
    launch = detect()
    return launch is None or launch.rank == 0


@contextlib.contextmanager
def quiet_unless_main() -> Iterator[None]:
    """Send ``sys.stdout`` and ``sys.stderr`` nowhere on ranks > 0 of an MPI job for the
    duration (the command line: rank 0 reports; a failing rank writes to ``sys.__stderr__``)."""
    if is_main_process():
        yield
        return
    with contextlib.redirect_stdout(_Discard()), contextlib.redirect_stderr(_Discard()):
        yield


def shard(count: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``count`` items are split into ``parts``
    contiguous parts as evenly as possible (the first ``count % parts`` get one more)."""
    base, extra = divmod(count, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


# --- the performance model (docs/distributed.md) -------------------------------------------------


def ring_allreduce_seconds(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Time of a ring allreduce of ``nbytes`` over ``ranks`` processes on links of
    ``bandwidth`` bytes/s and per-message ``latency`` seconds (the alpha-beta model):
    ``2 (p-1)/p * n/B + 2 (p-1) alpha``; 0 for one rank."""
    if ranks <= 1:
        return 0.0
    return 2.0 * (ranks - 1) / ranks * nbytes / bandwidth + 2.0 * (ranks - 1) * latency


def step_seconds(batch: float, fixed: float, per_image: float) -> float:
    """Compute time of one step on ``batch`` images: ``fixed + per_image * batch`` (fitted to
    measured steps in benchmarks/distributed.py)."""
    return fixed + per_image * batch


# --- setup ----------------------------------------------------------------------------------------


def _import_mpi(launch):
    try:
        from mpi4py import MPI
    except ImportError as exc:
        how = f"{launch.variable}={os.environ.get(launch.variable)}" if launch else "asked for"
        raise DistributedError(
            f"MPI launch detected ({how}) but mpi4py cannot be imported ({exc}): "
            "pip install 'xpcnn[mpi]', or pass distributed=False to train alone"
        ) from None
    return MPI


_comms: dict = {}


def setup(distributed: bool | str | object | None = None) -> World | None:
    """The `World` this process trains in, or None to train alone.

    ``distributed``: None (default) uses MPI when launched with more than one rank (`detect`);
    False never does; True requires an MPI launch; a transport name (`TRANSPORTS`) is True with
    that transport; an mpi4py communicator is used as the world. Without an explicit transport
    the ``XPCNN_ALLREDUCE`` environment variable may name one. Raises `DistributedError` when
    MPI is required but unusable and ValueError for an unknown value.
    """
    global _world
    if distributed is False:
        return None
    transport = os.environ.get("XPCNN_ALLREDUCE", "auto") or "auto"
    comm = None
    if isinstance(distributed, str):
        transport, distributed = distributed, True
    elif distributed is not None and distributed is not True:
        if not hasattr(distributed, "Allreduce"):
            raise ValueError(
                f"distributed must be None, True, False, one of {TRANSPORTS} or an mpi4py "
                f"communicator, got {distributed!r}"
            )
        comm = distributed
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown allreduce transport {transport!r}; choose one of {TRANSPORTS}")
    if comm is None:
        launch = detect()
        if launch is None:
            if distributed:
                raise DistributedError(
                    "distributed=True, but this process was not started by an MPI launcher "
                    "(no OMPI_COMM_WORLD_RANK, PMI_RANK or PMIX_RANK): run it with "
                    "mpiexec -n N ..."
                )
            return None
        if launch.size == 1 and not distributed:
            return None
        MPI = _import_mpi(launch)
        comm = MPI.COMM_WORLD
        if comm.Get_size() == 1 and not distributed:
            return None
    key = id(comm)
    if key not in _comms:  # Split_type is collective: once per communicator
        MPI = _import_mpi(None)
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        _comms[key] = (comm, local.Get_rank(), local.Get_size())
        local.Free()
    _, local_rank, local_size = _comms[key]
    _world = World(comm, local_rank, local_size, transport)
    return _world


# --- the world ------------------------------------------------------------------------------------


class StopFlag:
    """The trainer's interrupt flag for a data-parallel run: the stop signals (`STOP_SIGNALS`)
    set ``local``; ``set``, which the loop reads, changes only to the value all ranks agreed on
    in a reduction, so every rank stops at the same step. A second signal interrupts at once."""

    def __init__(self):
        self.set = False
        self.local = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.local:
            raise KeyboardInterrupt
        self.local = True

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


class World:
    """An MPI communicator and what data-parallel training needs from it.

    ``rank``/``size`` are the rank in and size of ``comm``; ``local_rank``/``local_size`` the
    same among the ranks on this node (they pick the GPU); ``transport`` how gradients travel
    (`TRANSPORTS`). Built by `setup`; `xpcnn.train` calls the rest.
    """

    def __init__(self, comm, local_rank: int, local_size: int, transport: str = "auto"):
        self.comm = comm
        self.augment = None  # set by prepare: the run's augmentation, applied per slice
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.local_rank, self.local_size = local_rank, local_size
        self.requested = transport
        self.transport = None  # decided by prepare(), per backend
        self.interrupt = None
        self.reduce_eval = None

    def __repr__(self):
        return f"World(rank {self.rank} of {self.size}, transport {self.transport})"

    # --- before the run ---------------------------------------------------------------------------
    def device_for(self, device: str | object) -> str | object:
        """``device`` with a GPU picked by local rank when none is named: ``"cuda"``,
        ``"torch:cuda"`` and ``"jax:cuda"`` become ``...:N``, N = local rank modulo the GPUs
        visible (ranks share GPUs when there are more ranks than GPUs on a node)."""
        if not isinstance(device, str) or device.strip() not in ("cuda", "torch:cuda", "jax:cuda"):
            return device
        family = device.strip().partition(":")[0]
        if family == "jax" and self.local_size > 1:
            # several JAX processes on one GPU must not each preallocate 75% of its memory
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        count = _gpu_count(family)
        index = self.local_rank % count if count else self.local_rank
        return f"{device.strip()}:{index}"

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Run the block (building the run) on every rank, then agree: a rank that failed
        raises its own error, the others a `DistributedError` naming the first failed rank, so
        a setup error on one rank neither hangs the others nor prints N times."""
        try:
            yield
        except BaseException as exc:
            self.comm.allgather(f"{type(exc).__name__}: {exc}")
            raise
        errors = self.comm.allgather(None)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            rank, error = failed[0]
            more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
            raise DistributedError(f"rank {rank}{more} failed to start: {error}")

    def prepare(self, run) -> None:
        """Local part of joining ``run``: pick the transport, compile the two step halves,
        shard the test set, silence ranks > 0, note what happens (rank 0 prints it)."""
        backend = run.backend
        self.transport = _choose_transport(self.requested, backend, self.comm)
        self.parallel = _ParallelStep(self, run.step, self.transport)
        self.augment = getattr(run, "augment", None) or None  # applied to this rank's slice
        if run.test.count >= self.size:
            lo, hi = shard(run.test.count, self.size, self.rank)
            images, labels = run.data.test_images[lo:hi], run.data.test_labels[lo:hi]
            run.test = type(run.test)(backend, images, labels)
            self.reduce_eval = self._reduce_eval
        if self.rank != 0:
            progress = run.hooks[0]
            progress.bar, progress.stream = False, _Discard()
        lo, hi = shard(run.batch_size, self.size, self.rank)
        run.notes.append(
            f"data-parallel over {self.size} MPI ranks ({self.local_size} on this node): global "
            f"batch {run.batch_size} = {hi - lo}{'+' if run.batch_size % self.size else ''} per "
            f"rank, gradients via {self.transport}"
        )
        threads = os.environ.get("OMP_NUM_THREADS")
        if self.local_size > 1 and threads is None and backend.name in ("cpu", "torch:cpu"):
            run.notes.append(
                f"OMP_NUM_THREADS is not set: {self.local_size} ranks on this node may each "
                f"start a thread per core; set it to cores / ranks (mpiexec -x "
                f"OMP_NUM_THREADS=1 with Open MPI)"
            )

    def run(self, loop: Callable, run) -> object:
        """``loop(run)`` after taking rank 0's state, with failure handling: an error that all
        ranks raise together (divergence, an agreed stop) propagates; any other exception on
        one rank prints one line and aborts the whole job (``MPI_Abort``)."""
        from .trainer import TrainingDiverged, TrainingInterrupted

        self.check_same_run(run)
        try:
            self._broadcast_state(run.step)
            return loop(run)
        except (TrainingDiverged, TrainingInterrupted):
            raise
        except BaseException as exc:
            self.abort(exc)
            raise  # unreachable: abort does not return

    def check_same_run(self, run) -> None:
        """Raise `DistributedError` on every rank when the ranks did not build the same run
        (another dataset on one machine, arguments computed per rank): their steps would not
        match, and the first mismatched collective would hang."""
        mine = {
            "dataset": run.dataset_id,
            "batch size": run.batch_size,
            "epochs": run.epochs,
            "start (epoch, step)": [run.start_epoch, run.start_step],
            "seed": run.seed,
            "model": [  # the weights themselves come from rank 0
                type(run.model).__name__,
                run.model.dtype,
                [list(p.shape) for p in run.model.parameters()],
            ],
            "optimizer": run.optimizer.state_dict()[0],
            "learning-rate schedule": run.schedule_name,
            "augmentation": run.augment.spec,
            "input-gradient method": sorted(
                {m.input_grad for m in run.model.modules() if hasattr(m, "input_grad")}
            ),
        }
        runs = self.comm.allgather(mine)
        for rank, other in enumerate(runs):
            for key, value in other.items():
                if value != runs[0][key]:
                    raise DistributedError(
                        f"rank {rank} differs from rank 0 in its {key}: {value!r:.120} instead "
                        f"of {runs[0][key]!r:.120}; every rank must train the same run"
                    )

    def abort(self, exc: BaseException) -> None:
        """Print ``exc`` in one line naming this rank, then end every rank (``MPI_Abort``)."""
        if isinstance(exc, KeyboardInterrupt):
            code, what = 130, "interrupted"
        else:
            message = (str(exc).splitlines() or [""])[0]
            code, what = 1, f"error: {type(exc).__name__}: {message}".rstrip(": ")
        if os.environ.get("XPCNN_TRACEBACK"):
            import traceback

            traceback.print_exception(exc, file=sys.__stderr__)
        print(
            f"xpcnn: rank {self.rank} of {self.size}: {what}; stopping all ranks",
            file=sys.__stderr__,
            flush=True,
        )
        self.comm.Abort(code)

    def interrupt_flag(self) -> StopFlag:
        """The interrupt flag `xpcnn.trainer` uses for this world (see `StopFlag`)."""
        self.interrupt = StopFlag()
        return self.interrupt

    def _broadcast_state(self, step):
        params, buffers, opt_state = step.state()
        backend = step.backend
        host = [backend.to_host(a) for a in _leaves([params, buffers, opt_state])]
        host = self.comm.bcast(host if self.rank == 0 else None, root=0)
        if self.rank != 0:
            leaves = iter(backend.asarray(h) for h in host)
            step.set_state(*_rebuild([params, buffers, opt_state], leaves))
            for p in step.params:  # the broadcast copies arrive C-ordered: arrange them again
                p.set(p.data)

    # --- during the run ---------------------------------------------------------------------------
    def step(
        self, data, order, start: int, stop: int, lr, due: bool
    ) -> tuple[object, object, bool]:
        """One data-parallel step on global batch ``order[start:stop]``: returns the global
        mean loss, the global correct count and whether the display is due on any rank; sets
        the stop flag all ranks agreed on."""
        loss, correct, stop_all, due_all = self.parallel(
            data, order, start, stop, lr, self.interrupt, due
        )
        self.interrupt.set = self.interrupt.set or stop_all
        if stop == data.count and self.parallel.step.buffers:
            self._broadcast_buffers(self.parallel.step)
        return loss, correct, due_all

    def _reduce_eval(self, loss_sum: float, correct: float, count: int) -> tuple[float, float, int]:
        """Sums of this rank's test shard over all ranks (with the stop flag)."""
        from mpi4py import MPI

        buf = np.array([loss_sum, correct, count, float(self.interrupt.local)], np.float64)
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.interrupt.set = self.interrupt.set or buf[3] > 0
        return float(buf[0]), float(buf[1]), int(buf[2])

    def _broadcast_buffers(self, step):
        backend = step.backend
        host = self.comm.bcast([backend.to_host(b.data) for b in step.buffers], root=0)
        if self.rank != 0:
            for b, h in zip(step.buffers, host, strict=True):
                b.data = backend.asarray(h)

    def leader_writes(self, write: Callable[[], object]) -> None:
        """Rank 0 calls ``write()`` (a checkpoint); every rank returns once it is done."""
        if self.rank == 0:
            write()
        self.comm.Barrier()


def _leaves(tree, out=None):
    out = [] if out is None else out
    if isinstance(tree, list | tuple):
        for t in tree:
            _leaves(t, out)
    elif isinstance(tree, dict):
        for k in sorted(tree):
            _leaves(tree[k], out)
    elif tree is not None:
        out.append(tree)
    return out


def _rebuild(tree, leaves):
    if isinstance(tree, list | tuple):
        return type(tree)(_rebuild(t, leaves) for t in tree)
    if isinstance(tree, dict):
        return {k: _rebuild(tree[k], leaves) for k in sorted(tree)}
    return None if tree is None else next(leaves)


def _gpu_count(family):
    """GPUs visible to ``family`` (cuda = CuPy, torch, jax), 0 when it cannot say."""
    try:
        if family == "cuda":
            import cupy

            return int(cupy.cuda.runtime.getDeviceCount())
        if family == "torch":
            import torch

            return int(torch.cuda.device_count())
        if family == "jax":
            import jax

            return len(jax.devices("gpu"))
    except Exception:
        return 0
    return 0


def _on_gpu(backend) -> str | None:
    """``"cupy"`` or ``"torch"`` for a CUDA backend whose arrays MPI/NCCL can take, else None."""
    if backend.family == "cuda":
        return "cupy"
    if backend.family == "torch" and getattr(backend.device, "type", None) == "cuda":
        return "torch"
    return None


def cuda_aware_mpi() -> bool | None:
    """Whether the MPI library accepts CUDA device buffers: Open MPI's
    ``MPIX_Query_cuda_support()`` or MPICH's ``MPIX_GPU_query_support``; None when it has
    neither (unknown)."""
    import ctypes

    from mpi4py import MPI

    try:
        lib = ctypes.CDLL(MPI.__file__)
    except OSError:
        return None
    query = getattr(lib, "MPIX_Query_cuda_support", None)
    if query is not None:
        query.restype = ctypes.c_int
        return bool(query())
    query = getattr(lib, "MPIX_GPU_query_support", None)
    if query is not None:
        supported = ctypes.c_int(0)
        if query(ctypes.c_int(0), ctypes.byref(supported)) == 0:  # MPIX_GPU_SUPPORT_CUDA
            return bool(supported.value)
    return None


def _choose_transport(requested, backend, comm):
    kind = _on_gpu(backend)
    if requested == "auto":
        return "device" if kind and cuda_aware_mpi() else "host"
    if requested in ("device", "nccl") and kind is None:
        raise DistributedError(
            f"allreduce transport {requested!r} needs a CuPy or torch CUDA device, not "
            f"{backend.name}"
        )
    return requested


# --- the step -------------------------------------------------------------------------------------


class _ParallelStep:
    """`TrainStep` split at the gradients: this rank's slice forward and backward, one flat
    buffer, one allreduce, the update. The flat buffer is ``[gradients * n_r / n, loss * n_r /
    n, correct, stop, refresh]`` for a rank with ``n_r`` of the global batch's ``n`` images."""

    def __init__(self, world, step, transport):
        self.world, self.step, self.transport = world, step, transport
        self.backend = step.backend
        self.shapes = [tuple(p.data.shape) for p in step.params]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self.count = self.offsets[-1]
        self.missing = set()  # parameters without a gradient (seen at the first call)
        self.dtype = self.backend.dtype(step.model.dtype)
        if step.compiled:
            self._grad, _ = self.backend.compile(step.pure(self._flat_gradients))
            self._update, _ = self.backend.compile(step.pure(self._apply))
        else:
            self._grad, self._update = self._flat_gradients, self._apply
        self._zeros = None
        self._rows = None  # (global batch, first row, end row) for an uncompiled step's draws
        self._reduce = {"host": self._host, "device": self._device, "nccl": self._nccl}[transport]
        self._nccl_comm = None

    # pure functions of arrays (what the backend compiles). A backend may donate the first
    # three arguments (JAX on a GPU): nothing for the gradients (empty placeholders keep the
    # parameters alive), the parameters and optimizer state for the update, not the buffer.
    def _flat_gradients(self, _a, _b, _c, params, buffers, x, labels, weight, key):
        # dropout draws from the step's generator; a JAX key goes in and the advanced one out.
        # Uncompiled, it draws for the whole global batch and keeps this rank's rows (`_rows`).
        gen = self.step.generator.with_key(key)
        draws = gen if self._rows is None else random.RowSlice(gen, *self._rows)
        with random.using(draws):
            grads, buffers, loss, correct = self.step.gradients(params, buffers, x, labels)
        self.missing = {i for i, g in enumerate(grads) if g is None}
        xp = self.backend.xp
        parts = [
            xp.reshape(xp.zeros_like(p) if g is None else g * weight, (-1,))
            for p, g in zip(params, grads, strict=True)
        ]
        zero = xp.zeros_like(loss)
        tail = xp.stack([loss * weight, xp.astype(correct, loss.dtype), zero, zero])
        return xp.concat([*parts, tail]), buffers, gen.key

    def _apply(self, params, opt_state, _a, flat, lr):
        xp = self.backend.xp
        o = self.offsets
        grads = [
            None if i in self.missing else xp.reshape(flat[o[i] : o[i + 1]], shape)
            for i, shape in enumerate(self.shapes)
        ]
        return self.step.update(params, opt_state, grads, lr)

    def __call__(self, data, order, start, stop, lr, interrupt, due):
        step = self.step
        if not step.model.training:
            step.model.train()
        world = self.world
        params, buffers, opt_state = step.state()
        total = stop - start
        lo, hi = shard(total, world.size, world.rank)
        gen = step.generator
        if hi > lo:
            x, y = data.batch(order[start + lo : start + hi], step.model.dtype)
            if world.augment:  # the numbers one process draws for these images
                x = world.augment(x, random.RowSlice(gen, total, lo, hi))
            # a compiled step keeps the rows it was traced with: it draws for its slice only
            self._rows = None if step.compiled else (total, lo, hi)
            flat, buffers, key = self._grad(
                (), (), (), params, buffers, x, y, (hi - lo) / total, gen.key
            )
            if gen.functional:
                gen.key = key
        else:  # fewer images in this global batch than ranks: contribute nothing
            if self._zeros is None:
                xp = self.backend.xp
                self._zeros = xp.zeros(
                    (self.count + _TAIL,), dtype=self.dtype, device=self.backend.device
                )
            flat = self._zeros
        # the stop flag is read as late as possible: a signal during this step stops after it
        flat, tail = self._reduce(flat, float(interrupt.local), float(due))
        params, opt_state = self._update(params, opt_state, (), flat, lr)
        step.set_state(params, buffers, opt_state)
        if total < world.size:  # a rank without images drew nothing: all take rank 0's stream
            gen.set_state(world.comm.bcast(gen.state() if world.rank == 0 else None, root=0))
        loss, correct, stop_all, due_all = tail
        return loss, correct, stop_all > 0, due_all > 0

    # --- transports: (device flat buffer, flags) -> (summed device buffer, host tail) ------------
    def _host(self, flat, stop_local, due):
        from mpi4py import MPI

        backend = self.backend
        host = backend.to_host(flat)  # NumPy: flat itself; torch CPU: a view; else a copy
        if flat is self._zeros or not host.flags.writeable:
            host = np.array(host)
        host[-2:] = (stop_local, due)
        self.world.comm.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
        tail = [float(v) for v in host[-_TAIL:]]
        if backend.owns(host):  # NumPy
            return host, tail
        if backend.name == "torch:cpu":  # shares the memory, no copy
            import torch

            return torch.from_numpy(host), tail
        return backend.asarray(host), tail

    def _device(self, flat, stop_local, due):
        from mpi4py import MPI

        backend = self.backend
        xp = backend.xp
        if flat is self._zeros:
            flat = xp.zeros_like(flat)
        with backend.activate():
            flags = backend.asarray(np.array([stop_local, due]), self.dtype)
            flat[-2:] = flags
            backend.synchronize()  # MPI reads the buffer outside the device's stream
            self.world.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
            tail = [float(v) for v in backend.to_host(flat[-_TAIL:])]
        return flat, tail

    def _nccl(self, flat, stop_local, due):
        """NCCL through CuPy's bindings, bootstrapped over MPI (unverified: needs one GPU per
        rank, see docs/distributed.md)."""
        from cupy.cuda import nccl

        backend = self.backend
        xp = backend.xp
        if self._nccl_comm is None:
            uid = self.world.comm.bcast(nccl.get_unique_id() if self.world.rank == 0 else None)
            with backend.activate():
                self._nccl_comm = nccl.NcclCommunicator(self.world.size, uid, self.world.rank)
        if flat is self._zeros:
            flat = xp.zeros_like(flat)
        types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}
        with backend.activate():
            flat[-2:] = backend.asarray(np.array([stop_local, due]), self.dtype)
            if backend.family == "cuda":
                import cupy

                ptr, stream = flat.data.ptr, cupy.cuda.get_current_stream().ptr
            else:
                import torch

                ptr, stream = flat.data_ptr(), torch.cuda.current_stream(flat.device).cuda_stream
            self._nccl_comm.allReduce(
                ptr, ptr, flat.shape[0], types[str(self.step.model.dtype)], nccl.NCCL_SUM, stream
            )
            tail = [float(v) for v in backend.to_host(flat[-_TAIL:])]
        return flat, tail
