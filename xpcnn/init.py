"""Weight initialisation, drawn on the host so that one seed gives the same weights everywhere.

PyTorch's defaults for Conv2d and Linear: weights Kaiming-uniform with ``a = sqrt(5)`` and biases
uniform, which both come to ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. Values are drawn in float64
from NumPy's PCG64 and only then cast, so float32 and float64 models of one seed agree.

Inside ``with deferred():`` nothing is drawn or allocated: the draws return zero-stride
placeholders and layers record only their parameters' shapes. `xpcnn.trainer.load_checkpoint`
builds a model from an untrusted config this way, so a config that declares a 20000x20000
layer costs nothing until its shapes have been checked against the file's arrays.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator

import numpy as np

_DEFERRED = contextvars.ContextVar("xpcnn_deferred_init", default=False)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Build modules without drawing or allocating their parameters (shapes only)."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def is_deferred() -> bool:
    """True inside `deferred`."""
    return _DEFERRED.get()


def rng(seed=None) -> np.random.Generator:
    """A NumPy Generator: from an int seed, a SeedSequence, a Generator (passed through) or None."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def _placeholder(shape) -> np.ndarray:
    return np.broadcast_to(np.float64(0.0), tuple(shape))  # no memory behind it


def uniform_fan_in(generator: np.random.Generator, shape, fan_in: int) -> np.ndarray:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` of the given shape, float64 on the host."""
    if is_deferred():
        return _placeholder(shape)
    bound = 1.0 / math.sqrt(fan_in)
    return generator.uniform(-bound, bound, size=shape)


def constant(shape, value: float) -> np.ndarray:
    """A float64 host array of ``value`` (batch-norm scales, shifts and running statistics)."""
    if is_deferred():
        return _placeholder(shape)
    return np.full(shape, float(value))


def counter(shape=()) -> np.ndarray:
    """An int64 host array of zeros (batch norm's ``num_batches_tracked``)."""
    if is_deferred():
        return _placeholder(shape)
    return np.zeros(shape, dtype=np.int64)


def child_seeds(seed, count: int) -> list:
    """``count`` independent seeds derived from one (for the layers of a model)."""
    if not isinstance(seed, np.random.SeedSequence):
        seed = np.random.SeedSequence(seed)
    return seed.spawn(count)
