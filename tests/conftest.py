"""Shared fixtures: every test that takes ``backend`` runs once per installed namespace/device.

CPU backends: NumPy, array-api-strict on its default device, on ``device1`` (catches a forgotten
``device=``: mixing devices raises) and on ``no_float64`` (catches a hidden float64), and
PyTorch-CPU. GPU backends (CuPy, torch CUDA) carry the ``gpu`` mark and are skipped with the
probe's reason when absent. Set ``XPCNN_REQUIRE_BACKENDS=cpu,strict:cpu,...`` (CI does) to turn a
skip of a listed backend into a failure, so a missing dependency cannot hide tests.
"""

import contextlib
import os
import signal

import numpy as np
import pytest

from xpcnn.backends import BackendUnavailable, get_backend, to_numpy

CPU_BACKENDS = ["cpu", "strict:cpu", "strict:device1", "strict:no_float64", "torch:cpu", "jax:cpu"]
GPU_BACKENDS = ["cuda:0", "torch:cuda:0", "jax:cuda:0"]
NO_FLOAT64 = {"strict:no_float64"}


def _param(spec):
    marks = [pytest.mark.gpu] if spec in GPU_BACKENDS else []
    if spec.startswith("jax"):
        # one test process runs every JAX case (pytest-xdist --dist loadgroup): eager JAX
        # compiles each operation once per shape, and that cache lives in one process
        marks.append(pytest.mark.xdist_group("jax"))
    return pytest.param(spec, marks=marks, id=spec)


def pytest_generate_tests(metafunc):
    specs = CPU_BACKENDS + GPU_BACKENDS
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", [_param(s) for s in specs], indirect=True)
    elif "backend_dtype" in metafunc.fixturenames:
        pairs = [
            (s, d)
            for s in specs
            for d in ("float32", "float64")
            if not (d == "float64" and s in NO_FLOAT64)
        ]
        metafunc.parametrize(
            "backend_dtype",
            [pytest.param((s, d), marks=_param(s).marks, id=f"{s}-{d}") for s, d in pairs],
            indirect=True,
        )
    elif "backend64" in metafunc.fixturenames:
        metafunc.parametrize(
            "backend64", [_param(s) for s in specs if s not in NO_FLOAT64], indirect=True
        )


def _resolve(spec):
    try:
        return get_backend(spec)
    except BackendUnavailable as exc:
        required = [s for s in os.environ.get("XPCNN_REQUIRE_BACKENDS", "").split(",") if s]
        if spec in required:
            pytest.fail(f"required backend {spec} is unavailable: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def backend(request):
    return _resolve(request.param)


@pytest.fixture(scope="session")
def backend_dtype(request):
    spec, dtype = request.param
    return _resolve(spec), dtype


@pytest.fixture(scope="session")
def backend64(request):
    return _resolve(request.param)


@pytest.fixture(scope="session")
def small():
    """192 train / 64 test embedded digits (test files that need other sizes define their own)."""
    from xpcnn import datasets

    d = datasets.load("mnist-5k")
    return datasets.Dataset(
        "small", d.train_images[:192], d.train_labels[:192], d.test_images[:64],
        d.test_labels[:64], d.source,
    )  # fmt: skip


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def on_gpu(x):
    """True for a CuPy array, a CUDA torch tensor or a JAX array on a GPU (whose float32
    matrix products XLA may run at TF32-like precision by default)."""
    if type(x).__module__.startswith("cupy") or bool(getattr(x, "is_cuda", False)):
        return True
    devices = getattr(x, "devices", None)
    if callable(devices) and type(x).__module__.startswith("jax"):
        try:
            return any(d.platform == "gpu" for d in devices())
        except Exception:
            return False
    return False


def tolerance(dtype, gpu=False):
    """(rtol, atol) for comparing against a float64 reference, relative to the data's scale.

    On a GPU, float32 matrix products may run in TF32 (10-bit mantissa: unit roundoff 2**-11)
    when a user or library enables it; CuPy and torch leave it off by default. The GPU float32
    tolerance is sized to hold either way, so the tests assume nothing about TF32.
    """
    if dtype == "float64":
        return (1e-10, 1e-10)
    return (1e-2, 5e-3) if gpu else (2e-4, 2e-5)


def assert_close(actual, expected, dtype, what="", *, backend):
    """Compare ``actual`` with a reference, checking what it is before what it holds.

    First ``actual`` must be an array of ``backend``'s namespace on its device (a host round
    trip fails) with exactly the dtype ``dtype`` of that namespace (a silent float32 -> float64
    upcast fails); then its values must match ``expected`` (any array, compared in float64)
    within the tolerance for ``dtype``, scaled by the reference's magnitude.
    """
    assert backend.owns(actual), (
        f"{what}: expected an array of backend {backend.name}, got {type(actual).__module__}."
        f"{type(actual).__name__} on {getattr(actual, 'device', '?')}"
    )
    assert actual.dtype == backend.dtype(dtype), f"{what}: dtype {actual.dtype}, expected {dtype}"
    a = to_numpy(actual).astype(np.float64)
    e = np.asarray(to_numpy(expected) if not isinstance(expected, float | int) else expected)
    e = e.astype(np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    rtol, atol = tolerance(dtype, on_gpu(actual))
    scale = max(1.0, float(np.abs(e).max(initial=0.0)))
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * scale, err_msg=what)


def max_rel_err(actual, expected):
    """max |a - e| / max |e|: the figure the closing notes report."""
    a = to_numpy(actual).astype(np.float64)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.abs(a - e).max(initial=0.0) / max(np.abs(e).max(initial=0.0), 1e-300))


@contextlib.contextmanager
def ctrl_c_at_step(monkeypatch, n):
    """Inside the block, the ``n``-th call of a `xpcnn.step.TrainStep` sends this process a
    SIGINT (a Ctrl-C) just before it runs; the real step is back after the block."""
    from xpcnn.step import TrainStep

    calls = {"n": 0}
    real = TrainStep.__call__

    def interrupting(self, x, y, lr):
        calls["n"] += 1
        if calls["n"] == n:
            signal.raise_signal(signal.SIGINT)
        return real(self, x, y, lr)

    monkeypatch.setattr(TrainStep, "__call__", interrupting)
    try:
        yield
    finally:
        monkeypatch.setattr(TrainStep, "__call__", real)
