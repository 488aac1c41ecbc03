"""Backend hooks (fused kernels) against the plain Array API fallback they replace."""

import numpy as np
import pytest

from xpcnn import functional as F
from xpcnn import kernels, optim
from xpcnn.nn import Parameter

from conftest import assert_close

NO_HOOKS = {"cpu", "strict:cpu", "strict:device1", "strict:no_float64", "jax:cpu", "jax:cuda:0"}


class _Fallback:
    """Within the block, namespace ``xp`` has no hooks: the Array API expressions run."""

    def __init__(self, xp):
        self.xp = xp

    def __enter__(self):
        self.saved = {n: kernels.hook(self.xp, n) for n in kernels.registered(self.xp)}
        kernels.unregister(self.xp)

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            kernels.register(self.xp, name, fn)


def _both(backend, fn):
    """``fn()`` with the backend's hooks, then with the fallback."""
    fused = fn()
    with _Fallback(backend.xp):
        plain = fn()
    return fused, plain


def test_which_backends_have_hooks(backend):
    names = kernels.registered(backend.xp)
    if backend.name in NO_HOOKS:  # at most erf, which the Array API lacks
        assert set(names) <= {"erf"}
    else:
        assert {"relu", "relu_backward"} <= set(names)


def test_elementwise_hooks_equal_the_fallback(backend_dtype, rng):
    backend, dtype = backend_dtype
    if not kernels.registered(backend.xp):
        pytest.skip(f"{backend.name} registers no hooks: the fallback is the code")
    x = rng.standard_normal((64, 33))
    x[0, :3] = [0.0, -0.0, np.nan]
    g = rng.standard_normal(x.shape)
    xs, gs = backend.asarray(x, dtype), backend.asarray(g, dtype)
    for what, fn in (
        ("relu", lambda: F.relu(xs)),
        ("relu_backward", lambda: F.relu_backward(gs, F.relu(xs))),
    ):
        fused, plain = _both(backend, fn)
        assert_close(fused, plain, dtype, what, backend=backend)
    labels = backend.asarray(rng.integers(0, 33, 64), "int64")
    logits = backend.asarray(x[1:], dtype)
    (loss_f, grad_f), (loss_p, grad_p) = _both(backend, lambda: F.cross_entropy(logits, labels[1:]))
    assert_close(grad_f, grad_p, dtype, "cross-entropy gradient", backend=backend)
    assert_close(loss_f, loss_p, dtype, "cross-entropy", backend=backend)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("sgd", {"lr": 0.05, "momentum": 0.9}),
        ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
        ("adam", {"lr": 3e-3, "weight_decay": 1e-2}),
    ],
    ids=["sgd-momentum", "sgd-nesterov-wd", "adam-wd"],
)
def test_optimizer_hooks_equal_the_fallback(backend_dtype, rng, name, kwargs):
    backend, dtype = backend_dtype
    if not {"sgd", "adam"} & set(kernels.registered(backend.xp)):
        pytest.skip(f"{backend.name} has no fused optimizer update")
    init = rng.standard_normal((40, 7))
    grads = [rng.standard_normal(init.shape) for _ in range(4)]

    def run():
        p = Parameter(backend.asarray(init, dtype))
        opt = optim.make_optimizer(name, [p], **kwargs)
        for g in grads:
            p.grad = backend.asarray(g, dtype)
            opt.step()
        return p.data

    fused, plain = _both(backend, run)
    assert_close(fused, plain, dtype, f"{name} after 4 steps", backend=backend)


def test_register_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown hook"):
        kernels.register(np, "conv_magic", lambda x: x)
