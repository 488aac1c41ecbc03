"""NumPy on the host: the ``"cpu"`` backend."""

from .base import Backend


class NumpyBackend(Backend):
    """NumPy arrays in host memory."""

    family = "cpu"


def make(arg):
    """The NumPy backend (``arg`` must be None or ``"cpu"``)."""
    if arg not in (None, "cpu"):
        raise ValueError(f"'cpu' takes no device index, got 'cpu:{arg}'")
    import array_api_compat.numpy as xp

    return NumpyBackend("cpu", xp, "cpu")
