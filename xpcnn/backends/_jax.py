"""JAX: the ``"jax"`` / ``"jax:cpu"`` / ``"jax:cuda:N"`` backends, whose `compile` is ``jax.jit``.

``jax.numpy`` is an Array API namespace, so xpcnn's layers run on it unchanged; what JAX adds is
a compiler. A whole training step (`xpcnn.step.TrainStep`) traced once becomes one XLA program:
the learning rate is a traced scalar (a schedule does not recompile), and on a GPU the
parameters and optimizer state are donated (updated in the same memory). A new batch shape
(the last, smaller batch of an epoch) is one more trace, cached by ``jax.jit``.

xpcnn asks for every dtype explicitly, and float64 needs JAX's ``jax_enable_x64``: making a jax
backend switches it on for the process (it changes only the defaults of calls that name no
dtype, which xpcnn never makes).
"""

from __future__ import annotations

import inspect

import numpy as np

from .base import Backend, BackendUnavailable

INSTALL_HINT = "pip install 'xpcnn[jax]' (CPU) or 'jax[cuda13]' for NVIDIA GPUs"


class JaxBackend(Backend):
    """jax.numpy arrays on one JAX device."""

    family = "jax"
    compiles = True

    def __init__(self, name, xp, device, jax):
        super().__init__(name, xp, device)
        self.jax = jax
        self.on_gpu = device.platform == "gpu"
        self.eval_chunk = 16384  # a compiled program wants whole batches; only bounds memory

    def asarray(self, host, dtype=None):
        host = np.asarray(host)
        dt = self.dtype(dtype) if dtype is not None else None
        return self.jax.device_put(self.xp.asarray(host, dtype=dt), self.device)

    def to_host(self, x):
        return np.array(x)

    def synchronize(self):
        (self.jax.device_put(0.0, self.device) + 0).block_until_ready()

    def owns(self, x):
        """A jax array on this device, or a tracer (which has no device while traced)."""
        if not isinstance(x, self.jax.Array):
            return False
        try:
            devices = x.devices()
        except Exception:  # a tracer: its device is decided when the program runs
            return True
        return devices == {self.device}

    def compile(self, fn, generator=None):
        """``jax.jit(fn)``, donating the state arguments (the first three) on a GPU. A JAX
        generator's key is an explicit argument of ``fn`` (`xpcnn.random`): nothing to do."""
        donate = (0, 1, 2) if self.on_gpu else ()
        params = inspect.signature(fn).parameters.values()
        if not any(p.kind is p.VAR_POSITIONAL for p in params):  # donate only what fn takes
            donate = tuple(i for i in donate if i < len(params))
        return self.jax.jit(fn, donate_argnums=donate), True


def make(arg):
    """A JAX backend: ``arg`` None (JAX's default device), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``. Raises BackendUnavailable (JAX missing, no such device) or ValueError."""
    kind, _, index = (arg or "").partition(":")
    if (
        kind not in ("", "cpu", "cuda")
        or (kind != "cuda" and index)
        or not (index == "" or index.isdigit())
    ):
        raise ValueError(f"unknown jax device {arg!r}; valid: 'jax', 'jax:cpu', 'jax:cuda:N'")
    try:
        import jax
    except ImportError as exc:
        raise BackendUnavailable(f"JAX is not installed ({exc}); {INSTALL_HINT}") from None
    jax.config.update("jax_enable_x64", True)
    try:
        if kind == "":
            device = jax.devices()[0]
        elif kind == "cpu":
            device = jax.devices("cpu")[0]
        else:
            gpus = jax.devices("gpu")
            if int(index or 0) >= len(gpus):
                raise BackendUnavailable(
                    f"jax:cuda:{index or 0} asked for, but JAX sees {len(gpus)} GPU(s)"
                )
            device = gpus[int(index or 0)]
    except RuntimeError as exc:  # no backend of that platform
        raise BackendUnavailable(
            f"JAX {jax.__version__} has no {kind} device ({str(exc).splitlines()[0]})"
        ) from None
    xp = jax.numpy  # what array_api_compat.array_namespace returns for jax arrays
    from .. import kernels

    kernels.register(xp, "erf", jax.scipy.special.erf)  # the Array API has no erf
    name = "jax:cpu" if device.platform == "cpu" else f"jax:cuda:{device.id}"
    return JaxBackend(name, xp, device, jax)
