"""Pooling, batch norm, dropout and activation layers: forward and every gradient against torch
autograd (float64 reference) on every namespace of the matrix, against float64 finite
differences, train and eval modes, PyTorch's tie-breaking in max pooling, batch-norm running
statistics after several optimizer steps, and state-dict keys."""

import math

import numpy as np
import pytest

from xpcnn import functional as F
from xpcnn import nn, optim, random
from xpcnn.backends import get_backend, to_numpy
from xpcnn.step import TrainStep

from conftest import assert_close

torch = pytest.importorskip("torch")
T = torch.nn


def _case(id_, ours, theirs, shape, params=()):
    """One layer configuration: xpcnn and torch factories, an input shape and the names of
    its parameters."""
    return pytest.param(ours, theirs, shape, params, id=id_)


BN = ("weight", "bias")
CASES = [
    _case("MaxPool2d-k2s2p0", lambda: nn.MaxPool2d(2), lambda: T.MaxPool2d(2), (2, 3, 6, 7)),
    _case("MaxPool2d-k3s2p1", lambda: nn.MaxPool2d(3, 2, 1), lambda: T.MaxPool2d(3, 2, 1),
          (2, 2, 7, 6)),
    _case("MaxPool2d-k3s1p1", lambda: nn.MaxPool2d(3, 1, 1), lambda: T.MaxPool2d(3, 1, 1),
          (1, 2, 5, 5)),
    _case("MaxPool2d-k3x2s1x2p1x0", lambda: nn.MaxPool2d((3, 2), (1, 2), (1, 0)),
          lambda: T.MaxPool2d((3, 2), (1, 2), (1, 0)), (2, 2, 5, 6)),
    _case("MaxPool2d-k2s3p1", lambda: nn.MaxPool2d(2, 3, 1), lambda: T.MaxPool2d(2, 3, 1),
          (2, 2, 7, 8)),
    _case("AvgPool2d-k2s2p0", lambda: nn.AvgPool2d(2), lambda: T.AvgPool2d(2), (2, 3, 6, 7)),
    _case("AvgPool2d-k3s2p1", lambda: nn.AvgPool2d(3, 2, 1), lambda: T.AvgPool2d(3, 2, 1),
          (2, 2, 7, 6)),
    _case("AvgPool2d-k3s2p1-nopadcount", lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False),
          lambda: T.AvgPool2d(3, 2, 1, count_include_pad=False), (2, 2, 7, 6)),
    _case("AvgPool2d-k3s1p1-nopadcount", lambda: nn.AvgPool2d(3, 1, 1, count_include_pad=False),
          lambda: T.AvgPool2d(3, 1, 1, count_include_pad=False), (1, 2, 5, 4)),
    _case("AdaptiveAvgPool2d-o1", lambda: nn.AdaptiveAvgPool2d(1),
          lambda: T.AdaptiveAvgPool2d(1), (2, 3, 5, 4)),
    _case("AdaptiveAvgPool2d-o2x3", lambda: nn.AdaptiveAvgPool2d((2, 3)),
          lambda: T.AdaptiveAvgPool2d((2, 3)), (2, 2, 7, 5)),
    _case("AvgPool2d-k2s3p1-nopadcount", lambda: nn.AvgPool2d(2, 3, 1, count_include_pad=False),
          lambda: T.AvgPool2d(2, 3, 1, count_include_pad=False), (2, 2, 7, 8)),
    _case("AdaptiveAvgPool2d-o2x3-tiles", lambda: nn.AdaptiveAvgPool2d((2, 3)),
          lambda: T.AdaptiveAvgPool2d((2, 3)), (2, 2, 6, 9)),
    _case("AdaptiveAvgPool2d-o5x4-upsamples", lambda: nn.AdaptiveAvgPool2d((5, 4)),
          lambda: T.AdaptiveAvgPool2d((5, 4)), (2, 2, 3, 3)),
    _case("AdaptiveAvgPool2d-o3", lambda: nn.AdaptiveAvgPool2d(3),
          lambda: T.AdaptiveAvgPool2d(3), (1, 2, 7, 7)),
    _case("BatchNorm2d", lambda: nn.BatchNorm2d(3), lambda: T.BatchNorm2d(3), (4, 3, 5, 4), BN),
    _case("BatchNorm2d-eps1e-3-m0.3", lambda: nn.BatchNorm2d(3, 1e-3, 0.3),
          lambda: T.BatchNorm2d(3, 1e-3, 0.3), (3, 3, 4, 4), BN),
    _case("BatchNorm2d-momentumNone", lambda: nn.BatchNorm2d(2, momentum=None),
          lambda: T.BatchNorm2d(2, momentum=None), (3, 2, 3, 3), BN),
    _case("BatchNorm2d-noaffine", lambda: nn.BatchNorm2d(3, affine=False),
          lambda: T.BatchNorm2d(3, affine=False), (4, 3, 3, 3)),
    _case("BatchNorm1d-NC", lambda: nn.BatchNorm1d(5), lambda: T.BatchNorm1d(5), (6, 5), BN),
    _case("BatchNorm1d-NCL", lambda: nn.BatchNorm1d(3), lambda: T.BatchNorm1d(3), (4, 3, 5), BN),
    _case("LeakyReLU-0.01", lambda: nn.LeakyReLU(), lambda: T.LeakyReLU(), (3, 4, 5)),
    _case("LeakyReLU-0.2", lambda: nn.LeakyReLU(0.2), lambda: T.LeakyReLU(0.2), (3, 7)),
    _case("ELU-1", lambda: nn.ELU(), lambda: T.ELU(), (3, 4, 5)),
    _case("ELU-0.5", lambda: nn.ELU(0.5), lambda: T.ELU(0.5), (3, 7)),
    _case("GELU-erf", lambda: nn.GELU(), lambda: T.GELU(), (3, 4, 5)),
    _case("GELU-tanh", lambda: nn.GELU("tanh"), lambda: T.GELU(approximate="tanh"), (3, 4, 5)),
    _case("Tanh", lambda: nn.Tanh(), lambda: T.Tanh(), (3, 4, 5)),
    _case("Sigmoid", lambda: nn.Sigmoid(), lambda: T.Sigmoid(), (3, 4, 5)),
]  # fmt: skip


def _input(rng, shape, kinks=True):
    """Normal values spread out (no accidental max-pool ties); with ``kinks`` some exact zeros
    and large magnitudes (activations' derivative at 0, saturation)."""
    x = rng.standard_normal(shape) * 2.0
    if kinks and x.size >= 6:
        flat = x.reshape(-1)
        flat[:3] = 0.0
        flat[3], flat[4], flat[5] = 30.0, -30.0, -12.0
    return x


def _random_stats(layer, twin, rng):
    """Give both batch norms the same non-trivial running statistics (eval mode uses them)."""
    if getattr(layer, "running_mean", None) is None:
        return
    c = layer.num_features
    mean, var = rng.standard_normal(c), rng.random(c) + 0.5
    layer.load_state_dict(
        dict(layer.state_dict(), running_mean=mean, running_var=var)
        | ({"weight": rng.random(c) + 0.5, "bias": rng.standard_normal(c)} if layer.affine else {})
    )
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in layer.state_dict().items()})


def _pair(ours, theirs, backend, dtype, rng):
    layer = ours().to(backend, dtype)
    twin = theirs().double()
    _random_stats(layer, twin, rng)
    return layer, twin


@pytest.mark.parametrize("ours, theirs, shape, params", CASES)
def test_train_mode_matches_torch_autograd(backend_dtype, rng, ours, theirs, shape, params):
    """Forward, dL/dx and every parameter gradient against torch autograd in float64, and (batch
    norm) the running statistics after the forward pass; results on the backend's device."""
    backend, dtype = backend_dtype
    layer, twin = _pair(ours, theirs, backend, dtype, rng)
    layer.train()
    twin.train()
    x = _input(rng, shape)
    tx = torch.tensor(x, requires_grad=True)
    ty = twin(tx)
    g = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.from_numpy(g))

    y = layer(backend.asarray(x, dtype))
    dx = layer.backward(backend.asarray(g, dtype))
    assert_close(y, ty.detach().numpy(), dtype, "forward", backend=backend)
    assert_close(dx, tx.grad.numpy(), dtype, "dL/dx", backend=backend)
    for name in params:
        p = getattr(layer, name)
        assert_close(p.grad, getattr(twin, name).grad.numpy(), dtype, name, backend=backend)
    expected = twin.state_dict()
    assert list(layer.state_dict()) == list(expected)  # PyTorch's keys, in its order
    for name, b in layer.named_buffers():
        if b.kind == "int64":
            assert b.data.dtype == backend.dtype("int64")
            assert int(to_numpy(b.data)) == int(expected[name]), name
        else:
            assert_close(b.data, expected[name].numpy(), dtype, name, backend=backend)


EVAL_CASES = [c for c in CASES if c.id.startswith("BatchNorm")]


@pytest.mark.parametrize("ours, theirs, shape, params", EVAL_CASES)
def test_eval_mode_matches_torch(backend_dtype, rng, ours, theirs, shape, params):
    """Eval mode: batch norm normalises with its running statistics, changes no state and keeps
    nothing for a backward pass (which then refuses)."""
    backend, dtype = backend_dtype
    layer, twin = _pair(ours, theirs, backend, dtype, rng)
    layer.eval()
    twin.eval()
    x = _input(rng, shape)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x)).numpy()
    before = layer.state_dict()
    assert_close(layer(backend.asarray(x, dtype)), expected, dtype, "eval forward", backend=backend)
    assert layer._cache is None
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} changed in eval mode")
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(backend.asarray(np.zeros(expected.shape), dtype))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 4, 5)], ids=["NC", "NCHW"])
def test_batch_norm_eval_gradients_match_torch(backend_dtype, rng, shape, affine):
    """The eval-mode math (fixed statistics, an affine map) and its gradients, as functions."""
    backend, dtype = backend_dtype
    c = shape[1]
    x, g = rng.standard_normal(shape), rng.standard_normal(shape)
    mean, var = rng.standard_normal(c), rng.random(c) + 0.5
    w, b = rng.random(c) + 0.5, rng.standard_normal(c)
    t = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    ty = torch.nn.functional.batch_norm(
        t[0], torch.tensor(mean), torch.tensor(var), t[1] if affine else None,
        t[2] if affine else None, training=False, eps=1e-5,
    )  # fmt: skip
    ty.backward(torch.from_numpy(g))
    a = [backend.asarray(v, dtype) for v in (x, mean, var, w, b, g)]
    weight, bias = (a[3], a[4]) if affine else (None, None)
    y = F.batch_norm_eval(a[0], a[1], a[2], weight, bias, 1e-5)
    dx, dw, db = F.batch_norm_eval_backward(a[5], a[0], a[1], a[2], weight, 1e-5)
    assert_close(y, ty.detach().numpy(), dtype, "forward", backend=backend)
    assert_close(dx, t[0].grad.numpy(), dtype, "dx", backend=backend)
    if affine:
        assert_close(dw, t[1].grad.numpy(), dtype, "dweight", backend=backend)
        assert_close(db, t[2].grad.numpy(), dtype, "dbias", backend=backend)
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("ours, theirs, shape, params", CASES)
def test_gradients_match_finite_differences(backend64, rng, ours, theirs, shape, params):
    """dL/dx and the parameter gradients against central differences of L = sum(y * r) along
    random directions, in float64, with nothing from torch."""
    backend = backend64
    layer = ours().to(backend, "float64").train()
    x = _input(rng, shape, kinks=False)
    r = None

    def loss(x_host):
        y = layer(backend.asarray(x_host, "float64"))
        return float(np.sum(to_numpy(y) * r))

    y = layer(backend.asarray(x, "float64"))
    r = rng.standard_normal(tuple(y.shape))
    dx = to_numpy(layer.backward(backend.asarray(r, "float64")))
    grads = {name: to_numpy(getattr(layer, name).grad) for name in params}
    eps = 1e-6
    d = rng.standard_normal(shape)
    numeric = (loss(x + eps * d) - loss(x - eps * d)) / (2 * eps)
    assert np.sum(dx * d) == pytest.approx(numeric, rel=1e-6, abs=1e-8)
    for name in params:
        p = getattr(layer, name)
        base = to_numpy(p.data).copy()
        dp = rng.standard_normal(base.shape)
        values = []
        for sign in (1, -1):
            p.data = backend.asarray(base + sign * eps * dp, "float64")
            values.append(loss(x))
        p.data = backend.asarray(base, "float64")
        numeric = (values[0] - values[1]) / (2 * eps)
        assert np.sum(grads[name] * dp) == pytest.approx(numeric, rel=1e-6, abs=1e-8), name


@pytest.mark.parametrize("ours, theirs, shape, params", CASES)
def test_eval_mode_keeps_nothing(backend64, rng, ours, theirs, shape, params):
    """Every layer in eval mode, on every namespace: torch's eval output, no cache, and
    backward refuses."""
    backend = backend64
    layer, twin = _pair(ours, theirs, backend, "float64", rng)
    layer.eval()
    twin.eval()
    x = _input(rng, shape)
    y = layer(backend.asarray(x, "float64"))
    with torch.no_grad():
        want = twin(torch.from_numpy(x)).numpy()
    assert_close(y, want, "float64", "eval forward", backend=backend)
    assert layer._cache is None
    with pytest.raises(RuntimeError, match="needs a forward"):
        layer.backward(backend.asarray(np.zeros(want.shape), "float64"))


# --- max pooling: ties and NaN as PyTorch resolves them -------------------------------------------


@pytest.mark.parametrize(
    "k, s, p",
    [(2, 2, 0), (3, 1, 1), (3, 2, 1), (2, 1, 0)],
    ids=["k2s2p0", "k3s1p1", "k3s2p1", "k2s1p0"],
)
def test_max_pool_ties_go_to_the_first_maximum_like_torch(backend_dtype, rng, k, s, p):
    """With many equal values per window, the gradient lands where PyTorch's CPU kernel puts
    it: on the first maximum in row-major window order."""
    backend, dtype = backend_dtype
    x = rng.integers(0, 3, (2, 2, 6, 6)).astype(np.float64)
    x[0, 0] = 1.0  # a whole channel of ties
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, k, s, p)
    g = rng.random(tuple(ty.shape)) + 1.0
    ty.backward(torch.from_numpy(g))
    layer = nn.MaxPool2d(k, s, p).to(backend, dtype)
    layer(backend.asarray(x, dtype))
    dx = layer.backward(backend.asarray(g, dtype))
    assert_close(dx, tx.grad.numpy(), dtype, "tie-broken gradient", backend=backend)
    assert (tx.grad.numpy() == 0).sum() > x.size // 3  # most inputs get nothing: a real test


def test_max_pool_never_routes_the_gradient_to_padding(backend64):
    """A window whose inputs are all -inf: PyTorch picks its first input, never the padding
    (which is -inf too), so no gradient is lost."""
    backend = backend64
    x = np.full((1, 1, 2, 2), -np.inf)
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(tx, 2, 1, 1).backward(
        torch.ones(1, 1, 3, 3, dtype=torch.float64)
    )
    layer = nn.MaxPool2d(2, 1, 1).to(backend, "float64")
    layer(backend.asarray(x, "float64"))
    dx = layer.backward(backend.asarray(np.ones((1, 1, 3, 3)), "float64"))
    assert_close(dx, tx.grad.numpy(), "float64", "dx", backend=backend)
    assert tx.grad.numpy().sum() == 9  # every window's gradient reaches an input


def test_max_pool_nan_wins_like_torch():
    x = np.array([[[[1.0, np.nan], [np.nan, 2.0]]]])
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(tx, 2).backward(torch.ones(1, 1, 1, 1, dtype=torch.float64))
    layer = nn.MaxPool2d(2).to(dtype="float64")
    assert np.isnan(layer(x)).all()
    np.testing.assert_array_equal(layer.backward(np.ones((1, 1, 1, 1))), tx.grad.numpy())


# --- dropout --------------------------------------------------------------------------------------


def test_dropout_is_inverted_and_backward_uses_the_same_mask(backend, rng):
    layer = nn.Dropout(0.25).to(backend)
    x = backend.asarray(rng.random((200, 100)) + 0.5, "float32")
    with random.using(random.generator(backend, 3)):
        y = layer(x)
    mask = to_numpy(y) / to_numpy(x)
    assert backend.owns(y) and y.dtype == backend.dtype("float32")
    assert np.all((mask == 0) | np.isclose(mask, 1 / 0.75, rtol=1e-6))
    assert abs((mask == 0).mean() - 0.25) < 0.02  # 20000 draws: the standard error is 0.003
    g = backend.asarray(rng.standard_normal((200, 100)), "float32")
    assert_close(layer.backward(g), to_numpy(g) * mask, "float32", "dx", backend=backend)


def test_dropout_masks_follow_the_generator(backend, rng):
    """The same generator state gives the same mask, another seed another; eval mode and p=0
    are the identity; p=1 drops everything."""
    x = backend.asarray(rng.random((8, 50)) + 0.5, "float32")
    outs = []
    for seed in (1, 1, 2):
        with random.using(random.generator(backend, seed)):
            outs.append(to_numpy(nn.Dropout(0.5).to(backend)(x)))
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])
    assert nn.Dropout(0.5).to(backend).eval()(x) is x
    assert nn.Dropout(0.0).to(backend)(x) is x
    assert not to_numpy(nn.Dropout(1.0).to(backend)(x)).any()


def test_dropout_matches_torch_given_the_mask(backend64, rng):
    """With the mask xpcnn drew, torch's own arithmetic (x * mask / (1 - p)) and autograd give
    the same output and gradient, on every namespace."""
    backend = backend64
    layer = nn.Dropout(0.3).to(backend, "float64")
    x = rng.standard_normal((5, 7))
    with random.using(random.generator(backend, 9)):
        y = layer(backend.asarray(x, "float64"))
    keep = to_numpy(y) != 0
    tx = torch.tensor(x, requires_grad=True)
    ty = tx * torch.from_numpy(keep) / 0.7
    g = rng.standard_normal((5, 7))
    ty.backward(torch.from_numpy(g))
    assert_close(y, ty.detach().numpy(), "float64", "forward", backend=backend)
    dx = layer.backward(backend.asarray(g, "float64"))
    assert_close(dx, tx.grad.numpy(), "float64", "dx", backend=backend)


# --- batch norm through several optimizer steps ---------------------------------------------------


def _bn_net(dtype):
    return nn.Sequential(
        {
            "conv": nn.Conv2d(1, 3, 3, padding=1, seed=1),
            "bn": nn.BatchNorm2d(3),
            "relu": nn.ReLU(),
            "pool": nn.MaxPool2d(2),
            "flatten": nn.Flatten(),
            "fc": nn.Linear(3 * 3 * 3, 4, seed=2),
            "bn1": nn.BatchNorm1d(4, momentum=None),
            "act": nn.GELU(),
            "head": nn.Linear(4, 3, seed=3),
        },
        dtype=dtype,
    )


def test_running_statistics_match_torch_after_several_steps(backend_dtype, rng):
    """Three SGD steps (momentum, weight decay) through conv, batch norm 2d and 1d (one with
    momentum=None, the cumulative average), pooling and GELU: every parameter and buffer,
    num_batches_tracked included, equals torch's afterwards; so does the eval-mode output."""
    backend, dtype = backend_dtype
    model = _bn_net(dtype).to(backend)
    twin = T.Sequential(
        __import__("collections").OrderedDict(
            conv=T.Conv2d(1, 3, 3, padding=1), bn=T.BatchNorm2d(3), relu=T.ReLU(),
            pool=T.MaxPool2d(2), flatten=T.Flatten(), fc=T.Linear(27, 4),
            bn1=T.BatchNorm1d(4, momentum=None), act=T.GELU(), head=T.Linear(4, 3),
        )
    ).double()  # fmt: skip
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    step = TrainStep(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01))
    topt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        x, y = rng.random((6, 1, 6, 6)), rng.integers(0, 3, 6)
        step(backend.asarray(x, dtype), backend.asarray(y, "int64"), 0.1)
        topt.zero_grad()
        torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        topt.step()
    expected = twin.state_dict()
    assert list(model.state_dict()) == list(expected)
    for name, p in model.named_state():
        if getattr(p, "kind", "float") == "int64":
            assert int(to_numpy(p.data)) == int(expected[name]) == 3
        else:
            assert_close(p.data, expected[name].numpy(), dtype, name, backend=backend)
    model.eval()
    twin.eval()
    x = rng.random((5, 1, 6, 6))
    with torch.no_grad():
        ref = twin(torch.from_numpy(x)).numpy()
    assert_close(model(backend.asarray(x, dtype)), ref, dtype, "eval logits", backend=backend)


# --- erf ------------------------------------------------------------------------------------------


def test_erf_is_float64_accurate(backend64):
    """W. J. Cody's approximation (the fallback) or the backend's own erf: within a few ulps of
    math.erf over the three ranges, the boundaries 0.5 and 4 and the tails."""
    x = np.concatenate(
        [np.linspace(-7, 7, 4001), [0.0, 1e-300, -1e-20, 0.5, -0.5, 4.0, -4.0, 26.0, -30.0]]
    )
    got = to_numpy(F.erf(backend64.asarray(x, "float64")))
    ref = np.array([math.erf(v) for v in x])
    np.testing.assert_allclose(got, ref, rtol=2e-15, atol=1e-300)


def test_erf_fallback_in_float32(rng):
    import array_api_strict as xp

    x = rng.standard_normal(1000).astype(np.float32) * 3
    got = F.erf(xp.asarray(x))
    assert got.dtype == xp.float32
    np.testing.assert_allclose(np.asarray(got), [math.erf(v) for v in x], atol=3e-7)


# --- constructors and shapes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: nn.MaxPool2d(2, padding=2), "at most half the kernel"),
        (lambda: nn.AvgPool2d(0), "kernel_size and stride must be >= 1"),
        (lambda: nn.AdaptiveAvgPool2d(0), "output_size must be >= 1"),
        (lambda: nn.BatchNorm2d(0), "num_features must be a positive int"),
        (lambda: nn.BatchNorm2d(3, momentum=2.0), "momentum must be in"),
        (lambda: nn.BatchNorm1d(3, eps=0), "eps must be a positive number"),
        (lambda: nn.Dropout(1.5), "p must be a probability"),
        (lambda: nn.GELU("fast"), "approximate must be one of"),
        (lambda: nn.AvgPool2d(3, 2, 1, True), r"AvgPool2d: ceil_mode=True is not supported"),
        (lambda: nn.AvgPool2d(2, divisor_override=3), "divisor_override=3 is not supported"),
        (lambda: nn.MaxPool2d(2, 2, 0, 2), r"MaxPool2d: dilation=\(2, 2\) is not supported"),
        (lambda: nn.MaxPool2d(2, ceil_mode=True), "ceil_mode=True is not supported"),
        (lambda: nn.MaxPool2d(2, return_indices=True), "return_indices=True is not supported"),
    ],
    ids=[
        "pool-pad",
        "pool-k0",
        "adaptive-0",
        "bn-0",
        "bn-momentum",
        "bn-eps",
        "drop-p",
        "gelu",
        "avg-ceil",
        "avg-divisor",
        "max-dilation",
        "max-ceil",
        "max-indices",
    ],  # fmt: skip
)
def test_constructor_errors_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_pooling_signatures_are_torchs():
    """A positional call means what it means in PyTorch (AvgPool2d's 4th argument is
    ceil_mode, not count_include_pad), and every torch argument name is accepted."""
    import inspect

    for ours, theirs in ((nn.MaxPool2d, T.MaxPool2d), (nn.AvgPool2d, T.AvgPool2d)):
        names = [p for p in inspect.signature(ours).parameters if p not in ("dtype", "device")]
        assert names == list(inspect.signature(theirs).parameters), ours.__name__
    layer = nn.AvgPool2d(3, 2, 1, False, False)
    assert (layer.count_include_pad, layer.config()["ceil_mode"]) == (False, False)


def test_shape_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"BatchNorm2d.*C = 3, got shape \(2, 4, 5, 5\)"):
        nn.BatchNorm2d(3)(np.zeros((2, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3)(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"MaxPool2d.*smaller than the 3x3 window"):
        nn.MaxPool2d(3)(np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"MaxPool2d.*4-D input"):
        nn.MaxPool2d(2)(np.zeros((2, 2), np.float32))


def test_batch_norm_without_running_statistics_is_never_evaluated_in_chunks():
    """Eval mode with track_running_stats=False normalises with the whole batch's statistics, as
    torch does, even when the batch is larger than the model's eval chunk."""
    ours = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, track_running_stats=False))
    ours = ours.to(dtype="float64").eval()
    ours.eval_chunk = 4
    theirs = T.Sequential(T.Conv2d(2, 3, 3), T.BatchNorm2d(3, track_running_stats=False))
    theirs = theirs.double().eval()
    with torch.no_grad():
        theirs[0].weight.copy_(torch.from_numpy(np.asarray(ours[0].weight.data)))
        theirs[0].bias.copy_(torch.from_numpy(np.asarray(ours[0].bias.data)))
    x = np.random.default_rng(0).standard_normal((10, 2, 5, 5)) * 3 + 1
    with torch.no_grad():
        want = theirs(torch.from_numpy(x)).numpy()
    assert_close(ours(x), want, "float64", "chunked eval", backend=get_backend("cpu"))


def test_configs_rebuild_every_layer():
    """Each layer's config is its constructor call; build() recreates it, batch-norm state
    included (weight 1, bias 0, running mean 0, variance 1, no batches)."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2, eps=1e-3, momentum=None, affine=False),
        nn.MaxPool2d(2, 1, 1),
        nn.AvgPool2d(3, count_include_pad=False),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(2, 3),
        nn.BatchNorm1d(3),
        nn.LeakyReLU(0.2),
        nn.ELU(0.5),
        nn.GELU("tanh"),
        nn.Tanh(),
        nn.Sigmoid(),
    )
    twin = nn.build(model.config())
    assert twin.config() == model.config()
    sd = twin.state_dict()
    np.testing.assert_array_equal(sd["8.running_var"], np.ones(3, np.float32))
    assert sd["8.num_batches_tracked"].dtype == np.int64 and sd["8.num_batches_tracked"] == 0
    assert "1.weight" not in sd and "1.running_mean" in sd
