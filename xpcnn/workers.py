"""Data parallelism inside one process: worker threads share each batch.

NumPy's array operations run outside Python's global interpreter lock, but each one runs on a
single core (only the matrix products use BLAS threads). So instead of one thread per core
*inside* each operation, xpcnn can run one worker thread per core, each with its own replica
of the model and a slice of the batch, with the BLAS pool at one thread meanwhile:

    workers = Workers(model, 2)
    logits = workers.forward(x)                    # each worker a slice, results concatenated
    step = TrainStep(model, optimizer, workers=2)  # each worker a slice's gradients, summed

The math is the one-process math: a batch's mean-loss gradient is the size-weighted sum of its
slices' (floating-point sums in another order, so equal to rounding, ~1e-12 in float64).
Dropout draws the numbers one process would (`xpcnn.random.RowSlice`). Layers whose training
output depends on the whole batch (batch norm) see only their worker's slice, as with
data-parallel ranks (`xpcnn.distributed`): `Module.batch_dependent_train` says which, and
``workers="auto"`` in `xpcnn.train` stays at one worker for them.

The replicas are shallow copies of the model's layers: their own parameter and buffer objects
(the model's arrays are bound into them on every call), caches and scratch buffers, and every
other attribute shared with the model; when an attribute of the model is reassigned (``.to()``,
``layer.p = 0.3``) they are made again before the next call, so they compute what the model
would. A layer should draw random numbers from `xpcnn.random.current` (as `Dropout` does), not
from a generator of its own, and attributes a layer sets during forward are set on each
replica (the model keeps those of worker 0's slice). With `TrainStep`, the loss must be a mean
over the samples (the default cross-entropy is), since the slices' losses are averaged.

The backend says whether threads may share its work (`Backend.worker_threads`) and how to keep
its own pools at one thread (`Backend.single_threaded`).
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from . import random
from .distributed import shard
from .nn import Module, Parameter, bound

__all__ = ["MIN_SLICE", "Workers", "auto_count", "check_count"]

#: Fewest samples per worker in `Workers.forward`: a smaller batch is computed by the model alone
#: (handing a few images to a thread costs more than it saves).
MIN_SLICE = 16


def check_count(workers: object, argument: str = "workers") -> int | str:
    """``workers`` if it is a positive int or ``"auto"``, else ValueError naming ``argument``."""
    if workers == "auto" or (
        isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1
    ):
        return workers
    raise ValueError(f"{argument} must be a positive integer or 'auto', got {workers!r}")


def auto_count(model: Module, batch_size: int) -> int:
    """How many workers ``"auto"`` means for ``model`` at ``batch_size``: the backend's
    `Backend.default_workers` (NumPy: the BLAS pool's threads, one per core unless the
    environment says otherwise), at most one per 32 images, and 1 for a model whose training
    output depends on the whole batch (batch norm), whose math workers would change."""
    if any(m.batch_dependent_train for m in model.modules()):
        return 1
    return max(1, min(model.backend.default_workers(), batch_size // 32))


def _wait_all(futures):
    """Wait until every future is done, even through Ctrl-C (raised once they all are)."""
    interrupted = None
    while True:
        try:
            wait(futures)
            break
        except KeyboardInterrupt as exc:
            interrupted = exc
    if interrupted is not None:
        raise interrupted


def _weighted(weights, parts):
    """``sum(w * p)`` over the workers' arrays (no multiplication where ``w`` is 1)."""
    total = parts[0] if weights[0] == 1 else weights[0] * parts[0]
    for w, p in zip(weights[1:], parts[1:], strict=True):
        total = total + (p if w == 1 else w * p)
    return total


_NOT_SETTINGS = ("_cache", "_buffers", "training")


def _replica(module, done):
    """A copy of ``module`` for a worker: its own sub-module replicas, its own (empty)
    parameter and buffer objects, caches and scratch buffers; every other attribute (settings,
    the backend, dicts, plain arrays) shared with ``module``. ``done`` maps ids of modules
    already copied to their copies (a module used twice stays one module)."""
    if id(module) in done:
        return done[id(module)]
    copy_ = done[id(module)] = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, Module):
            value = _replica(value, done)
        elif isinstance(value, Parameter):  # Buffer is a Parameter too: keeps its class
            value = copy.copy(value)
            value.data, value.grad = None, None
        elif isinstance(value, list | tuple) and any(isinstance(v, Module) for v in value):
            value = type(value)(_replica(v, done) if isinstance(v, Module) else v for v in value)
        object.__setattr__(copy_, key, value)
    copy_._cache = None
    copy_._buffers = None if module._buffers is None else {}
    return copy_


class Workers:
    """``count`` worker threads, each with a replica of ``model`` (the calling thread works
    too, on the model itself). Raises ValueError when ``count`` is not a positive int or the
    model's backend cannot share work between threads (`Backend.worker_threads`).

    A replica is a shallow copy of the model's layers (`_replica`): the model's current
    parameters and buffers are bound into it for each call, its train/eval mode follows the
    model's, and when an attribute of the model is reassigned (``layer.p = 0.3``, ``.to()``
    another backend or dtype) the replicas are made again before the next call."""

    def __init__(self, model: Module, count: int):
        check_count(count)
        if count == "auto":
            raise ValueError("Workers needs a number; workers.auto_count(model, batch) picks one")
        self.model, self.count = model, count
        self._pool = None
        self._signature = None
        self._replicate()

    def __repr__(self):
        return f"Workers({type(self.model).__name__}, {self.count})"

    # --- replicas --------------------------------------------------------------------------------
    def _settings(self):
        """The identity of every attribute of every module of the model, besides caches,
        scratch buffers and the train/eval flag (synchronised on every call). Replicas share
        the values themselves (a dict or an array changed in place is seen at once); a
        reassigned attribute (``.to()``, ``layer.p = 0.3``) changes this, and the replicas are
        made again. The values are kept so that their ids cannot be reused."""
        values = [
            (m, key, value)
            for m in self.model.modules()
            for key, value in vars(m).items()
            if key not in _NOT_SETTINGS
        ]
        return [(id(m), key, id(value)) for m, key, value in values], values

    def _replicate(self):
        model = self.model
        self.backend = backend = model.backend
        if self.count > 1 and not backend.worker_threads:
            raise ValueError(
                f"workers={self.count}: the {backend.name} backend cannot split a batch "
                "between threads (its operations hold Python's GIL or run on their own "
                "device); use workers=1 (--workers 1)"
            )
        self.replicas = [model] + [_replica(model, {}) for _ in range(self.count - 1)]
        self.slots = [(r.parameters(), r.buffers()) for r in self.replicas]
        self._generators = [None] * self.count
        # whether one sample's output depends on the rest of the batch (in eval mode)
        self._whole_eval = any(m.batch_dependent_eval for m in model.modules())
        self._signature = self._settings()

    def _fresh(self):
        """Make the replicas again if an attribute of the model was reassigned since."""
        if self._settings()[0] != self._signature[0]:
            self._replicate()

    # --- running ---------------------------------------------------------------------------------
    def _map(self, job, n, parts):
        """``job(i, lo, hi)`` for each of ``parts`` workers ``i`` with a non-empty slice
        ``lo:hi`` of ``n`` samples, worker 0 on the calling thread; results in worker order.
        Returns only when every job has ended, also when one raised."""
        slices = [(i, *shard(n, parts, i)) for i in range(parts)]
        slices = [s for s in slices if s[2] > s[1]]
        if len(slices) == 1:  # one sample, or one worker: no thread to hand work to
            return [job(*slices[0])], slices
        for r in self.replicas[1:]:  # in the model's mode (train or eval)
            if r.training != self.model.training:
                r.train(self.model.training)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.count - 1, thread_name_prefix="xpcnn-worker")
        with self.backend.single_threaded():
            # each job runs in a copy of the caller's context (np.errstate, random.using, ...)
            futures = [
                self._pool.submit(contextvars.copy_context().run, job, *s) for s in slices[1:]
            ]
            try:
                first = job(*slices[0])
            finally:  # no replica may still be computing when this returns or raises
                _wait_all(futures)
            return [first, *(f.result() for f in futures)], slices

    def forward(self, x: Any) -> Any:
        """The model's output for batch ``x`` with its current weights. In eval mode the
        workers each compute a slice of the batch (at least `MIN_SLICE` samples each); the
        model alone computes a smaller batch, any training-mode forward (whose caches and
        random draws belong to the model) and a model where one sample's output depends on
        the others (batch norm without running statistics). The result is the one-thread
        result in every case."""
        model = self.model
        parts = min(self.count, x.shape[0] // MIN_SLICE)
        if parts <= 1 or model.training:
            return model.forward(x)
        self._fresh()
        if self._whole_eval:
            return model.forward(x)
        params = [p.data for p in model.parameters()]
        buffers = [b.data for b in model.buffers()]

        def job(i, lo, hi):
            if i == 0:
                return model.forward(x[lo:hi, ...])
            with bound([*self.slots[i][0], *self.slots[i][1]], [*params, *buffers]):
                return self.replicas[i].forward(x[lo:hi, ...])

        outputs, _ = self._map(job, x.shape[0], parts)
        return self.backend.xp.concat(outputs, axis=0)

    def gradients(
        self, gradients_of: Callable, params: list, buffers: list, x: Any, labels: Any
    ) -> tuple[list, list, Any, Any]:
        """``gradients_of(replica, (parameter objects, buffer objects), params, buffers, x,
        labels) -> (grads, buffers, loss, correct)`` (`xpcnn.step.TrainStep`'s half) computed
        per slice by the workers and combined into the whole batch's: gradients, mean loss
        and floating-point buffers weighted by slice size, correct counts summed, other
        buffers (counters) from worker 0. Random draws come from the current generator as one
        process would make them."""
        self._fresh()
        n = x.shape[0]
        gen = random.current(self.backend)
        state = gen.state() if self.count > 1 else None
        for i in range(1, self.count):  # each worker draws from a copy at the same state
            if self._generators[i] is None:
                self._generators[i] = random.generator(self.backend, 0)
            self._generators[i].set_state(state)

        def job(i, lo, hi):
            own = gen if i == 0 else self._generators[i]
            with random.using(random.RowSlice(own, n, lo, hi)):
                return gradients_of(
                    self.replicas[i],
                    self.slots[i],
                    params,
                    buffers,
                    x[lo:hi, ...],
                    labels[lo:hi],
                    (hi - lo) / n,  # each worker's gradients come weighted: one add to combine
                )

        results, slices = self._map(job, n, self.count)
        if len(results) == 1:
            return results[0]
        weights = [(hi - lo) / n for _, lo, hi in slices]
        grads = [
            None if parts[0] is None else _weighted([1] * len(parts), parts)
            for parts in zip(*(r[0] for r in results), strict=True)
        ]
        xp = self.backend.xp
        new_buffers = [
            _weighted(weights, parts) if xp.isdtype(parts[0].dtype, "real floating") else parts[0]
            for parts in zip(*(r[1] for r in results), strict=True)
        ]
        loss = _weighted(weights, [r[2] for r in results])
        correct = results[0][3]
        for r in results[1:]:
            correct = correct + r[3]
        return grads, new_buffers, loss, correct

    def close(self) -> None:
        """Stop the worker threads (they also stop when the object is garbage collected)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
