"""The `Backend` object: one array namespace plus one device, and the few host-side chores.

A backend is what a device string such as ``"cuda:1"`` resolves to. Layers never ask for it: they
read the namespace from their input (``array_namespace(x)``). The trainer, the model's ``.to()`` and
the checkpoint code use it to move host (NumPy) arrays in and out and to wait for the device.
"""

from __future__ import annotations

import contextlib

import numpy as np
from array_api_compat import device

from .._namespace import array_namespace


class BackendUnavailable(RuntimeError):
    """A known backend cannot be used on this machine; the message says exactly why."""


class Backend:
    """A namespace and a device, with host transfers and synchronisation.

    Subclasses override `to_host`, `synchronize`, `activate` and `compile` where their
    library needs it; everything else is plain Array API. ``name`` is the canonical device
    string, ``xp`` the array-api-compat namespace, ``device`` the namespace's device object;
    ``family`` (a class attribute) is the registry family it belongs to.
    """

    family = "base"
    #: Samples per chunk when a model in eval mode gets a larger batch (see
    #: `xpcnn.nn.Sequential.eval_chunk`): 128 keeps a CPU's working set in cache.
    eval_chunk = 128

    def __init__(self, name, xp, device):
        self.name = name  # canonical device string, e.g. "cuda:0"
        self.xp = xp  # array-api-compat namespace
        self.device = device  # the namespace's device object

    def __repr__(self):
        return f"Backend({self.name!r})"

    def __eq__(self, other):
        return isinstance(other, Backend) and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    def dtype(self, name):
        """The namespace's dtype object for ``"float32"``, ``"float64"``, ``"uint8"``, ..."""
        if not isinstance(name, str):
            return name
        try:
            return getattr(self.xp, name)
        except AttributeError:
            raise TypeError(f"unknown dtype {name!r} for backend {self.name}") from None

    def asarray(self, host, dtype=None):
        """Copy a host array (NumPy, or anything ``numpy.asarray`` accepts) onto this backend's
        device, cast to ``dtype`` (a name such as ``"float32"``) when given."""
        host = np.asarray(host)
        dt = self.dtype(dtype) if dtype is not None else None
        with self.activate():
            return self.xp.asarray(host, dtype=dt, device=self.device, copy=True)

    def to_host(self, x):
        """``x`` (which must live on this backend) as a NumPy array: a copy, except for arrays
        already in host memory (NumPy's are returned as they are; a torch CPU tensor's
        ``.numpy()`` shares its memory), which callers such as the MPI allreduce rely on."""
        return np.asarray(x)

    def synchronize(self):
        """Wait for queued device work to finish (for honest timings). No-op on the CPU."""

    def activate(self):
        """Context in which creation calls land on this backend's device (CuPy needs it)."""
        return contextlib.nullcontext()

    #: Whether `compile` does more than return its argument (shown by ``xpcnn backends``).
    compiles = False

    def compile(self, fn, generator=None):
        """Compile ``fn``, a pure function of (nested lists/dicts of) arrays and Python floats,
        for this backend. Returns ``(callable, compiled)``; the default runs ``fn`` as it is
        (``compiled`` False). ``generator`` is the `xpcnn.random.Generator` that ``fn`` draws
        from (a CUDA graph must register it). See `xpcnn.step.TrainStep`."""
        return fn, False

    #: Whether worker threads (`xpcnn.workers`) may split a batch on this backend: its array
    #: operations must release Python's GIL and be safe to call from several threads at once.
    worker_threads = False

    def default_workers(self) -> int:
        """How many worker threads ``workers="auto"`` uses on this backend (1: none)."""
        return 1

    def single_threaded(self) -> contextlib.AbstractContextManager:
        """Context in which this backend's own thread pools (BLAS, intra-op threads) use one
        thread, so that N worker threads keep N cores busy, not N times the pool."""
        return contextlib.nullcontext()

    def owns(self, x):
        """True if ``x`` is an array of this backend's namespace on its device."""
        try:
            if array_namespace(x) is not self.xp:
                return False
        except TypeError:
            return False
        # The standard's ``.device`` attribute is cheap; array-api-compat's device() covers
        # libraries that predate it.
        dev = x.device if hasattr(x, "device") else device(x)
        return dev == self.device


# --- NumPy's BLAS pool (NumPy and array-api-strict, which computes with NumPy) ------------------

_blas = []


def _blas_controller():
    if not _blas:
        from threadpoolctl import ThreadpoolController

        _blas.append(ThreadpoolController().select(user_api="blas"))
    return _blas[0]


def blas_threads() -> int:
    """Threads of NumPy's BLAS pool (its setting: one per core unless an environment variable
    such as ``OMP_NUM_THREADS`` or ``OPENBLAS_NUM_THREADS`` says otherwise); 1 if unknown."""
    info = _blas_controller().info()
    return max([1, *(int(lib.get("num_threads") or 1) for lib in info)])


def blas_single_threaded() -> contextlib.AbstractContextManager:
    """Context in which NumPy's BLAS uses one thread (threadpoolctl)."""
    return _blas_controller().limit(limits=1)
