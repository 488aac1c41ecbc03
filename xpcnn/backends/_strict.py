"""array-api-strict: the reference namespace, used by the tests.

Its extra devices catch portability bugs without a GPU: ``device1`` refuses to mix with arrays
created on the default device (a forgotten ``device=``), ``no_float64`` refuses float64 (a hidden
upcast).
"""

import numpy as np

from .base import Backend, BackendUnavailable, blas_single_threaded

DEVICES = ("cpu", "device1", "device2", "no_float64")


class StrictBackend(Backend):
    """array-api-strict arrays on one of its (simulated) devices."""

    family = "strict"
    worker_threads = True  # it computes with NumPy (workers only when asked for)

    def single_threaded(self):
        return blas_single_threaded()

    def to_host(self, x):
        return np.asarray(x.to_device(self.xp.Device("CPU_DEVICE")))


def make(arg):
    """An array-api-strict backend on ``arg`` (one of `DEVICES`; default ``"cpu"``)."""
    arg = arg or "cpu"
    if arg not in DEVICES:
        raise ValueError(f"unknown array-api-strict device {arg!r}; valid: {', '.join(DEVICES)}")
    try:
        import array_api_strict as xp
    except ImportError as exc:
        raise BackendUnavailable(
            f"array-api-strict is not installed ({exc}); pip install 'xpcnn[test]'"
        ) from None
    device = xp.Device("CPU_DEVICE" if arg == "cpu" else arg)
    return StrictBackend(f"strict:{arg}", xp, device)
