"""CuPy on an NVIDIA GPU: the ``"cuda"`` / ``"cuda:N"`` backends.

CuPy imports fine on a machine without a GPU and fails only on first use, so the probe does real
work once (count devices, allocate, run a kernel) and the reason it failed is kept word for word.
"""

import contextlib

from .base import Backend, BackendUnavailable

INSTALL_HINT = "pip install 'xpcnn[cuda12]' (CUDA 12) or 'xpcnn[cuda13]' (CUDA 13)"


class CupyBackend(Backend):
    """CuPy arrays on CUDA device ``index``."""

    family = "cuda"
    eval_chunk = 16384  # a GPU wants large batches; this only bounds memory

    def __init__(self, name, xp, device, index):
        super().__init__(name, xp, device)
        self.index = index

    def asarray(self, host, dtype=None):
        import numpy as np

        dt = self.dtype(dtype) if dtype is not None else None
        with self.activate():
            return self.xp.asarray(np.asarray(host), dtype=dt, copy=True)

    def to_host(self, x):
        with self.activate():
            return x.get()

    def synchronize(self):
        self.device.synchronize()

    def activate(self):
        # array-api-compat's CuPy creation functions ignore device=; the current device decides.
        return self.device if self.device is not None else contextlib.nullcontext()


def probe(index):
    """Return ``(cupy, count)`` or raise BackendUnavailable with the precise reason."""
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailable(f"CuPy is not installed ({exc}); {INSTALL_HINT}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError, or a missing libcuda
        raise BackendUnavailable(
            f"CuPy {cupy.__version__} is installed but CUDA is unavailable: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if index >= count:
        raise BackendUnavailable(f"cuda:{index} asked for, but only {count} CUDA device(s) visible")
    try:
        with cupy.cuda.Device(index):
            a = cupy.arange(4, dtype=cupy.float32)
            float((a + a).sum())
    except Exception as exc:
        raise BackendUnavailable(
            f"CuPy {cupy.__version__} found cuda:{index} but could not run a kernel there: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return cupy, count


def make(arg):
    """A CuPy backend on GPU ``arg`` (default 0); raises BackendUnavailable with the
    probe's reason, ValueError for a malformed index."""
    arg = arg or "0"
    if not arg.isdigit():
        raise ValueError(f"unknown CUDA device {arg!r}; valid: 'cuda', 'cuda:N' with N an integer")
    index = int(arg)
    cupy, _ = probe(index)
    import array_api_compat.cupy as xp

    return CupyBackend(f"cuda:{index}", xp, cupy.cuda.Device(index), index)
