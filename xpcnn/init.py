"""Weight initialisation, drawn on the host so that one seed gives the same weights everywhere.

PyTorch's defaults for Conv2d and Linear: weights Kaiming-uniform with ``a = sqrt(5)`` and biases
uniform, which both come to ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. Values are drawn in float64
from NumPy's PCG64 and only then cast, so float32 and float64 models of one seed agree.
"""

from __future__ import annotations

import math

import numpy as np


def rng(seed=None):
    """A NumPy Generator: from an int seed, a SeedSequence, a Generator (passed through) or None."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def uniform_fan_in(generator, shape, fan_in):
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` of the given shape, float64 on the host."""
    bound = 1.0 / math.sqrt(fan_in)
    return generator.uniform(-bound, bound, size=shape)


def child_seeds(seed, count):
    """``count`` independent seeds derived from one (for the layers of a model)."""
    return np.random.SeedSequence(seed).spawn(count)
