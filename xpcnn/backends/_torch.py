"""PyTorch tensors driven by xpcnn's own layers (not torch.nn), via array-api-compat.

On a CUDA device `TorchBackend.compile` captures a function of tensors (a whole training step,
`xpcnn.step.TrainStep`) in a CUDA graph and replays it: one launch per step instead of one per
array operation. ``torch.cuda.graph`` can capture cuBLAS, which CuPy's capture cannot.
"""

from __future__ import annotations

import contextlib

from .. import kernels
from .base import Backend, BackendUnavailable


class TorchBackend(Backend):
    """torch tensors on the CPU or one CUDA device, run by xpcnn's layers."""

    family = "torch"

    @property
    def eval_chunk(self):
        return 16384 if self.device.type == "cuda" else 128

    @property
    def compiles(self):
        return self.device.type == "cuda"

    @property
    def worker_threads(self) -> bool:
        """On the CPU: torch's kernels release the GIL (workers when asked for)."""
        return self.device.type == "cpu"

    @contextlib.contextmanager
    def single_threaded(self):
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def to_host(self, x):
        return x.detach().cpu().numpy()

    def synchronize(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def compile(self, fn, generator=None):
        """On CUDA: ``fn`` captured as CUDA graphs (`CudaGraphFunction`), registering the
        ``torch.Generator`` of ``generator`` (an `xpcnn.random.TorchGenerator`) if it has one;
        on the CPU: ``fn``."""
        if self.device.type != "cuda":
            return fn, False
        torch_generator = getattr(generator, "torch_generator", None)
        return CudaGraphFunction(fn, self.device, torch_generator), True


def _flatten(tree, leaves):
    """Leaves of nested lists/tuples/dicts in order, and a description to rebuild them."""
    if isinstance(tree, list | tuple):
        return (type(tree), [_flatten(t, leaves) for t in tree])
    if isinstance(tree, dict):
        return (dict, [(k, _flatten(v, leaves)) for k, v in tree.items()])
    leaves.append(tree)
    return None


def _unflatten(spec, leaves):
    if spec is None:
        return next(leaves)
    kind, items = spec
    if kind is dict:
        return {k: _unflatten(s, leaves) for k, s in items}
    return kind(_unflatten(s, leaves) for s in items)


class CudaGraphFunction:
    """A function of tensors (and Python floats) captured as a CUDA graph and replayed.

    One graph per input signature (shapes and dtypes; the last, smaller batch of an epoch gets
    its own). At capture, every input gets a static copy the graph reads from; Python floats
    (the learning rate) become 0-d device tensors refilled before each replay. Before a replay,
    each input that is not already its static tensor is copied in: state that the function
    updates in place (parameters, momentum buffers) comes back as the static tensor itself, so
    it is never copied. The returned tensors are the graph's static outputs, overwritten by the
    next replay. Before capture the function runs twice on a side stream (cuBLAS and the
    allocator initialise there) on the static copies, which are then restored, so the first
    call computes exactly what an uncaptured call would.

    Random draws (dropout): ``generator``, a CUDA ``torch.Generator``, is registered with each
    graph (``CUDAGraph.register_generator_state``): a replay reads the generator's current
    seed and offset and advances the offset, so every replay draws new numbers, the same ones
    an uncaptured call at that offset would. The warm-up runs' draws are undone (the
    generator's state is restored with the static copies).
    """

    WARMUP = 2

    def __init__(self, fn, device, generator=None):
        import torch

        self.fn, self.device, self.torch = fn, device, torch
        self.generator = generator
        self.graphs = {}

    def _signature(self, leaves):
        torch = self.torch
        return tuple(
            (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
            for x in leaves
        )

    def __call__(self, *args):
        torch = self.torch
        leaves = []
        spec = _flatten(args, leaves)
        key = self._signature(leaves)
        if key not in self.graphs:
            self.graphs[key] = self._capture(spec, leaves)
        graph, static_in, static_out = self.graphs[key]
        for x, s in zip(leaves, static_in, strict=True):
            if s is None or x is s:
                continue
            if isinstance(x, torch.Tensor):
                s.copy_(x)
            else:
                s.fill_(x)
        graph.replay()
        return static_out

    def _capture(self, spec, leaves):
        torch = self.torch
        floats = [x for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()]
        scalar_dtype = floats[0].dtype if floats else torch.float32
        static_in = []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                static_in.append(x.detach().clone())
            elif isinstance(x, int | float) and not isinstance(x, bool):
                static_in.append(torch.full((), x, dtype=scalar_dtype, device=self.device))
            elif x is None:
                static_in.append(None)
            else:
                raise TypeError(f"cannot capture an argument of type {type(x).__name__}")
        args = _unflatten(spec, iter(static_in))
        tensors = [s for s in static_in if s is not None]
        saved = [s.clone() for s in tensors]
        rng_state = self.generator.get_state() if self.generator is not None else None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.fn(*args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        for s, v in zip(tensors, saved, strict=True):
            s.copy_(v)
        del saved
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            self.generator.set_state(rng_state)
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            out = self.fn(*args)
        return graph, static_in, out


def _register_hooks(xp, torch):
    """torch's own operators for ReLU (one kernel), its gradient (``where(y > 0, g, 0)``, the
    fallback's rule, with a Python 0 rather than a 0 copied to the GPU at every call, as the Array
    API fallback ``maximum(x, 0.0)`` would do) and erf."""
    kernels.register(xp, "relu", torch.relu)
    kernels.register(xp, "relu_backward", lambda g, y: torch.where(y > 0, g, 0.0))
    kernels.register(xp, "erf", torch.special.erf)


def make(arg):
    """A torch backend for ``arg`` = ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; raises
    BackendUnavailable (torch missing, no such GPU) or ValueError (malformed)."""
    arg = arg or "cpu"
    if arg == "cuda":
        arg = "cuda:0"
    kind, _, index = arg.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        raise ValueError(f"unknown torch device {arg!r}; valid: 'torch:cpu', 'torch:cuda:N'")
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable(
            f"PyTorch is not installed ({exc}); pip install 'xpcnn[torch]'"
        ) from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"torch {torch.__version__} sees no CUDA device "
                f"(built with CUDA {torch.version.cuda or 'none: a CPU-only build'})"
            )
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise BackendUnavailable(f"torch:{arg} asked for, but only {count} CUDA device(s)")
    import array_api_compat.torch as xp

    _register_hooks(xp, torch)
    return TorchBackend(f"torch:{arg}", xp, torch.device(arg))
