"""Convolution forward and gradients against loops, finite differences and PyTorch, per backend."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpcnn import conv
from xpcnn.backends import get_backend, to_numpy

import naive
from conftest import assert_close

# (N, C, H, W, O, k, s, p), k/s/p an int or an (h, w) pair: odd sizes, strides 1-4, padding
# beyond k-1, kernel = whole input, stride > kernel, remainder rows, rectangular everything
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
    (2, 3, 9, 10, 3, (3, 2), (2, 1), (1, 0)),
    (1, 2, 11, 7, 2, (2, 5), (3, 2), (0, 3)),
    (3, 1, 7, 12, 2, (1, 4), (2, 3), (2, 1)),
]


def case_id(case):
    """``(2, 3, 14, 14, 5, 2, 2, 1)`` -> ``"n2c3h14w14-o5k2s2p1"``; pairs as ``k3x2``."""
    n, c, h, w, o, k, s, p = case
    hw = "x".join
    k, s, p = (hw(map(str, v)) if isinstance(v, tuple) else str(v) for v in (k, s, p))
    return f"n{n}c{c}h{h}w{w}-o{o}k{k}s{s}p{p}"


def _data(rng, case):
    n, c, h, w, o, k, s, p = case
    k, s, p = (conv.pair(v) for v in (k, s, p))
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((o, c, *k))
    b = rng.standard_normal(o)
    return x, wt, b, s, p


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


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_loops(backend_dtype, rng, case):
    backend, dtype = backend_dtype
    x, wt, b, s, p = _data(rng, case)
    z = _run(backend, dtype, x, wt, b, s, p)
    assert_close(z, naive.conv2d(x, wt, b, s, p), dtype, "z", backend=backend)


@pytest.mark.parametrize("method", conv.INPUT_GRAD_METHODS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_loops(backend_dtype, rng, case, method):
    backend, dtype = backend_dtype
    x, wt, b, s, p = _data(rng, case)
    zref = naive.conv2d(x, wt, b, s, p)
    g = rng.standard_normal(zref.shape)
    _, dx, dw, db = _run(backend, dtype, x, wt, b, s, p, g, method)
    rdx, rdw, rdb = naive.conv2d_backward(g, x, wt, s, p)
    assert_close(dx, rdx, dtype, "dx", backend=backend)
    assert_close(dw, rdw, dtype, "dw", backend=backend)
    assert_close(db, rdb, dtype, "db", backend=backend)


@pytest.mark.parametrize("case", CASES, ids=case_id)
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
        assert_close(ours, ref.detach().numpy(), dtype, what, backend=backend)


def _fd_check(f, arrays, analytic, rng, h=1e-6, picks=12):
    """Central differences of scalar f at random entries of each array vs every set of analytic
    gradients in ``analytic`` (label -> {array name -> gradient})."""
    for name, a in arrays.items():
        for idx in zip(*(rng.integers(0, d, picks) for d in a.shape), strict=True):
            orig = a[idx]
            a[idx] = orig + h
            up = f()
            a[idx] = orig - h
            down = f()
            a[idx] = orig
            fd = (up - down) / (2 * h)
            for label, grads in analytic.items():
                got = grads[name][idx]
                assert abs(fd - got) <= 1e-6 * max(1.0, abs(fd)), (label, name, idx, fd, got)


@pytest.mark.parametrize("case", CASES[1:6] + CASES[9:11], ids=case_id)
def test_finite_differences(backend64, rng, case):
    """Every input-gradient method (and dW, db) against central differences of the forward."""
    x, wt, b, s, p = _data(rng, case)
    r = rng.standard_normal(naive.conv2d(x, wt, b, s, p).shape)

    def loss():  # L = sum(Z * R), evaluated on the backend under test
        return float(np.sum(to_numpy(_run(backend64, "float64", x, wt, b, s, p)) * r))

    analytic = {}
    for method in conv.INPUT_GRAD_METHODS:
        _, dx, dw, db = _run(backend64, "float64", x, wt, b, s, p, r, method)
        analytic[method] = {"x": to_numpy(dx), "w": to_numpy(dw), "b": to_numpy(db)}
    _fd_check(loss, {"x": x, "w": wt, "b": b}, analytic, rng)


_pairs = st.tuples(st.integers(1, 4), st.integers(1, 4))  # kernel and stride, (h, w)
conv_cases = st.tuples(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(1, 3),
    _pairs,
    _pairs,
    st.tuples(st.integers(0, 3), st.integers(0, 3)),
).filter(lambda t: t[2] + 2 * t[7][0] >= t[5][0] and t[3] + 2 * t[7][1] >= t[5][1])


@settings(max_examples=30, deadline=None)
@given(case=conv_cases, seed=st.integers(0, 2**31 - 1))
def test_property_all_shapes(backend64, case, seed):
    if backend64.family == "jax":  # eager JAX dispatches each operation: far fewer examples
        pytest.skip("JAX runs test_property_all_shapes_jax (fewer examples)")
    _property_all_shapes(backend64, case, seed)


@settings(max_examples=5, deadline=None)
@given(case=conv_cases, seed=st.integers(0, 2**31 - 1))
def test_property_all_shapes_jax(backend64, case, seed):
    """The same property on JAX, with fewer examples (each is dozens of eager dispatches)."""
    if backend64.family != "jax":
        pytest.skip("JAX only")
    _property_all_shapes(backend64, case, seed)


def _property_all_shapes(backend64, case, seed):
    """Any N, C, H, W, rectangular kernel, stride (3+ included) and padding: forward and every
    input-gradient method agree with the loops, and the methods with each other to float64
    precision."""
    rng = np.random.default_rng(seed)
    x, wt, b, s, p = _data(rng, case)
    zref = naive.conv2d(x, wt, b, s, p)
    g = rng.standard_normal(zref.shape)
    rdx, rdw, rdb = naive.conv2d_backward(g, x, wt, s, p)
    dxs = {}
    for method in conv.INPUT_GRAD_METHODS:
        z, dx, dw, db = _run(backend64, "float64", x, wt, b, s, p, g, method)
        assert_close(z, zref, "float64", "z", backend=backend64)
        assert_close(dx, rdx, "float64", f"dx {method}", backend=backend64)
        assert_close(dw, rdw, "float64", "dw", backend=backend64)
        assert_close(db, rdb, "float64", "db", backend=backend64)
        dxs[method] = to_numpy(dx)
    for method, dx in dxs.items():
        np.testing.assert_allclose(
            dx, dxs["dilation-zeros"], rtol=1e-12, atol=1e-12, err_msg=method
        )


def test_dilation_phases_worked_example():
    """The docs' example (H=5, k=2, s=2, p=0, OH=2): two phases of one tap each; the last row of
    phase 0 (input row 4) is past the last window, so that phase has 2 of its 3 rows."""
    assert conv.dilation_phases(5, 2, 2, 0, 2) == (((0, 2, ((0, 0),)), (1, 2, ((1, 0),))), (0, 0))


def test_dilation_phases_several_taps_and_none():
    # k=3, s=2, p=1, H=8, OH=4. Phase 0 (padded rows t = 1, 3, ..) meets tap 1 only. Phase 1
    # (t = 2, 4, .., 8) meets taps 0 and 2: dX[1] = G[1] W[0] + G[0] W[2], tap 2's window one G
    # row earlier; its last row t = 8 would take G[4] W[0], past G's end: one zero row behind.
    assert conv.dilation_phases(8, 3, 2, 1, 4) == (
        ((0, 4, ((1, 0),)), (1, 4, ((0, 1), (2, 0)))),
        (0, 1),
    )
    # k=1, s=3: phases 1 and 2 meet no tap, so they get no rows (their gradient is zero).
    assert conv.dilation_phases(7, 1, 3, 0, 3) == (
        ((0, 3, ((0, 0),)), (1, 0, ()), (2, 0, ())),
        (0, 0),
    )


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


# (case, dtype): SimpleCNN's conv1 (phases interleaved by a permutation) and conv2 (padding 1,
# strided writes), padding > k-1, rectangular with several taps per phase and G padded, phases
# without taps (stride > kernel). Each takes about a second to compile, hence a few.
JAX_CASES = [
    (CASES[0], "float32"),
    (CASES[1], "float64"),
    (CASES[4], "float32"),
    (CASES[9], "float64"),
    (CASES[10], "float32"),
]


@pytest.mark.parametrize(
    ("case", "dtype"), JAX_CASES, ids=[f"{case_id(c)}-{d}" for c, d in JAX_CASES]
)
def test_jax_jit_matches_numpy(case, dtype):
    """Forward and every gradient traced by jax.jit (immutable arrays, tracers without a device)
    equal NumPy's; a buffers dict passed through keeps nothing, so no tracer outlives the trace
    (jax.checking_leaks raises if one does); a second call with new values reuses the trace."""
    jax = pytest.importorskip("jax")
    buffers, numpy_buffers = {}, {}

    def step(x, w, b, g, s, p, buffers=buffers):
        z, col = conv.conv2d_forward(x, w, b, s, p, buffers)
        grads = {
            m: conv.conv2d_backward(g, col, x.shape, w, s, p, input_grad=m, buffers=buffers)
            for m in conv.INPUT_GRAD_METHODS
        }
        return z, grads

    cpu = jax.devices("cpu")[0]  # CPU precision: a GPU may multiply float32 in TF32
    with jax.enable_x64(dtype == "float64"), jax.default_device(cpu), jax.checking_leaks():
        jitted = jax.jit(step, static_argnums=(4, 5))
        for seed in (1, 2):
            rng = np.random.default_rng(seed)
            x, wt, b, s, p = _data(rng, case)
            g = rng.standard_normal(naive.conv2d(x, wt, b, s, p).shape)
            z, grads = jitted(*(jax.numpy.asarray(a, dtype=dtype) for a in (x, wt, b, g)), s, p)
            zref, ref = step(x, wt, b, g, s, p, numpy_buffers)  # NumPy float64
            assert z.dtype == jax.numpy.dtype(dtype)
            host = get_backend("cpu")  # the dtype was checked on the JAX array above
            assert_close(np.asarray(z), zref, dtype, "z", backend=host)
            for m, ours in grads.items():
                for what, a, r in zip(("dx", "dw", "db"), ours, ref[m], strict=True):
                    assert a.dtype == z.dtype, (what, m)
                    assert_close(np.asarray(a), r, dtype, f"{what} {m}", backend=host)
    assert not buffers, "a JAX array was kept for reuse"


def test_buffers_reused_only_when_writeable():
    """NumPy arrays are kept in the caller's dict and rewritten in place; read-only ones and
    JAX arrays are not reused."""
    rng = np.random.default_rng(0)
    x, wt, b, s, p = _data(rng, (1, 2, 6, 6, 2, 3, 2, 1))
    g = rng.standard_normal(naive.conv2d(x, wt, b, s, p).shape)
    buffers = {}
    for _ in range(2):
        z, col = conv.conv2d_forward(x, wt, b, s, p, buffers)
        conv.conv2d_backward(
            g, col, x.shape, wt, s, p, input_grad="dilation-zeros", buffers=buffers
        )
        if _ == 0:
            kept = dict(buffers)
    assert set(kept) == {"pad", "dilated"}
    assert all(buffers[k] is kept[k] for k in kept)  # the second call reused them
    kept["pad"].flags.writeable = False
    assert conv._reusable(kept["pad"], kept["pad"].shape, kept["pad"]) is None
    z2, _ = conv.conv2d_forward(x, wt, b, s, p, buffers)
    assert buffers["pad"] is not kept["pad"]
    np.testing.assert_array_equal(z2, z)
    jnp = pytest.importorskip("jax.numpy")
    ja = jnp.zeros(kept["dilated"].shape, dtype=jnp.float32)
    assert conv._reusable(ja, ja.shape, ja) is None


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


def _im2col_loops(x, k, s):
    """im2col by loops over output pixels: row (n, y, x), columns in (i, j, c) order."""
    n, h, w, c = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    col = np.empty((n, oh, ow, k, k, c))
    for y in range(oh):
        for xx in range(ow):
            col[:, y, xx] = x[:, s * y : s * y + k, s * xx : s * xx + k, :]
    return col.reshape(n * oh * ow, k * k * c)


# (N, H, W, C, k, s): windows that tile the input (the permutation path for C > 1), with and
# without leftover rows and columns, one channel (strided slices), and overlapping windows
IM2COL_CASES = [(2, 8, 8, 3, 2, 2), (1, 11, 7, 2, 3, 3), (2, 9, 9, 4, 2, 2), (2, 9, 9, 1, 2, 2)]


@pytest.mark.parametrize(
    "case", IM2COL_CASES + [(1, 7, 6, 3, 3, 2)], ids=lambda c: "n{}h{}w{}c{}-k{}s{}".format(*c)
)
def test_im2col_matches_loops(backend_dtype, rng, case):
    backend, dtype = backend_dtype
    n, h, w, c, k, s = case
    x = rng.standard_normal((n, h, w, c))
    col, (oh, ow) = conv.im2col(backend.asarray(x, dtype), (k, k), (s, s))
    assert (oh, ow) == ((h - k) // s + 1, (w - k) // s + 1)
    assert_close(col, _im2col_loops(x, k, s), dtype, "col", backend=backend)


def test_matrix_order_keeps_the_values(backend_dtype, rng):
    """`matrix_order` changes where the weight's values live, never what they are."""
    backend, dtype = backend_dtype
    for shape in [(4, 3, 2, 2), (5, 1, 3, 2), (2, 6, 1, 1)]:
        w = rng.standard_normal(shape)
        arranged = conv.matrix_order(backend.asarray(w, dtype))
        assert tuple(arranged.shape) == shape
        assert_close(arranged, w, dtype, f"matrix_order {shape}", backend=backend)
        assert np.array_equal(to_numpy(arranged), to_numpy(backend.asarray(w, dtype)))


@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_conv2d_keeps_its_weight_in_matrix_order(device):
    """The speed property behind batch-1 latency (docs/performance.md): on NumPy and torch the
    forward's right factor ``weight_matrix(W).T`` is a C-ordered view of the weight after
    creation, loading C-ordered arrays, moving, a deferred build and optimizer steps; and
    `state_dict` hands out C-ordered copies."""
    import xpcnn
    from xpcnn import functional as F
    from xpcnn.interop import from_torch, to_torch

    if device.startswith("torch"):
        pytest.importorskip("torch")

    def check(model):
        for m in (model.conv1, model.conv2, model.conv3):
            factor = model.backend.to_host(conv.weight_matrix(m.weight.data).T)
            assert factor.flags.c_contiguous, m.label
            assert np.shares_memory(factor, model.backend.to_host(m.weight.data)), m.label

    model = xpcnn.SimpleCNN(seed=0, device=device)
    check(model)
    state = xpcnn.SimpleCNN(seed=1).state_dict()
    assert all(v.flags.c_contiguous for v in state.values())
    model.load_state_dict(state)
    check(model)
    out = model.state_dict()
    assert all(v.flags.c_contiguous for v in out.values())
    out["conv3.weight"][...] = 0.0  # a copy: the model keeps its weights
    assert float(np.abs(model.backend.to_host(model.conv3.weight.data)).max()) > 0

    moved = xpcnn.SimpleCNN(seed=2, device=device)
    for m in (moved.conv1, moved.conv2, moved.conv3):  # C order, as a user might set it
        m.weight.data = moved.backend.asarray(out[m.name + ".weight"], "float32")
    moved.to(device, dtype="float64")
    check(moved)
    check(from_torch(to_torch(model)).to(device))  # built deferred, weights loaded afterwards

    rng = np.random.default_rng(0)
    b = model.backend
    x = b.asarray(rng.random((8, 1, 28, 28)), "float32")
    y = b.asarray(rng.integers(0, 10, 8), "int64")
    for opt in (
        xpcnn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4),
        xpcnn.optim.Adam(model.parameters(), lr=1e-3),
    ):
        for _ in range(2):
            _, g = F.cross_entropy(model(x), y)
            model.backward(g, need_input_grad=False)
            opt.step()
        check(model)


def test_im2col_never_shares_memory_with_its_input():
    """A 1x1 kernel with stride 1 tiles the input too; the matrix must still be a copy (the
    backward pass uses it after the caller may have reused the input's memory)."""
    x = np.random.default_rng(0).random((2, 3, 3, 4))
    col, _ = conv.im2col(x, (1, 1), (1, 1))
    assert not np.shares_memory(col, x)
    np.testing.assert_array_equal(col, x.reshape(18, 4))
