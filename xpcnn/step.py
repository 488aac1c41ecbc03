"""The training step as a first-class object: one function of arrays that a backend may compile.

    step = TrainStep(model, optimizer)            # cross-entropy by default
    loss, correct = step(x, labels, lr)           # one update; both 0-d arrays on the device

`TrainStep.function` is the whole step as a pure function of arrays,

    (params, buffers, opt_state, x, labels, lr, rng)
        -> (params, buffers, opt_state, loss, correct, rng)

built from two halves that can be called apart (data-parallel training puts an allreduce of
the gradients between them): `TrainStep.gradients` (load the parameters into the model, forward,
loss, backward) and `TrainStep.update` (the optimizer's pure update). With ``compile=True`` the
model's backend compiles the function (`xpcnn.backends.Backend.compile`): ``jax.jit`` on the
``jax`` backends, a CUDA graph on ``torch:cuda``; other backends run it as it is. Calling the
step writes the new arrays back into the model's `Parameter` objects and the optimizer, so the
model, the optimizer and checkpoints see every update.

The layers are the same hand-written ones in every case. While a step is being traced or
captured, their scratch buffers are switched off (`scratch_off`), so no array outlives the call
that made it: a cached array would leak a JAX tracer into the next trace, or alias memory a
CUDA graph owns.

Randomness (dropout) comes from the step's `xpcnn.random.Generator`, installed as the current
generator while the function runs. ``rng`` is None for stateful generators (NumPy, torch, CuPy:
they live outside the function and advance as a side effect; a CUDA graph registers the torch
generator so that every replay draws new numbers) and the JAX key for JAX, whose jitted function
cannot have side effects: the key goes in, the advanced key comes out, and the step stores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from . import random
from .functional import correct_count, cross_entropy
from .nn import bound, swapped
from .workers import Workers, check_count

__all__ = ["TrainStep", "predict_function", "scratch_off"]


@contextlib.contextmanager
def scratch_off(model) -> Iterator[None]:
    """Switch off the scratch-buffer reuse of every layer of ``model`` for the duration."""
    modules = list(model.modules())
    with swapped(modules, "_buffers", [None] * len(modules)):
        yield


class TrainStep:
    """One training step of ``model`` under ``optimizer`` with ``loss`` (a function
    ``(logits, labels) -> (mean loss, dL/dlogits)``, default softmax cross-entropy).

    ``optimizer`` must hold the model's parameters, in the model's order. With ``compile=True``
    the backend's compiler is used (`Backend.compile`; the identity where there is none):
    `compiled` says whether one was. ``generator`` (an `xpcnn.random.Generator` on the model's
    backend; default: the backend's `xpcnn.random.default`) feeds dropout. ``workers`` > 1
    splits each batch between that many threads, each with a replica of the model
    (`xpcnn.workers`, CPU backends). Raises ValueError if the optimizer's parameters are not
    the model's, the generator is another backend's, or the backend cannot run workers.
    """

    def __init__(
        self,
        model,
        optimizer,
        loss: Callable | None = None,
        *,
        compile=False,
        generator=None,
        workers: int = 1,
    ):
        self.model, self.optimizer = model, optimizer
        self.loss = cross_entropy if loss is None else loss
        self.backend = model.backend
        self.generator = random.default(self.backend) if generator is None else generator
        if self.generator.backend != self.backend:
            raise ValueError(
                f"TrainStep: the generator draws on {self.generator.backend.name}, the model "
                f"lives on {self.backend.name}"
            )
        self.params = model.parameters()
        self.buffers = model.buffers()
        if len(optimizer.params) != len(self.params) or any(
            a is not b for a, b in zip(optimizer.params, self.params, strict=False)
        ):
            raise ValueError("TrainStep: the optimizer must hold the model's parameters, in order")
        if check_count(workers) == "auto":
            raise ValueError("TrainStep: workers must be a positive integer (train picks one)")
        self.workers = Workers(model, workers) if workers > 1 else None
        self.compiled = False
        self._run = self.function
        if compile:
            self._run, self.compiled = self.backend.compile(
                self.pure(self.function), generator=self.generator
            )

    def pure(self, fn: Callable) -> Callable:
        """``fn`` with the model's scratch buffers off while it runs (for tracing/capture)."""

        def run(*args):
            with scratch_off(self.model):
                return fn(*args)

        run.__name__ = getattr(fn, "__name__", "step")
        return run

    # --- the pure halves ------------------------------------------------------------------------
    def gradients(self, params, buffers, x, labels):
        """Forward and backward with ``params`` and ``buffers`` in the model: returns
        ``(grads, new buffers, loss, correct)``. With workers, each computes a slice of the
        batch and `xpcnn.workers.Workers.gradients` combines them."""
        if self.workers is not None:
            return self.workers.gradients(self._gradients_of, params, buffers, x, labels)
        slots = (self.params, self.buffers)
        return self._gradients_of(self.model, slots, params, buffers, x, labels)

    def _gradients_of(self, model, slots, params, buffers, x, labels, weight=1.0):
        """`gradients` on ``model`` (the model or a worker's replica of it, whose parameter
        and buffer objects are ``slots``), the gradients scaled by ``weight`` (a worker's
        share of the batch: backward is linear in dL/dlogits, so scaling it scales them all)."""
        param_slots, buffer_slots = slots
        with bound(param_slots, params), bound(buffer_slots, buffers):
            logits = model.forward(x)
            loss, g = self.loss(logits, labels)
            model.backward(g if weight == 1.0 else g * weight, need_input_grad=False)
            grads = [p.grad for p in param_slots]
            new_buffers = [b.data for b in buffer_slots]
        return grads, new_buffers, loss, correct_count(logits, labels)

    def update(self, params, opt_state, grads, lr):
        """The optimizer's update: ``(new params, new optimizer state)``."""
        return self.optimizer.update(params, grads, opt_state, lr)

    def function(self, params, buffers, opt_state, x, labels, lr, rng=None):
        """The whole step: `gradients` (drawing from the step's generator on key ``rng``, see
        the module docstring) then `update`; returns the advanced key last (None for a
        stateful generator)."""
        with random.using(self.generator.with_key(rng)) as gen:
            grads, buffers, loss, correct = self.gradients(params, buffers, x, labels)
        params, opt_state = self.update(params, opt_state, grads, lr)
        return params, buffers, opt_state, loss, correct, gen.key

    # --- state ------------------------------------------------------------------------------------
    def state(self):
        """``(params, buffers, optimizer state)`` as they are now."""
        return (
            [p.data for p in self.params],
            [b.data for b in self.buffers],
            self.optimizer.state,
        )

    def set_state(self, params, buffers, opt_state) -> None:
        """Write arrays back into the model and the optimizer."""
        for p, a in zip(self.params, params, strict=True):
            p.data = a
        for b, a in zip(self.buffers, buffers, strict=True):
            b.data = a
        self.optimizer.state = opt_state

    def __call__(self, x, labels, lr):
        """One update on batch ``x`` with integer ``labels`` at learning rate ``lr`` (a float or
        a 0-d array); returns ``(loss, correct)``, 0-d arrays on the device."""
        if not self.model.training:
            self.model.train()
        gen = self.generator
        params, buffers, opt_state, loss, correct, key = self._run(
            *self.state(), x, labels, lr, gen.key
        )
        self.set_state(params, buffers, opt_state)
        if gen.functional:
            gen.key = key
        return loss, correct


def predict_function(model, *, compile=False, workers: int | str = 1) -> Callable:
    """``x -> logits`` of ``model`` in eval mode as a function of the current weights, compiled
    by the backend when ``compile`` is true, or shared by ``workers`` threads
    (`xpcnn.workers`; ``"auto"``: the backend's default, one per BLAS thread on NumPy).
    Raises ValueError for a bad ``workers``, or more than one with a compiling backend."""
    check_count(workers)
    count = model.backend.default_workers() if workers == "auto" else workers
    if compile and model.backend.compiles:  # a compiled forward runs whole
        if workers != "auto" and workers > 1:
            raise ValueError(
                f"predict_function: compile on {model.backend.name} and workers={workers} do "
                "not combine (a compiled forward is one program)"
            )
        count = 1
    if count > 1:
        pool = Workers(model, count)

        def shared(x):
            if model.training:
                model.eval()
            return pool.forward(x)

        shared.workers = pool
        return shared
    slots = [*model.parameters(), *model.buffers()]

    def logits(arrays, x):
        with bound(slots, arrays):
            return model.forward(x)

    run, _ = model.backend.compile(logits) if compile else (logits, False)

    def predict(x):
        if model.training:
            model.eval()
        with scratch_off(model) if compile else contextlib.nullcontext():
            return run([s.data for s in slots], x)

    return predict
