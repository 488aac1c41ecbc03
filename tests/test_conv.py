"""Convolution forward and gradients against loops, finite differences and PyTorch, per backend."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpcnn import conv
from xpcnn.backends import to_numpy

import naive
from conftest import assert_close

# (N, C, H, W, O, k, s, p): odd sizes, strides 1-4, padding beyond k-1, kernel = whole input
CASES = [
    (2, 1, 28, 28, 4, 2, 2, 0),
    (2, 3, 14, 14, 5, 2, 2, 1),
    (2, 2, 7, 9, 3, 3, 1, 1),
    (1, 3, 11, 8, 2, 3, 3, 0),
    (2, 2, 10, 7, 2, 3, 3, 4),
    (1, 2, 9, 13, 3, 4, 4, 2),
    (2, 1, 5, 5, 2, 5, 1, 0),
    (1, 2, 6, 6, 2, 1, 2, 0),
    (3, 2, 8, 8, 2, 2, 3, 0),
]


def _data(rng, case):
    n, c, h, w, o, k, s, p = case
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((o, c, k, k))
    b = rng.standard_normal(o)
    return x, wt, b, (s, s), (p, p)


def _run(backend, dtype, x, wt, b, stride, padding, g=None, method="dilation"):
    xs, ws, bs = (backend.asarray(a, dtype) for a in (x, wt, b))
    z, col = conv.conv2d_forward(xs, ws, bs, stride, padding)
    assert backend.owns(z), "output left the input's namespace/device"
    if g is None:
        return z
    dx, dw, db = conv.conv2d_backward(
        backend.asarray(g, dtype), col, x.shape, ws, stride, padding, input_grad=method
    )
    for a in (dx, dw, db):
        assert backend.owns(a)
    return z, dx, dw, db


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_loops(backend_dtype, rng, case):
    backend, dtype = backend_dtype
    x, wt, b, s, p = _data(rng, case)
    assert_close(_run(backend, dtype, x, wt, b, s, p), naive.conv2d(x, wt, b, s, p), dtype)


@pytest.mark.parametrize("method", conv.INPUT_GRAD_METHODS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_loops(backend_dtype, rng, case, method):
    backend, dtype = backend_dtype
    x, wt, b, s, p = _data(rng, case)
    zref = naive.conv2d(x, wt, b, s, p)
    g = rng.standard_normal(zref.shape)
    _, dx, dw, db = _run(backend, dtype, x, wt, b, s, p, g, method)
    rdx, rdw, rdb = naive.conv2d_backward(g, x, wt, s, p)
    assert_close(dx, rdx, dtype, "dx")
    assert_close(dw, rdw, dtype, "dw")
    assert_close(db, rdb, dtype, "db")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_torch_autograd(backend_dtype, rng, case):
    torch = pytest.importorskip("torch")
    backend, dtype = backend_dtype
    x, wt, b, s, p = _data(rng, case)
    tx, tw, tb = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, wt, b))
    tz = torch.nn.functional.conv2d(tx, tw, tb, stride=s, padding=p)
    g = rng.standard_normal(tuple(tz.shape))
    tz.backward(torch.tensor(g))
    z, dx, dw, db = _run(backend, dtype, x, wt, b, s, p, g)
    for ours, ref, what in (
        (z, tz, "z"),
        (dx, tx.grad, "dx"),
        (dw, tw.grad, "dw"),
        (db, tb.grad, "db"),
    ):
        assert_close(ours, ref.detach().numpy(), dtype, what)


def _fd_check(f, arrays, analytic, rng, h=1e-6, picks=12):
    """Central differences of scalar f at random entries of each array vs the analytic grads."""
    for name, a in arrays.items():
        for idx in zip(*(rng.integers(0, d, picks) for d in a.shape), strict=True):
            orig = a[idx]
            a[idx] = orig + h
            up = f()
            a[idx] = orig - h
            down = f()
            a[idx] = orig
            fd = (up - down) / (2 * h)
            got = analytic[name][idx]
            assert abs(fd - got) <= 1e-6 * max(1.0, abs(fd)), (name, idx, fd, got)


@pytest.mark.parametrize("method", conv.INPUT_GRAD_METHODS)
@pytest.mark.parametrize("case", CASES[1:6], ids=str)
def test_finite_differences(backend64, rng, case, method):
    x, wt, b, s, p = _data(rng, case)
    r = rng.standard_normal(naive.conv2d(x, wt, b, s, p).shape)

    def loss():  # L = sum(Z * R), evaluated on the backend under test
        return float(np.sum(to_numpy(_run(backend64, "float64", x, wt, b, s, p)) * r))

    _, dx, dw, db = _run(backend64, "float64", x, wt, b, s, p, r, method)
    grads = {"x": to_numpy(dx), "w": to_numpy(dw), "b": to_numpy(db)}
    _fd_check(loss, {"x": x, "w": wt, "b": b}, grads, rng)


conv_cases = st.tuples(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(0, 3),
).filter(lambda t: t[2] + 2 * t[7] >= t[5] and t[3] + 2 * t[7] >= t[5])


@settings(max_examples=30, deadline=None)
@given(case=conv_cases, seed=st.integers(0, 2**31 - 1))
def test_property_all_shapes(backend64, case, seed):
    """Any N, C, H, W, kernel, stride (3+ included) and padding: both input-gradient methods
    agree with the loops, and forward agrees with the loops."""
    rng = np.random.default_rng(seed)
    x, wt, b, s, p = _data(rng, case)
    zref = naive.conv2d(x, wt, b, s, p)
    g = rng.standard_normal(zref.shape)
    rdx, rdw, rdb = naive.conv2d_backward(g, x, wt, s, p)
    for method in conv.INPUT_GRAD_METHODS:
        z, dx, dw, db = _run(backend64, "float64", x, wt, b, s, p, g, method)
        assert_close(z, zref, "float64", "z")
        assert_close(dx, rdx, "float64", f"dx {method}")
        assert_close(dw, rdw, "float64", "dw")
        assert_close(db, rdb, "float64", "db")


def test_dilate_pad_worked_example(backend):
    """A 2x2 gradient, stride 2, kernel 2, padding 0 on a 4x4 input: offset k-1-p = 1."""
    g = backend.asarray(np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 2, 2, 1), "float32")
    d = to_numpy(conv.dilate_pad(g, (2, 2), (1, 1), (5, 5)))[0, :, :, 0]
    expected = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, 1, 0, 2, 0],
            [0, 0, 0, 0, 0],
            [0, 3, 0, 4, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=float,
    )
    np.testing.assert_array_equal(d, expected)


def test_dilate_pad_crops_negative_offset(backend):
    """Padding larger than k-1 gives a negative offset: the leading elements are cropped."""
    g = backend.asarray(np.arange(1.0, 5.0).reshape(1, 4, 1, 1), "float32")
    d = to_numpy(conv.dilate_pad(g, (2, 1), (-2, 0), (4, 1)))[0, :, 0, 0]
    np.testing.assert_array_equal(d, [2.0, 0.0, 3.0, 0.0])


def test_rotate_kernel(backend):
    w = np.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2)
    r = to_numpy(conv.rotate_kernel(backend.asarray(w, "float32")))
    assert r.shape == (3, 2, 2, 2)
    np.testing.assert_array_equal(r[1, 0], w[0, 1, ::-1, ::-1])


def test_unknown_input_grad_method(backend):
    x = backend.asarray(np.ones((1, 1, 4, 4)), "float32")
    w = backend.asarray(np.ones((1, 1, 2, 2)), "float32")
    z, col = conv.conv2d_forward(x, w, None, 2, 0)
    with pytest.raises(ValueError, match="input_grad must be one of"):
        conv.conv2d_backward(z, col, x.shape, w, 2, 0, input_grad="fft")


@pytest.mark.parametrize("bad", [-1, (1, 2, 3), 1.5, "2"])
def test_pair_refuses_bad_values(bad):
    with pytest.raises((TypeError, ValueError), match="stride"):
        conv.pair(bad, "stride")
