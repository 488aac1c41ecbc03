"""Optimizers against torch.optim, step for step, on every backend."""

import numpy as np
import pytest

from xpcnn import optim
from xpcnn.nn import Parameter

from conftest import assert_close

CONFIGS = [
    ("sgd", {"lr": 0.1}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
    ("adam", {"lr": 1e-2}),
    ("adam", {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2}),
]


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=lambda v: str(v))
def test_matches_torch_optim(backend_dtype, rng, name, kwargs):
    torch = pytest.importorskip("torch")
    backend, dtype = backend_dtype
    shapes = [(3, 4), (5,)]
    init = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(6)]

    params = [Parameter(backend.asarray(a, dtype)) for a in init]
    opt = optim.make_optimizer(name, params, **kwargs)
    tparams = [torch.tensor(a, dtype=getattr(torch, dtype), requires_grad=True) for a in init]
    topt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name](tparams, **kwargs)
    for step_grads in grads:
        for p, tp, g in zip(params, tparams, step_grads, strict=True):
            p.grad = backend.asarray(g, dtype)
            tp.grad = torch.tensor(g, dtype=tp.dtype)
        opt.step()
        topt.step()
        for p, tp in zip(params, tparams, strict=True):
            assert backend.owns(p.data)
            assert_close(p.data, tp.detach().numpy(), dtype, backend=backend)
    _, arrays = opt.state_dict()  # the state lives on the parameters' device, in their dtype
    assert bool(arrays) == (name == "adam" or "momentum" in kwargs)
    assert all(backend.owns(v) for v in arrays.values())
    assert all(v.dtype == backend.dtype(dtype) for v in arrays.values())


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=lambda v: str(v))
def test_update_is_a_pure_function_on_immutable_arrays(rng, name, kwargs):
    """On JAX (immutable arrays) `update` returns new arrays and leaves its inputs alone, and
    gives what NumPy's in-place update gives."""
    jnp = pytest.importorskip("jax.numpy")
    from xpcnn.backends import get_backend

    jb = get_backend("jax:cpu")
    init = [rng.standard_normal(s) for s in [(3, 4), (5,)]]
    grads = [rng.standard_normal(a.shape) for a in init]
    ref = optim.make_optimizer(name, [Parameter(a.copy()) for a in init], **kwargs)
    for p, g in zip(ref.params, grads, strict=True):
        p.grad = g
    ref.step()
    opt = optim.make_optimizer(name, [Parameter(jb.asarray(a, "float64")) for a in init], **kwargs)
    params = [p.data for p in opt.params]
    before = [np.array(a) for a in params]
    new, state = opt.update(
        params, [jb.asarray(g, "float64") for g in grads], opt.state, 0.0 + kwargs["lr"]
    )
    for a, b in zip(params, before, strict=True):
        np.testing.assert_array_equal(np.array(a), b)  # inputs untouched
    for a, p in zip(new, ref.params, strict=True):
        assert isinstance(a, jnp.ndarray)
        np.testing.assert_allclose(np.array(a), p.data, rtol=1e-12, atol=1e-14)


def test_skips_parameters_without_grad():
    p = Parameter(np.ones(3, np.float32))
    q = Parameter(np.ones(2, np.float32))
    opt = optim.SGD([p, q], lr=1.0, momentum=0.9)
    q.grad = np.ones(2, np.float32)
    opt.step()
    np.testing.assert_array_equal(p.data, np.ones(3))
    np.testing.assert_array_equal(opt.state["slots"][0]["momentum_buffer"], np.zeros(3))
    np.testing.assert_array_equal(q.data, np.zeros(2))


def test_state_round_trip_continues_identically(rng):
    a, gs = rng.standard_normal(4), [rng.standard_normal(4) for _ in range(4)]
    for name, kwargs in (("sgd", {"lr": 0.1, "momentum": 0.9}), ("adam", {"lr": 0.01})):
        p1, p2 = Parameter(a.copy()), Parameter(a.copy())
        o1 = optim.make_optimizer(name, [p1], **kwargs)
        for g in gs[:2]:
            p1.grad = g
            o1.step()
        config, arrays = o1.state_dict()
        p2.data = p1.data.copy()
        o2 = optim.make_optimizer(name, [p2], **kwargs)
        o2.load_state_dict(config, {k: np.array(v) for k, v in arrays.items()}, np.array)
        for g in gs[2:]:
            p1.grad = p2.grad = g
            o1.step()
            o2.step()
        np.testing.assert_array_equal(p1.data, p2.data)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: optim.SGD(p, lr=-1), "lr must be a finite number >= 0"),
        (lambda p: optim.SGD(p, lr=0.1, momentum=float("nan")), "momentum must be a finite"),
        (lambda p: optim.SGD(p, lr=float("inf")), "lr must be a finite"),
        (lambda p: optim.Adam(p, eps=float("nan")), "eps must be a finite"),
        (lambda p: optim.SGD(p, lr="0.1"), "lr must be a number"),
        (lambda p: optim.SGD(p, lr=0.1, nesterov=True), "nesterov needs momentum"),
        (lambda p: optim.Adam(p, betas=(0.9, 1.5)), "betas must be two numbers"),
        (lambda p: optim.make_optimizer("rmsprop", p), "unknown optimizer 'rmsprop'"),
        (lambda p: optim.SGD([], lr=0.1), "empty parameter list"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call([Parameter(np.zeros(2))])


def test_load_state_refuses_mismatch():
    p = Parameter(np.zeros(2))
    config, arrays = optim.SGD([p], lr=0.1, momentum=0.9).state_dict()
    with pytest.raises(ValueError, match="optimizer state is for 'SGD', not Adam"):
        optim.Adam([p]).load_state_dict(config, arrays, np.array)
    with pytest.raises(ValueError, match=r"\['1.momentum_buffer'\] are missing"):
        optim.SGD([p, Parameter(np.zeros(3))], lr=0.1, momentum=0.9).load_state_dict(
            config, arrays, np.array
        )
    with pytest.raises(ValueError, match="has shape"):
        optim.SGD([Parameter(np.zeros(3))], lr=0.1, momentum=0.9).load_state_dict(
            config, arrays, np.array
        )
    bad = dict(config, hyper=dict(config["hyper"], momentum=float("nan")))
    with pytest.raises(ValueError, match="momentum must be a finite"):
        optim.SGD([p], lr=0.1, momentum=0.9).load_state_dict(bad, arrays, np.array)
