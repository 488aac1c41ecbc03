"""CuPy on an NVIDIA GPU: the ``"cuda"`` / ``"cuda:N"`` backends.

CuPy imports fine on a machine without a GPU and fails only on first use, so the probe does real
work once (count devices, allocate, run a kernel) and the reason it failed is kept word for word.

The backend registers fused ``ElementwiseKernel`` versions of ReLU and its gradient, the SGD and
Adam updates and the softmax cross-entropy gradient (`xpcnn.kernels`): one kernel launch each
instead of two to six. It does not compile whole steps: CuPy refuses cuBLAS calls while a stream
is being captured (cupy/cupy#6290), and every layer is built on matrix products.
"""

import contextlib

from .. import kernels
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


def _register_hooks(cupy, xp):
    """One ``ElementwiseKernel`` per hook; each computes what the Array API fallback computes."""
    ek = cupy.ElementwiseKernel
    relu = ek("T x", "T y", "y = x < (T)0 ? (T)0 : x", "xpcnn_relu")  # NaN stays NaN
    relu_backward = ek("T g, T y", "T dx", "dx = y > (T)0 ? g : (T)0", "xpcnn_relu_backward")
    xent = ek(
        "T logp, bool hot, T n", "T d", "d = (exp(logp) - (hot ? (T)1 : (T)0)) / n", "xpcnn_xent"
    )
    sgd = ek(
        "T g, T lr, T m, T wd, bool nesterov",
        "T p, T buf",
        """T d = g + wd * p;
        buf = m * buf + d;
        p -= lr * (nesterov ? d + m * buf : buf);""",
        "xpcnn_sgd",
    )
    adam = ek(
        "T g, T lr, T b1, T b2, T eps, T wd, T c1, T c2",
        "T p, T m, T v",
        """T d = g + wd * p;
        m = b1 * m + (1 - b1) * d;
        v = b2 * v + (1 - b2) * (d * d);
        p -= (lr / c1) * (m / (sqrt(v) / sqrt(c2) + eps));""",
        "xpcnn_adam",
    )

    def sgd_hook(p, g, buf, lr, momentum, wd, nesterov):
        sgd(g, lr, momentum, wd, nesterov, p, buf)
        return p, buf

    def adam_hook(p, g, m, v, lr, b1, b2, eps, wd, c1, c2):
        adam(g, lr, b1, b2, eps, wd, c1, c2, p, m, v)
        return p, m, v

    kernels.register(xp, "relu", relu)
    kernels.register(xp, "relu_backward", relu_backward)
    kernels.register(xp, "softmax_xent_grad", lambda logp, hot, n: xent(logp, hot, n))
    kernels.register(xp, "sgd", sgd_hook)
    kernels.register(xp, "adam", adam_hook)
    import cupyx.scipy.special

    kernels.register(xp, "erf", cupyx.scipy.special.erf)


def make(arg):
    """A CuPy backend on GPU ``arg`` (default 0); raises BackendUnavailable with the
    probe's reason, ValueError for a malformed index."""
    arg = arg or "0"
    if not arg.isdigit():
        raise ValueError(f"unknown CUDA device {arg!r}; valid: 'cuda', 'cuda:N' with N an integer")
    index = int(arg)
    cupy, _ = probe(index)
    import array_api_compat.cupy as xp

    _register_hooks(cupy, xp)
    return CupyBackend(f"cuda:{index}", xp, cupy.cuda.Device(index), index)
