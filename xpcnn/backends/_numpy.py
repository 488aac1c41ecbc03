"""NumPy on the host: the ``"cpu"`` backend."""

from .base import Backend, blas_single_threaded, blas_threads


class NumpyBackend(Backend):
    """NumPy arrays in host memory. NumPy computes outside Python's GIL, one core per
    operation except in BLAS: worker threads (`xpcnn.workers`), one per BLAS thread, share a
    batch by default."""

    family = "cpu"
    worker_threads = True

    def default_workers(self) -> int:
        """One worker per thread of NumPy's BLAS pool (one per core by default)."""
        return blas_threads()

    def single_threaded(self):
        return blas_single_threaded()


def make(arg):
    """The NumPy backend (``arg`` must be None or ``"cpu"``)."""
    if arg not in (None, "cpu"):
        raise ValueError(f"'cpu' takes no device index, got 'cpu:{arg}'")
    import array_api_compat.numpy as xp

    return NumpyBackend("cpu", xp, "cpu")
