"""Backend hooks: a namespace may supply its own, fused version of a few elementwise steps.

Layer and optimizer code stays one pure Array API path: it asks `hook(xp, name)` for the
namespace's version of a step and, when there is none, computes the plain Array API expression
written next to the call. A backend registers its hooks when it is created (CuPy: one
``ElementwiseKernel`` instead of several kernel launches; torch: its native fused operators).
NumPy, array-api-strict and JAX register none: for them the expression is the code.

Every hook must return what the fallback returns, to the same tolerance the tests apply to the
namespace (`tests/test_kernels.py` checks each registered hook against its fallback).

Hook names and signatures:

``relu(x) -> y``
    ``max(x, 0)``.
``relu_backward(g, y) -> dx``
    ``g`` where ``y > 0``, else 0.
``sgd(p, g, buf, lr, momentum, weight_decay, nesterov) -> (p, buf)``
    one SGD step for one parameter (see `xpcnn.optim.SGD`); may update ``p`` and ``buf`` in
    place and return them.
``adam(p, g, m, v, lr, b1, b2, eps, weight_decay, c1, c2) -> (p, m, v)``
    one Adam step with the bias corrections ``c1 = 1 - b1**t``, ``c2 = 1 - b2**t`` given.
``softmax_xent_grad(logp, hot, n) -> dlogits``
    ``(exp(logp) - hot) / n`` from log-probabilities and the boolean one-hot labels.
``erf(x) -> y``
    the error function (the Array API has none; the fallback, `xpcnn.functional.erf`, is W. J.
    Cody's rational approximation). torch, JAX and CuPy register their own.
"""

from __future__ import annotations

from collections.abc import Callable

_HOOKS: dict[object, dict[str, Callable]] = {}

NAMES = ("relu", "relu_backward", "sgd", "adam", "softmax_xent_grad", "erf")


def register(xp, name: str, fn: Callable) -> None:
    """Use ``fn`` for step ``name`` on arrays of namespace ``xp``. Raises ValueError for an
    unknown name."""
    if name not in NAMES:
        raise ValueError(f"unknown hook {name!r}; hooks are {NAMES}")
    _HOOKS.setdefault(xp, {})[name] = fn


def unregister(xp, name: str | None = None) -> None:
    """Remove one hook of ``xp`` (or all of them): the fallback is used again."""
    if name is None:
        _HOOKS.pop(xp, None)
    else:
        _HOOKS.get(xp, {}).pop(name, None)


def hook(xp, name: str) -> Callable | None:
    """The hook registered for ``name`` on namespace ``xp``, or None (use the fallback)."""
    table = _HOOKS.get(xp)
    return None if table is None else table.get(name)


def registered(xp) -> tuple[str, ...]:
    """The names of the hooks ``xp`` has."""
    return tuple(_HOOKS.get(xp, {}))
