"""The training step as a function of arrays: eager equals compiled (jax.jit, CUDA graphs),
several steps with momentum and a cosine schedule, and exact resume with compilation on."""

import math

import numpy as np
import pytest

import xpcnn
from xpcnn import nn, optim
from xpcnn import trainer as T
from xpcnn.backends import BackendUnavailable, get_backend
from xpcnn.step import TrainStep, predict_function, scratch_off

from conftest import assert_close, ctrl_c_at_step, tolerance

COMPILING = ["jax:cpu", "jax:cuda:0", "torch:cuda:0"]


def _compiling_backend(spec):
    try:
        backend = get_backend(spec)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    return backend


def _param(spec):
    marks = [pytest.mark.gpu] if "cuda" in spec else []
    return pytest.param(spec, marks=marks, id=spec)


def _steps(spec, dtype, compile, rng_seed=0, steps=3, optimizer="sgd"):
    """``steps`` updates of a SimpleCNN on fixed random batches (the last one smaller), cosine
    learning rate; returns the final state dict and the losses."""
    rng = np.random.default_rng(rng_seed)
    backend = get_backend(spec)
    model = nn.SimpleCNN(seed=1, dtype=dtype, device=spec)
    kwargs = {"lr": 0.05, "momentum": 0.9} if optimizer == "sgd" else {"lr": 2e-3}
    opt = optim.make_optimizer(optimizer, model.parameters(), **kwargs)
    step = TrainStep(model, opt, compile=compile)
    assert step.compiled == compile
    losses = []
    for i in range(steps):
        n = 16 if i < steps - 1 else 7
        x = backend.asarray(rng.random((n, 1, 28, 28)), dtype)
        y = backend.asarray(rng.integers(0, 10, n), "int64")
        lr = kwargs["lr"] * 0.5 * (1 + math.cos(math.pi * i / steps))
        loss, correct = step(x, y, lr)
        assert backend.owns(loss) and backend.owns(correct)
        losses.append(float(T.HostSync().read(loss)[0]))
        assert 0 <= float(T.HostSync().read(correct)[0]) <= n
    return model.state_dict(), losses, opt


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("spec", [_param(s) for s in COMPILING])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_step_equals_eager(spec, dtype, optimizer):
    """Several compiled steps equal the eager ones: on the same backend, except JAX on the CPU,
    whose reference is NumPy's eager step (the same hand-written layers; JAX's own eager path,
    one dispatch per operation, is covered by the layer tests and is slow)."""
    backend = _compiling_backend(spec)
    reference = "cpu" if spec == "jax:cpu" else spec
    eager, eager_losses, _ = _steps(reference, dtype, False, optimizer=optimizer)
    compiled, compiled_losses, opt = _steps(spec, dtype, True, optimizer=optimizer)
    rtol, atol = tolerance(dtype, gpu="cuda" in spec)
    if optimizer == "adam" and dtype == "float32":  # m / sqrt(v) magnifies rounding of tiny grads
        atol *= 5
    if dtype == "float64":
        rtol = atol = 1e-12
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=rtol)
    for k, v in eager.items():
        np.testing.assert_allclose(compiled[k], v, rtol=rtol, atol=atol, err_msg=k)
    _, arrays = opt.state_dict()  # the optimizer state came back onto the device
    assert all(backend.owns(a) for a in arrays.values())


def test_no_tracer_leaks_into_the_model():
    """After compiled steps the model holds concrete arrays, eager calls still work, and a
    second trace (a new batch shape) does not meet a tracer from the first."""
    jax = pytest.importorskip("jax")
    backend = _compiling_backend("jax:cpu")
    model = nn.SimpleCNN(device="jax:cpu")
    step = TrainStep(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9), compile=True)
    rng = np.random.default_rng(0)
    for n in (4, 3, 4):
        step(
            backend.asarray(rng.random((n, 1, 28, 28)), "float32"),
            backend.asarray([1] * n, "int64"),
            0.1,
        )
    for p in model.parameters():
        assert isinstance(p.data, jax.Array) and not isinstance(p.data, jax.core.Tracer)
        assert p.grad is None
    for m in model.modules():
        for v in (m._buffers or {}).values():
            assert not isinstance(v, jax.core.Tracer)
    logits = model.eval()(backend.asarray(rng.random((2, 1, 28, 28)), "float32"))
    assert logits.shape == (2, 10)


def test_scratch_is_off_while_tracing_and_back_after():
    model = nn.SimpleCNN()
    model(np.zeros((2, 1, 28, 28), np.float32))
    with scratch_off(model):
        assert all(m._buffers is None for m in model.modules())
    assert all(isinstance(m._buffers, dict) for m in model.modules())


def test_step_refuses_an_optimizer_of_other_parameters():
    model = nn.SimpleCNN()
    other = nn.SimpleCNN()
    with pytest.raises(ValueError, match="must hold the model's parameters"):
        TrainStep(model, optim.SGD(other.parameters(), lr=0.1))


def test_step_halves_compose_to_the_whole(rng):
    """gradients() then update() is function(): the split data-parallel training uses."""
    model = nn.SimpleCNN(dtype="float64")
    twin = nn.SimpleCNN(dtype="float64")
    s1 = TrainStep(model, optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    s2 = TrainStep(twin, optim.SGD(twin.parameters(), lr=0.1, momentum=0.9))
    x, y = rng.random((8, 1, 28, 28)), rng.integers(0, 10, 8)
    s1(x, y, 0.1)
    params, buffers, opt_state = s2.state()
    grads, buffers, loss, _ = s2.gradients(params, buffers, x, y)
    params, opt_state = s2.update(params, opt_state, grads, 0.1)
    s2.set_state(params, buffers, opt_state)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(twin.state_dict()[k], v)


@pytest.mark.parametrize("spec", [_param(s) for s in COMPILING])
def test_compiled_predict_equals_eager(spec, rng):
    backend = _compiling_backend(spec)
    model = nn.SimpleCNN(seed=2, device=spec).eval()
    x = backend.asarray(rng.random((33, 1, 28, 28)), "float32")
    ref = model(x)
    got = predict_function(model, compile=True)(x)
    assert_close(got, T.to_numpy(ref), "float32", "logits", backend=backend)


def test_train_compiles_by_default_where_it_can_and_resumes_exactly(small, tmp_path, monkeypatch):
    """jax:cpu: train() compiles the step by default; Ctrl-C mid-epoch and resume give the
    weights of an uninterrupted compiled run, bit for bit."""
    _compiling_backend("jax:cpu")
    kw = {"dataset": small, "epochs": 2, "batch_size": 64, "progress": False, "device": "jax:cpu"}
    full = T.train(**kw)
    assert full.step.compiled
    path = tmp_path / "run.ckpt"
    with ctrl_c_at_step(monkeypatch, 5):  # epoch 2, step 2 (3 steps per epoch)
        with pytest.raises(T.TrainingInterrupted, match="epoch 2, step 2"):
            T.train(checkpoint=path, **kw)
    resumed = T.train(checkpoint=path, resume=True, **kw)
    assert resumed.step.compiled
    for k, v in full.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[k], v, err_msg=k)
    eager = T.train(compile=False, **kw)
    assert not eager.step.compiled
    for k, v in full.model.state_dict().items():
        np.testing.assert_allclose(eager.model.state_dict()[k], v, rtol=1e-4, atol=1e-6)


def test_compile_on_a_backend_without_a_compiler_is_noted(small):
    r = T.train(dataset=small, epochs=1, progress=False, compile=True)
    assert not r.step.compiled
    assert any("no compiler" in n for n in r.notes)


def test_xpcnn_train_accepts_compile():
    assert "compile" in xpcnn.train.__code__.co_varnames
