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

The replicas are copies made when the `Workers` object is built; the parameters and buffers of
the model are bound into them on every call, so they always compute with the model's current
weights. The backend says whether threads may share its work (`Backend.worker_threads`) and
how to keep its own pools at one thread (`Backend.single_threaded`).
"""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

from . import random
from .distributed import shard

__all__ = ["MIN_SLICE", "Workers", "auto_count", "check_count"]

#: Fewest samples per worker in `Workers.forward`: a smaller batch is computed by the model alone
#: (handing a few images to a thread costs more than it saves).
MIN_SLICE = 16


def check_count(workers, argument="workers") -> int | str:
    """``workers`` if it is a positive int or ``"auto"``, else ValueError naming ``argument``."""
    if workers == "auto" or (
        isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1
    ):
        return workers
    raise ValueError(f"{argument} must be a positive integer or 'auto', got {workers!r}")


def auto_count(model, batch_size: int) -> int:
    """How many workers ``"auto"`` means for ``model`` at ``batch_size``: the backend's
    `Backend.default_workers` (NumPy: the BLAS pool's threads, one per core unless the
    environment says otherwise), at most one per 32 images, and 1 for a model whose training
    output depends on the whole batch (batch norm), whose math workers would change."""
    if any(m.batch_dependent_train for m in model.modules()):
        return 1
    return max(1, min(model.backend.default_workers(), batch_size // 32))


def _weighted(weights, parts):
    """``sum(w * p)`` over the workers' arrays (no multiplication where ``w`` is 1)."""
    total = parts[0] if weights[0] == 1 else weights[0] * parts[0]
    for w, p in zip(weights[1:], parts[1:], strict=True):
        total = total + (p if w == 1 else w * p)
    return total


class Workers:
    """``count`` worker threads, each with a replica of ``model`` (the calling thread works
    too, on the model itself). Raises ValueError when ``count`` is not a positive int or the
    model's backend cannot share work between threads (`Backend.worker_threads`)."""

    def __init__(self, model, count: int):
        check_count(count)
        if count == "auto":
            raise ValueError("Workers needs a number; workers.auto_count(model, batch) picks one")
        backend = model.backend
        if count > 1 and not backend.worker_threads:
            raise ValueError(
                f"workers={count}: the {backend.name} backend cannot split a batch between "
                f"threads (its operations hold Python's GIL or run on their own device); "
                f"use workers=1"
            )
        self.model, self.count, self.backend = model, count, backend
        # the backends (holding the namespace module) are shared, everything else is copied
        backends = {id(m.backend): m.backend for m in model.modules()}
        self.replicas = [model] + [copy.deepcopy(model, dict(backends)) for _ in range(count - 1)]
        for r in self.replicas[1:]:
            for m in r.modules():
                m._cache = None
                m._buffers = None if m._buffers is None else {}
        self.slots = [(r.parameters(), r.buffers()) for r in self.replicas]
        self._pool = None
        self._generators = [None] * count
        # whether one sample's output depends on the rest of the batch, in training and in eval
        self._whole = {
            mode: any(
                m.batch_dependent_train if mode else m.batch_dependent_eval for m in model.modules()
            )
            for mode in (True, False)
        }

    def __repr__(self):
        return f"Workers({type(self.model).__name__}, {self.count})"

    def _map(self, job, n):
        """``job(i, lo, hi)`` for each worker ``i`` with a non-empty slice ``lo:hi`` of ``n``
        samples, worker 0 on the calling thread; results in worker order."""
        slices = [(i, *shard(n, self.count, i)) for i in range(self.count)]
        slices = [s for s in slices if s[2] > s[1]]
        if len(slices) == 1:  # one sample, or one worker: no thread to hand work to
            return [job(*slices[0])], slices
        for r in self.replicas[1:]:  # in the model's mode (train or eval)
            if r.training != self.model.training:
                r.train(self.model.training)
        if self._pool is None and self.count > 1:
            self._pool = ThreadPoolExecutor(self.count - 1, thread_name_prefix="xpcnn-worker")
        with self.backend.single_threaded():
            futures = [self._pool.submit(job, *s) for s in slices[1:]]
            first = job(*slices[0])
            return [first, *(f.result() for f in futures)], slices

    def _bind(self, i, params, buffers):
        """Put ``params`` and ``buffers`` into replica ``i``; returns the previous arrays."""
        slots = [*self.slots[i][0], *self.slots[i][1]]
        saved = [s.data for s in slots]
        for s, a in zip(slots, [*params, *buffers], strict=True):
            s.data = a
        return slots, saved

    def forward(self, x):
        """The model's output for batch ``x`` (in its current mode, with its current weights),
        each worker computing a slice of the batch. The model alone computes a batch of fewer
        than ``2 * MIN_SLICE`` samples, and one where a sample's output depends on the others
        (batch norm in training mode, or without running statistics): the result is always
        the one-thread result."""
        model = self.model
        if self.count == 1 or x.shape[0] < 2 * MIN_SLICE or self._whole[model.training]:
            return model.forward(x)
        params = [p.data for p in model.parameters()]
        buffers = [b.data for b in model.buffers()]

        def job(i, lo, hi):
            replica = self.replicas[i]
            if i == 0:
                return replica.forward(x[lo:hi, ...])
            slots, saved = self._bind(i, params, buffers)
            try:
                return replica.forward(x[lo:hi, ...])
            finally:
                for s, a in zip(slots, saved, strict=True):
                    s.data = a

        outputs, _ = self._map(job, x.shape[0])
        return outputs[0] if len(outputs) == 1 else self.backend.xp.concat(outputs, axis=0)

    def gradients(self, gradients_of, params, buffers, x, labels):
        """``gradients_of(replica, (parameter objects, buffer objects), params, buffers, x,
        labels) -> (grads, buffers, loss, correct)`` (`xpcnn.step.TrainStep`'s half) computed
        per slice by the workers and combined into the whole batch's: gradients, mean loss
        and floating-point buffers weighted by slice size, correct counts summed, other
        buffers (counters) from worker 0. Random draws come from the current generator as one
        process would make them."""
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

        results, slices = self._map(job, n)
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
