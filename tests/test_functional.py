"""ReLU, linear and softmax cross-entropy gradients: finite differences and torch autograd."""

import numpy as np
import pytest

from xpcnn import functional as F
from xpcnn.backends import to_numpy

import naive
from conftest import assert_close
from test_conv import _fd_check


def test_relu_forward_backward(backend_dtype, rng):
    backend, dtype = backend_dtype
    x = rng.standard_normal((4, 7))
    g = rng.standard_normal((4, 7))
    y = F.relu(backend.asarray(x, dtype))
    assert_close(y, np.maximum(x, 0), dtype, backend=backend)
    assert_close(F.relu_backward(backend.asarray(g, dtype), y), g * (x > 0), dtype, backend=backend)
    assert backend.owns(y)


def test_linear_finite_differences(backend64, rng):
    x, w, b = rng.standard_normal((5, 7)), rng.standard_normal((3, 7)), rng.standard_normal(3)
    r = rng.standard_normal((5, 3))

    def run():
        return F.linear(*(backend64.asarray(a, "float64") for a in (x, w, b)))

    def loss():
        return float(np.sum(to_numpy(run()) * r))

    dx, dw, db = F.linear_backward(
        backend64.asarray(r, "float64"),
        backend64.asarray(x, "float64"),
        backend64.asarray(w, "float64"),
    )
    grads = {"x": to_numpy(dx), "w": to_numpy(dw), "b": to_numpy(db)}
    _fd_check(loss, {"x": x, "w": w, "b": b}, {"analytic": grads}, rng)


def test_linear_matches_torch(backend_dtype, rng):
    torch = pytest.importorskip("torch")
    backend, dtype = backend_dtype
    x, w, b = rng.standard_normal((6, 9)), rng.standard_normal((4, 9)), rng.standard_normal(4)
    g = rng.standard_normal((6, 4))
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = torch.nn.functional.linear(tx, tw, tb)
    ty.backward(torch.tensor(g))
    xs, ws, bs = (backend.asarray(a, dtype) for a in (x, w, b))
    y = F.linear(xs, ws, bs)
    dx, dw, db = F.linear_backward(backend.asarray(g, dtype), xs, ws)
    for ours, ref in ((y, ty), (dx, tx.grad), (dw, tw.grad), (db, tb.grad)):
        assert backend.owns(ours)
        assert_close(ours, ref.detach().numpy(), dtype, backend=backend)


def test_linear_skips_input_grad(backend, rng):
    x = backend.asarray(rng.standard_normal((2, 3)), "float32")
    w = backend.asarray(rng.standard_normal((4, 3)), "float32")
    dx, dw, db = F.linear_backward(backend.asarray(np.ones((2, 4)), "float32"), x, w, False)
    assert dx is None and dw.shape == (4, 3) and db.shape == (4,)


@pytest.mark.parametrize("labels_dtype", ["uint8", "int64"])
def test_cross_entropy_matches_loops_and_torch(backend_dtype, rng, labels_dtype):
    torch = pytest.importorskip("torch")
    backend, dtype = backend_dtype
    z = rng.standard_normal((8, 10)) * 5
    t = rng.integers(0, 10, 8)
    loss, grad = F.cross_entropy(backend.asarray(z, dtype), backend.asarray(t, labels_dtype))
    assert backend.owns(loss) and backend.owns(grad)
    rl, rg = naive.cross_entropy(z, t)
    assert_close(loss, rl, dtype, "loss", backend=backend)
    assert_close(grad, rg, dtype, "grad", backend=backend)
    tz = torch.tensor(z, requires_grad=True)
    tl = torch.nn.functional.cross_entropy(tz, torch.tensor(t))
    tl.backward()
    assert_close(loss, tl.item(), dtype, "loss vs torch", backend=backend)
    assert_close(grad, tz.grad.numpy(), dtype, "grad vs torch", backend=backend)


def test_cross_entropy_finite_differences(backend64, rng):
    z = rng.standard_normal((6, 5)) * 3
    t = rng.integers(0, 5, 6)
    labels = backend64.asarray(t, "int64")

    def loss():
        return float(to_numpy(F.cross_entropy(backend64.asarray(z, "float64"), labels)[0]))

    grad = to_numpy(F.cross_entropy(backend64.asarray(z, "float64"), labels)[1])
    _fd_check(loss, {"z": z}, {"analytic": {"z": grad}}, rng)


def test_cross_entropy_is_stable_for_huge_logits(backend, rng):
    """log-sum-exp, no epsilon: logits of 1e4 neither overflow nor produce NaN."""
    z = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]])
    loss, grad = F.cross_entropy(backend.asarray(z, "float32"), backend.asarray([0, 0], "int64"))
    assert np.isfinite(to_numpy(loss)) and np.isfinite(to_numpy(grad)).all()
    assert abs(float(to_numpy(loss)) - 5e3) < 1.0
