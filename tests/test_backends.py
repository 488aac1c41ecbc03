"""The backend registry: parsing, canonical names, caching, reasons, plugins, fake devices."""

import sys
import types

import numpy as np
import pytest

import xpcnn
from xpcnn import backends
from xpcnn.backends import Backend, BackendUnavailable, get_backend


@pytest.fixture
def fresh_registry(monkeypatch):
    """Forget all probes and plugins for one test, and restore the registry afterwards."""
    saved = (dict(backends._factories), dict(backends._listed))
    backends._reset_cache()
    yield
    backends._factories.clear()
    backends._factories.update(saved[0])
    backends._listed.clear()
    backends._listed.update(saved[1])
    backends._reset_cache()


def test_aliases_are_canonical():
    assert get_backend("numpy") is get_backend("cpu")
    assert get_backend("cpu").name == "cpu"
    assert get_backend("strict") is get_backend("strict:cpu")
    assert get_backend(get_backend("cpu")) is get_backend("cpu")


def test_torch_aliases():
    pytest.importorskip("torch")
    assert get_backend("torch") is get_backend("torch:cpu")
    assert get_backend("torch").name == "torch:cpu"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("tpu", "unknown device 'tpu'; valid devices: cpu, numpy, cuda, cuda:N"),
        ("cuda:x", "unknown CUDA device 'x'"),
        ("cpu:1", "'cpu' takes no device index"),
        ("strict:device9", "unknown array-api-strict device 'device9'"),
        ("torch:tpu", "unknown torch device 'tpu'"),
    ],
)
def test_bad_specs_list_the_valid_ones(spec, match):
    with pytest.raises(ValueError, match=match):
        get_backend(spec)


def test_non_string_spec():
    with pytest.raises(TypeError, match="device must be a string"):
        get_backend(0)


def test_cupy_not_installed(monkeypatch, fresh_registry):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(BackendUnavailable, match=r"cuda: CuPy is not installed.*xpcnn\[cuda12\]"):
        get_backend("cuda")
    status = {s.name: s for s in xpcnn.available_backends()}
    assert not status["cuda:0"].available
    assert "pip install 'xpcnn[cuda12]'" in status["cuda:0"].reason


def _fake_cupy(count_error=None, kernel_error=None, count=1):
    """A stand-in for CuPy on a machine without a driver, or with a broken toolkit."""
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "99.0.0"
    calls = {"count": 0}

    class CUDARuntimeError(RuntimeError):
        pass

    def get_device_count():
        calls["count"] += 1
        if count_error:
            raise CUDARuntimeError(count_error)
        return count

    class Device:
        def __init__(self, i):
            self.id = i

        def __enter__(self):
            if kernel_error:
                raise CUDARuntimeError(kernel_error)
            return self

        def __exit__(self, *a):
            return False

    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=get_device_count), Device=Device
    )
    return cupy, calls


def test_cupy_without_driver_reports_cuda_error_once(monkeypatch, fresh_registry):
    msg = "cudaErrorNoDevice: no CUDA-capable device is detected"
    cupy, calls = _fake_cupy(count_error=msg)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    for spec in ("cuda", "cuda", "cuda:0"):
        with pytest.raises(
            BackendUnavailable, match=f"CUDA is unavailable: CUDARuntimeError: {msg}"
        ):
            get_backend(spec)
    assert calls["count"] == 1  # probed once, cached, shared by "cuda" and "cuda:0"
    status = {s.name: s for s in xpcnn.available_backends()}
    assert msg in status["cuda:0"].reason
    assert calls["count"] == 1  # available_backends reused the cached probe


def test_cupy_device_index_out_of_range(monkeypatch, fresh_registry):
    cupy, _ = _fake_cupy(count=1)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    with pytest.raises(BackendUnavailable, match=r"cuda:3 asked for, but only 1 CUDA device"):
        get_backend("cuda:3")


def test_cupy_kernel_failure(monkeypatch, fresh_registry):
    cupy, _ = _fake_cupy(kernel_error="nvrtc: libnvrtc.so.13 not found")
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    with pytest.raises(BackendUnavailable, match="could not run a kernel there.*libnvrtc"):
        get_backend("cuda:0")


def test_torch_cuda_without_gpu_says_why():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(BackendUnavailable, match="sees no CUDA device"):
        get_backend("torch:cuda")


def test_available_backends_lists_everything():
    names = [s.name for s in xpcnn.available_backends()]
    for spec in (
        "cpu",
        "cuda:0",
        "torch:cpu",
        "torch:cuda:0",
        "strict:cpu",
        "strict:device1",
        "strict:no_float64",
    ):
        assert spec in names
    for s in xpcnn.available_backends():
        assert s.available or s.reason


class _PlainBackend(Backend):
    family = "plain"


def _plain_factory(arg):
    import array_api_compat.numpy as xp

    return _PlainBackend(f"plain:{arg or 'cpu'}", xp, "cpu")


def test_register_backend_function(fresh_registry):
    xpcnn.register_backend("plain", _plain_factory)
    b = get_backend("plain")
    assert b.name == "plain:cpu" and isinstance(b, _PlainBackend)
    assert any(s.name == "plain:cpu" and s.available for s in xpcnn.available_backends())
    with pytest.raises(ValueError, match="without ':'"):
        xpcnn.register_backend("a:b", _plain_factory)


def test_entry_point_plugins(monkeypatch, fresh_registry):
    class EP:
        group = backends.ENTRY_POINT_GROUP

        def __init__(self, name, value, target):
            self.name, self.value, self._target = name, value, target

        def load(self):
            if isinstance(self._target, Exception):
                raise self._target
            return self._target

    eps = [
        EP("plain", "tests:_plain_factory", _plain_factory),
        EP("broken", "nowhere:make", ImportError("No module named 'nowhere'")),
    ]
    import importlib.metadata

    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group=None: [e for e in eps if e.group == group]
    )
    assert get_backend("plain:x").name == "plain:x"
    with pytest.raises(BackendUnavailable, match="entry point 'nowhere:make' failed to load"):
        get_backend("broken")
    status = {s.name: s for s in xpcnn.available_backends()}
    assert not status["broken"].available and "No module named 'nowhere'" in status["broken"].reason


def test_backend_moves_arrays_and_keeps_dtype(backend):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    x = backend.asarray(a, "float32")
    assert backend.owns(x)
    assert backends.backend_of(x) is backend
    np.testing.assert_array_equal(backend.to_host(x), a)
    np.testing.assert_array_equal(backends.to_numpy(x), a)
    backend.synchronize()


def test_fake_second_device_refuses_mixing():
    """array-api-strict's device1 plays the second GPU: mixing devices must fail loudly."""
    d0, d1 = get_backend("strict:cpu"), get_backend("strict:device1")
    model = xpcnn.SimpleCNN(device=d1.name)
    with pytest.raises(TypeError, match="backend 'strict:device1'"):
        model(d0.asarray(np.zeros((1, 1, 28, 28)), "float32"))
    y = model(d1.asarray(np.zeros((1, 1, 28, 28)), "float32"))
    assert d1.owns(y)
