"""Layers and models: thin stateful wrappers around the math in `xpcnn.conv` and `xpcnn.functional`.

This module holds the base class, Conv2d, Linear, ReLU, Flatten, Sequential and SimpleCNN; the
pooling, batch-norm, dropout and other activation layers live in `xpcnn.layers` and are
imported here, so ``nn.MaxPool2d`` works like ``torch.nn.MaxPool2d``.

Every layer has ``forward(x)`` (also ``layer(x)``) and ``backward(grad_out) -> grad_in``. In
training mode (the default) forward keeps what backward needs; backward stores each parameter's
gradient in ``param.grad`` (overwriting, not accumulating) and releases that cache. In eval mode
(``model.eval()``) forward keeps nothing, which is what inference wants.

There is no bookkeeping per layer class: a module's parameters, buffers and sub-modules are
found from its attributes (any `Parameter`, `Buffer` or `Module` it holds, in the order they
were assigned), and its config (what `build` recreates it from) is the arguments its constructor
was called with. A new layer is its math plus a constructor that assigns its parameters.

Parameters and their names follow PyTorch (``conv1.weight`` is ``(out, in, kh, kw)``,
``fc1.weight`` is ``(out, in)``), so ``state_dict()`` round-trips with ``torch.nn`` models.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from array_api_compat import device

from . import conv as C
from . import functional as F
from . import init
from ._namespace import array_namespace
from .backends import get_backend, host_copy, to_numpy

__all__ = [
    "ELU",
    "GELU",
    "LAYERS",
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Buffer",
    "Conv2d",
    "Dropout",
    "Flatten",
    "LeakyReLU",
    "Linear",
    "MaxPool2d",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "SimpleCNN",
    "Tanh",
    "build",
]

DTYPES = ("float32", "float64")

#: Every Module subclass by class name, filled in as classes are defined; `build` reads it.
LAYERS: dict[str, type[Module]] = {}

#: Constructor arguments that choose how, not what: never part of a config.
NOT_CONFIG = frozenset({"self", "dtype", "device", "seed", "input_grad"})

#: Deepest nesting of Sequential a config may have (a hostile checkpoint cannot recurse forever).
MAX_CONFIG_DEPTH = 32


def _check_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


class Parameter:
    """A trainable array (``data``) and its gradient (``grad``, None until a backward pass).

    A parameter created under `xpcnn.init.deferred` has no data yet, only its shape.
    ``arrange``, if given, maps an array to the same values in the memory order its layer
    computes fastest with (`xpcnn.conv.matrix_order`); `set` applies it, and the module uses
    `set` wherever data comes from outside (creation, `Module.load_state_dict`, `Module.to`,
    the broadcast of an MPI run). Only speed depends on it: `Module.state_dict` hands out
    C-ordered copies."""

    __slots__ = ("_shape", "arrange", "data", "grad")

    def __init__(self, data, shape=None, arrange: Callable[[Any], Any] | None = None) -> None:
        self.arrange = arrange
        self._shape = tuple(shape) if data is None else None
        self.set(data)

    def set(self, data) -> None:
        """Replace the array (arranged, if the parameter has an ``arrange``) and drop the
        gradient; None leaves a deferred parameter without data."""
        self.data = data if data is None or self.arrange is None else self.arrange(data)
        self.grad = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The parameter's shape as a tuple of ints."""
        return self._shape if self.data is None else tuple(self.data.shape)

    def __repr__(self):
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={getattr(self.data, 'dtype', None)})"
        )


class Buffer(Parameter):
    """State that is saved and moved with the model but not trained (running statistics).

    ``kind`` is ``"float"`` (cast with the model's dtype) or ``"int64"`` (a counter)."""

    __slots__ = ("kind",)

    def __init__(self, data, shape=None, kind="float"):
        super().__init__(data, shape)
        self.kind = kind


@contextlib.contextmanager
def swapped(objects, name: str, values) -> Iterator[None]:
    """Set attribute ``name`` of each of ``objects`` to the matching one of ``values`` for the
    duration, then put back what was there."""
    saved = [getattr(o, name) for o in objects]
    for o, v in zip(objects, values, strict=True):
        setattr(o, name, v)
    try:
        yield
    finally:
        for o, v in zip(objects, saved, strict=True):
            setattr(o, name, v)


@contextlib.contextmanager
def bound(slots, arrays) -> Iterator[None]:
    """Bind ``arrays`` into the `Parameter`/`Buffer` objects ``slots`` for the duration, then
    put back what was there and clear the gradients (so a JAX tracer never stays in a model,
    and a worker's replica keeps no weights between calls)."""
    try:
        with swapped(slots, "data", arrays):
            yield
    finally:
        for s in slots:
            s.grad = None


def _jsonable(value, where):
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v, where) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{where}: config value {value!r} is not JSON-able")


class Module:
    """Base class: parameter discovery, ``state_dict``, device and dtype moves, train/eval.

    ``dtype`` is ``"float32"`` (default) or ``"float64"``; ``device`` a device string or
    `xpcnn.backends.Backend` (default ``"cpu"``). Subclasses implement `forward`, `backward`
    and, if they have weights, `reset_parameters` (which assigns `Parameter` attributes).
    """

    #: True when, in eval mode, one sample's output depends on the rest of the batch (batch norm
    #: without running statistics): `Sequential` then never evaluates the batch in chunks.
    batch_dependent_eval = False
    #: True when, in training mode, one sample's output depends on the rest of the batch (batch
    #: norm): worker threads or ranks that split a batch then change the math (`xpcnn.workers`).
    batch_dependent_train = False

    def __init_subclass__(cls, **kwargs):
        """Register the class for `build` and record its constructor arguments as its config."""
        super().__init_subclass__(**kwargs)
        LAYERS[cls.__name__] = cls
        original = cls.__dict__.get("__init__")
        if original is None:
            return
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self, *args, **kw):
            if "_args" not in self.__dict__:  # the outermost constructor's arguments win
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                self._args = {
                    k: v
                    for k, v in bound.arguments.items()
                    if k not in NOT_CONFIG
                    and signature.parameters[k].kind is not inspect.Parameter.VAR_POSITIONAL
                }
            original(self, *args, **kw)

        cls.__init__ = __init__

    def __init__(self, *, dtype="float32", device="cpu"):
        self.training = True
        self.name = None  # set by the parent; used in error messages
        self.dtype = _check_dtype(dtype)
        self.backend = get_backend(device)
        self._cache = None
        self._buffers = {}  # scratch arrays reused from step to step (see xpcnn.conv); None: off

    def __setattr__(self, key, value):
        if isinstance(value, Module) and not key.startswith("_"):
            value.name = key
        object.__setattr__(self, key, value)

    # --- to be provided by layers -------------------------------------------------------------
    def forward(self, x):
        """The layer's output for input ``x`` (keeps what `backward` needs in training mode)."""
        raise NotImplementedError

    def backward(self, grad_out, need_input_grad=True):
        """dL/d(input) from ``grad_out`` = dL/d(output); stores each parameter's ``grad``.

        Raises RuntimeError without a preceding training-mode forward, ValueError when
        ``grad_out`` does not have the output's shape. With ``need_input_grad=False`` layers
        may skip dL/d(input) and return None.
        """
        raise NotImplementedError

    def reset_parameters(self, seed=None) -> None:
        """Draw fresh initial weights (PyTorch's default scheme) from ``seed``; a container
        gives each child its own seed derived from it."""
        children = [child for _, child in self.children()]
        for child, child_seed in zip(children, init.child_seeds(seed, len(children)), strict=True):
            child.reset_parameters(child_seed)

    def config(self) -> dict:
        """A JSON-able description from which `build` recreates this module (without weights):
        its type and the arguments its constructor was called with."""
        args = self.__dict__.get("_args", {})
        return {"type": type(self).__name__, **_jsonable(args, type(self).__name__)}

    # --- creating state -----------------------------------------------------------------------
    def param(self, host, arrange: Callable[[Any], Any] | None = None) -> Parameter:
        """A `Parameter` holding the host (NumPy) array ``host`` on this module's backend and
        dtype (``arrange``: see `Parameter`); under `xpcnn.init.deferred`, one that records
        only the shape."""
        if init.is_deferred():
            return Parameter(None, host.shape, arrange)
        return Parameter(self.backend.asarray(host, self.dtype), arrange=arrange)

    def buffer(self, host, kind="float") -> Buffer:
        """A `Buffer` like `param` (``kind="int64"`` keeps integer counters integer)."""
        if init.is_deferred():
            return Buffer(None, host.shape, kind)
        dtype = self.dtype if kind == "float" else kind
        return Buffer(self.backend.asarray(host, dtype), kind=kind)

    # --- shared machinery -----------------------------------------------------------------------
    def __call__(self, x):
        """``forward(x)`` after checking that x is an array of this module's backend and dtype."""
        self.check_input(x)
        with self.backend.activate():  # CuPy: allocate on this model's GPU, not the current one
            return self.forward(x)

    @property
    def label(self) -> str:
        """How error messages name this layer, e.g. ``Conv2d 'conv2' (32->64, k=2, s=2, p=1)``."""
        named = f" {self.name!r}" if self.name else ""
        return f"{type(self).__name__}{named}{self._shape_text()}"

    def _shape_text(self):
        return ""

    def children(self) -> list[tuple[str, Module]]:
        """``(name, Module)`` pairs of direct sub-modules, in assignment order."""
        return [(k, v) for k, v in vars(self).items() if isinstance(v, Module)]

    def modules(self) -> Iterator[Module]:
        """This module and every descendant, depth first."""
        yield self
        for _, child in self.children():
            yield from child.modules()

    def _named(self, kind, prefix=""):
        for name, value in vars(self).items():
            if type(value) is kind:
                yield prefix + name, value
            elif isinstance(value, Module):
                yield from value._named(kind, f"{prefix}{name}.")

    def named_parameters(self, prefix="") -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, Parameter)`` for every parameter, in PyTorch's naming and order."""
        return self._named(Parameter, prefix)

    def parameters(self) -> list[Parameter]:
        """Every `Parameter`, in `named_parameters` order."""
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix="") -> Iterator[tuple[str, Buffer]]:
        """``(dotted name, Buffer)`` for every buffer (running statistics, counters)."""
        return self._named(Buffer, prefix)

    def buffers(self) -> list[Buffer]:
        """Every `Buffer`, in `named_buffers` order."""
        return [b for _, b in self.named_buffers()]

    def zero_grad(self) -> None:
        """Forget every parameter's gradient (set it to None)."""
        for p in self.parameters():
            p.grad = None

    def train(self, mode=True) -> Module:
        """Training mode: forward keeps what backward needs (and dropout, batch norm train)."""
        for m in self.modules():
            m.training = mode
            m._cache = None
        return self

    def eval(self) -> Module:
        """Inference mode: forward keeps nothing."""
        return self.train(False)

    def named_state(self, prefix="") -> Iterator[tuple[str, Parameter]]:
        """Every parameter and buffer in PyTorch's ``state_dict`` order: a module's own
        parameters, then its own buffers, then each child's entries."""
        own = list(vars(self).items())
        for kind in (Parameter, Buffer):
            yield from ((prefix + name, v) for name, v in own if type(v) is kind)
        for name, child in self.children():
            yield from child.named_state(f"{prefix}{name}.")

    def state_dict(self) -> dict:
        """``{name: NumPy array}`` copies of every parameter and buffer, PyTorch names,
        layouts and order."""
        return {name: host_copy(p.data) for name, p in self.named_state()}

    def load_state_dict(self, state) -> Module:
        """Load parameters and buffers from a mapping of NumPy arrays or torch tensors (any
        device).

        Values are cast to the model's dtype and moved to its device. Missing or unexpected keys
        and wrong shapes raise ValueError naming them; nothing is changed unless all are valid.
        """
        if not isinstance(state, Mapping):
            raise TypeError(
                f"load_state_dict expects a mapping of name -> array, got {type(state)}"
            )
        entries = dict(self.named_state())
        missing = [k for k in entries if k not in state]
        unexpected = [k for k in state if k not in entries]
        if missing or unexpected:
            raise ValueError(
                f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}"
                f" (expected exactly {list(entries)})"
            )
        host = {}
        for name, p in entries.items():
            value = state[name]
            shape = getattr(value, "shape", None)
            if shape is not None and tuple(shape) != p.shape:  # before any copy
                raise ValueError(
                    f"load_state_dict: {name!r} has shape {tuple(shape)}, "
                    f"the model expects {p.shape}"
                )
            try:
                value = to_numpy(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"load_state_dict: {name!r} is not an array ({exc})") from None
            if tuple(value.shape) != p.shape:
                raise ValueError(
                    f"load_state_dict: {name!r} has shape {tuple(value.shape)}, "
                    f"the model expects {p.shape}"
                )
            if value.dtype.kind not in "fiu":
                raise TypeError(f"load_state_dict: {name!r} has non-numeric dtype {value.dtype}")
            host[name] = value
        for name, p in entries.items():
            kind = getattr(p, "kind", "float")
            p.set(self.backend.asarray(host[name], self.dtype if kind == "float" else kind))
        return self

    def to(self, device=None, dtype=None) -> Module:
        """Move every parameter and buffer to ``device`` (a device string or Backend) and/or
        cast to ``dtype`` (``"float32"``/``"float64"``). Gradients and caches are dropped.
        Returns self."""
        backend = self.backend if device is None else get_backend(device)
        dtype = self.dtype if dtype is None else _check_dtype(dtype)
        for p in [*self.parameters(), *self.buffers()]:
            if p.data is not None:
                kind = getattr(p, "kind", "float")
                p.set(backend.asarray(to_numpy(p.data), dtype if kind == "float" else kind))
            p.grad = None
        for m in self.modules():
            m.backend, m.dtype, m._cache, m._buffers = backend, dtype, None, {}
        return self

    # --- helpers for layers ---------------------------------------------------------------------
    def check_input(self, x) -> None:
        """Raise TypeError unless ``x`` is an array of this module's namespace, device and dtype
        (checked once per call of the whole model, not per layer)."""
        try:
            array_namespace(x)
        except TypeError:
            raise TypeError(f"{self.label}: expected an array, got {type(x).__name__}") from None
        if not self.backend.owns(x):
            raise TypeError(
                f"{self.label}: input lives on {array_namespace(x).__name__} / {device(x)!r}, "
                f"the model on backend {self.backend.name!r}; move one of them "
                f"(get_backend({self.backend.name!r}).asarray(x) or model.to(...))"
            )
        if x.dtype != self.backend.dtype(self.dtype):
            raise TypeError(
                f"{self.label}: input dtype {x.dtype} does not match the layer's {self.dtype}; "
                "cast the input or call model.to(dtype=...)"
            )

    def _check_ndim(self, x, ndim, layout):
        if x.ndim != ndim:
            raise ValueError(
                f"{self.label}: expected a {ndim}-D input {layout}, got shape {tuple(x.shape)}"
            )

    def _check_grad(self, g, expected):
        if tuple(g.shape) != tuple(expected):
            raise ValueError(
                f"{self.label}: backward expected grad_out of shape {tuple(expected)}, "
                f"got {tuple(g.shape)}"
            )

    def _pop_cache(self):
        if self._cache is None:
            raise RuntimeError(
                f"{self.label}: backward() needs a forward() in training mode first "
                "(model.train(); each forward allows one backward)"
            )
        cache, self._cache = self._cache, None
        return cache

    def __repr__(self):
        return self.label


def _positive_ints(layer, **values):
    for arg, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{layer}: {arg} must be a positive int, got {v!r}")


class Conv2d(Module):
    """2-D convolution (cross-correlation), NCHW, like ``torch.nn.Conv2d`` with groups=1.

    Input ``(N, in_channels, H, W)``, output ``(N, out_channels, OH, OW)`` with
    ``OH = (H + 2*padding - kernel_size) // stride + 1``; weight ``(out, in, kh, kw)``, bias
    ``(out,)``. ``kernel_size``, ``stride`` and ``padding`` are ints or (h, w) pairs. Weights
    are drawn from ``seed`` (PyTorch's default scheme; None: fresh randomness) in ``dtype`` on
    ``device``. ``input_grad`` picks how backward computes dL/dx (`xpcnn.conv.INPUT_GRAD_METHODS`;
    all give the same numbers).

    Raises ValueError for non-positive sizes or an unknown ``input_grad``; forward raises
    ValueError for a wrong shape (not 4-D, wrong channel count, smaller than the kernel).
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        *,
        bias=True,
        seed=None,
        dtype="float32",
        device="cpu",
        input_grad="dilation",
    ):
        super().__init__(dtype=dtype, device=device)
        _positive_ints("Conv2d", in_channels=in_channels, out_channels=out_channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = C.pair(kernel_size, "kernel_size")
        self.stride = C.pair(stride, "stride")
        self.padding = C.pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(
                f"Conv2d: kernel_size and stride must be >= 1, got {kernel_size!r}, {stride!r}"
            )
        self.input_grad = input_grad
        self.has_bias = bool(bias)
        self.reset_parameters(seed)

    @property
    def input_grad(self) -> str:
        """The method backward uses for dL/dx (one of `xpcnn.conv.INPUT_GRAD_METHODS`)."""
        return self._input_grad

    @input_grad.setter
    def input_grad(self, method):
        if method not in C.INPUT_GRAD_METHODS:
            raise ValueError(f"input_grad must be one of {C.INPUT_GRAD_METHODS}, got {method!r}")
        self._input_grad = method

    def reset_parameters(self, seed=None):
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        g = init.rng(seed)
        self.weight = self.param(
            init.uniform_fan_in(g, (self.out_channels, self.in_channels, kh, kw), fan_in),
            arrange=C.matrix_order,
        )
        self.bias = (
            self.param(init.uniform_fan_in(g, (self.out_channels,), fan_in))
            if self.has_bias
            else None
        )

    def _shape_text(self):
        return (
            f" ({self.in_channels}->{self.out_channels}, k={self.kernel_size}, "
            f"s={self.stride}, p={self.padding})"
        )

    def output_shape(self, input_shape) -> tuple[int, int, int, int]:
        """The (N, O, OH, OW) output shape for an (N, C, H, W) input shape."""
        n, _, h, w = input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (n, self.out_channels, C.output_size(h, kh, sh, ph), C.output_size(w, kw, sw, pw))

    def forward(self, x):
        self._check_ndim(x, 4, f"(N, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.label}: expected {self.in_channels} input channels "
                f"(N, {self.in_channels}, H, W), got shape {tuple(x.shape)}"
            )
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        h, w = x.shape[2], x.shape[3]
        if h + 2 * ph < kh or w + 2 * pw < kw:
            raise ValueError(
                f"{self.label}: input {h}x{w} (padded {h + 2 * ph}x{w + 2 * pw}) "
                f"is smaller than the {kh}x{kw} kernel; got shape {tuple(x.shape)}"
            )
        bias = self.bias.data if self.bias else None
        y, col = C.conv2d_forward(
            x, self.weight.data, bias, self.stride, self.padding, self._buffers
        )
        self._cache = (col, tuple(x.shape)) if self.training else None
        return y

    def backward(self, grad_out, need_input_grad=True):
        col, x_shape = self._pop_cache()
        self._check_grad(grad_out, self.output_shape(x_shape))
        dx, dw, db = C.conv2d_backward(
            grad_out,
            col,
            x_shape,
            self.weight.data,
            self.stride,
            self.padding,
            input_grad=self.input_grad,
            need_input_grad=need_input_grad,
            buffers=self._buffers,
        )
        self.weight.grad = dw
        if self.bias:
            self.bias.grad = db
        return dx


class Linear(Module):
    """Fully connected ``y = x @ W.T + b`` on (N, in_features) inputs, like ``torch.nn.Linear``.

    Weight ``(out_features, in_features)``, bias ``(out_features,)``, drawn from ``seed`` in
    ``dtype`` on ``device``. Raises ValueError for non-positive sizes; forward raises
    ValueError for an input that is not ``(N, in_features)``.
    """

    def __init__(
        self, in_features, out_features, *, bias=True, seed=None, dtype="float32", device="cpu"
    ):
        super().__init__(dtype=dtype, device=device)
        _positive_ints("Linear", in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        self.has_bias = bool(bias)
        self.reset_parameters(seed)

    def reset_parameters(self, seed=None):
        g = init.rng(seed)
        shape = (self.out_features, self.in_features)
        self.weight = self.param(init.uniform_fan_in(g, shape, self.in_features))
        self.bias = (
            self.param(init.uniform_fan_in(g, shape[:1], self.in_features))
            if self.has_bias
            else None
        )

    def _shape_text(self):
        return f" ({self.in_features}->{self.out_features})"

    def forward(self, x):
        self._check_ndim(x, 2, f"(N, {self.in_features})")
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"{self.label}: expected {self.in_features} input features "
                f"(N, {self.in_features}), got shape {tuple(x.shape)}"
            )
        y = F.linear(x, self.weight.data, self.bias.data if self.bias else None)
        self._cache = x if self.training else None
        return y

    def backward(self, grad_out, need_input_grad=True):
        x = self._pop_cache()
        self._check_grad(grad_out, (x.shape[0], self.out_features))
        dx, dw, db = F.linear_backward(grad_out, x, self.weight.data, need_input_grad)
        self.weight.grad = dw
        if self.bias:
            self.bias.grad = db
        return dx


class ReLU(Module):
    """``max(x, 0)``; backward passes the gradient where the output was positive."""

    def forward(self, x):
        y = F.relu(x)
        self._cache = y if self.training else None
        return y

    def backward(self, grad_out, need_input_grad=True):
        y = self._pop_cache()
        self._check_grad(grad_out, y.shape)
        return F.relu_backward(grad_out, y)


class Flatten(Module):
    """(N, C, H, W) -> (N, C*H*W) in C-H-W order, as ``torch.nn.Flatten`` does.

    Forward raises ValueError for an input without a batch axis."""

    def forward(self, x):
        if x.ndim < 2:
            raise ValueError(
                f"{self.label}: expected an input with a batch axis, got shape {tuple(x.shape)}"
            )
        self._cache = tuple(x.shape) if self.training else None
        return array_namespace(x).reshape(x, (x.shape[0], -1))

    def backward(self, grad_out, need_input_grad=True):
        shape = self._pop_cache()
        n_features = 1
        for s in shape[1:]:
            n_features *= s
        self._check_grad(grad_out, (shape[0], n_features))
        return array_namespace(grad_out).reshape(grad_out, shape)


class Sequential(Module):
    """Layers applied in order. ``Sequential(a, b, c)`` names them "0", "1", "2";
    ``Sequential({"conv1": a, "relu1": b})`` uses the given names (as attributes too).

    ``dtype``/``device`` default to the first layer's; layers that differ are moved and cast
    to them. Raises TypeError if an entry is not a `Module`.
    """

    def __init__(self, *layers, dtype=None, device=None):
        if len(layers) == 1 and isinstance(layers[0], Mapping):
            named = list(layers[0].items())
        else:
            named = [(str(i), layer) for i, layer in enumerate(layers)]
        for name, layer in named:
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: layer {name!r} is not a Module: {layer!r}")
            if not isinstance(name, str) or not name or name.startswith("_") or "." in name:
                raise ValueError(f"Sequential: bad layer name {name!r}")
        first = named[0][1] if named else None
        super().__init__(
            dtype=dtype or (first.dtype if first else "float32"),
            device=device or (first.backend if first else "cpu"),
        )
        for name, layer in named:
            setattr(self, name, layer)
        self._layers = [layer for _, layer in named]
        if any(m.backend != self.backend or m.dtype != self.dtype for _, m in named):
            self.to(self.backend, self.dtype)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self._layers[key]
        return dict(self.children())[key]

    def __len__(self):
        return len(self._layers)

    def __iter__(self):
        return iter(self._layers)

    def config(self) -> dict:
        return {
            "type": "Sequential",
            "layers": [dict(name=name, **layer.config()) for name, layer in self.children()],
        }

    def set_input_grad(self, method) -> Sequential:
        """Pick the input-gradient method of every Conv2d (`xpcnn.conv.INPUT_GRAD_METHODS`)."""
        for m in self.modules():
            if isinstance(m, Conv2d):
                m.input_grad = method
        return self

    #: In eval mode, batches larger than this run through the layers in chunks of this many
    #: samples: on a CPU the intermediate arrays then stay in cache, and peak memory no longer
    #: grows with the batch. None (the default) takes the backend's `Backend.eval_chunk`
    #: (small on CPUs, large on GPUs, which want big batches). Training never chunks, nor does
    #: a model with a `Module.batch_dependent_eval` layer.
    eval_chunk = None

    def forward(self, x):
        """Run every layer in order (in eval mode, `eval_chunk` samples at a time)."""
        n = x.shape[0] if x.ndim else 0
        chunk = self.eval_chunk or self.backend.eval_chunk
        if self.training or n <= chunk or any(m.batch_dependent_eval for m in self.modules()):
            for layer in self._layers:
                x = layer.forward(x)
            return x
        parts = [self.forward(x[i : min(i + chunk, n), ...]) for i in range(0, n, chunk)]
        return array_namespace(parts[0]).concat(parts, axis=0)

    def backward(self, grad_out, need_input_grad=True):
        """Backpropagate through every layer. With ``need_input_grad=False`` the first layer
        skips dL/dx (training never needs the gradient of the data) and None is returned."""
        layers = self._layers
        with self.backend.activate():
            for i in range(len(layers) - 1, -1, -1):
                grad_out = layers[i].backward(grad_out, need_input_grad=need_input_grad or i > 0)
        return grad_out

    def __repr__(self):
        inner = "\n".join(f"  ({name}): {layer!r}" for name, layer in self.children())
        return f"{type(self).__name__}(\n{inner}\n)"


class SimpleCNN(Sequential):
    """The seed notebook's network, for 1x28x28 images:

        conv1 1->32 k2 s2 p0, ReLU   -> 32x14x14
        conv2 32->64 k2 s2 p1, ReLU  -> 64x8x8
        conv3 64->128 k2 s2 p0, ReLU -> 128x4x4
        flatten (2048), fc1 2048->250, ReLU, fc2 250->num_classes logits

    Parameter names match the notebook's ``torch.nn`` model, so state dicts move both ways.
    ``seed`` draws the weights (the same on every backend), ``dtype`` is ``"float32"`` or
    ``"float64"``, ``device`` a device string, ``input_grad`` the convolutions' input-gradient
    method.
    """

    def __init__(
        self, num_classes=10, *, seed=0, dtype="float32", device="cpu", input_grad="dilation"
    ):
        _positive_ints("SimpleCNN", num_classes=num_classes)
        conv = {"input_grad": input_grad, "dtype": dtype}
        super().__init__(
            {
                "conv1": Conv2d(1, 32, 2, stride=2, padding=0, **conv),
                "relu1": ReLU(dtype=dtype),
                "conv2": Conv2d(32, 64, 2, stride=2, padding=1, **conv),
                "relu2": ReLU(dtype=dtype),
                "conv3": Conv2d(64, 128, 2, stride=2, padding=0, **conv),
                "relu3": ReLU(dtype=dtype),
                "flatten": Flatten(dtype=dtype),
                "fc1": Linear(128 * 4 * 4, 250, dtype=dtype),
                "relu4": ReLU(dtype=dtype),
                "fc2": Linear(250, num_classes, dtype=dtype),
            },
            dtype=dtype,
        )
        self.num_classes = num_classes
        self.reset_parameters(seed)
        if device != "cpu":
            self.to(device)

    def config(self) -> dict:
        return {"type": "SimpleCNN", "num_classes": self.num_classes}


def build(config, *, dtype="float32", device="cpu", _depth=0) -> Module:
    """Recreate a module (fresh weights) from its `Module.config` description.

    Raises ValueError for an unknown layer type, bad arguments or a malformed config."""
    if _depth > MAX_CONFIG_DEPTH:
        raise ValueError(f"model config nested deeper than {MAX_CONFIG_DEPTH} levels")
    if not isinstance(config, Mapping) or not isinstance(config.get("type"), str):
        raise ValueError(f"model config must be a mapping with a 'type', got {config!r:.200}")
    kind = config["type"]
    args = {k: v for k, v in config.items() if k not in ("type", "name")}
    if kind == "Sequential":
        specs = args.pop("layers", None)
        if args or not isinstance(specs, list):
            raise ValueError("a Sequential config has exactly one entry 'layers', a list")
        layers = {}
        for i, spec in enumerate(specs):
            name = spec.get("name", str(i)) if isinstance(spec, Mapping) else str(i)
            if name in layers:
                raise ValueError(f"model config: two layers named {name!r}")
            layers[name] = build(spec, dtype=dtype, _depth=_depth + 1)
        return Sequential(layers, dtype=dtype).to(device)
    cls = LAYERS.get(kind)
    if cls is None or kind in ("Module", "Sequential") or kind.startswith("_"):
        known = sorted(k for k in LAYERS if not k.startswith("_"))
        raise ValueError(f"unknown layer type {kind!r:.60} in model config; known: {known}")
    bad = [k for k in args if not isinstance(k, str) or k in NOT_CONFIG]
    if bad:
        raise ValueError(f"model config for {kind}: unexpected keys {bad}")
    try:
        return cls(**args, dtype=dtype, device=device)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"bad arguments for {kind} in model config: {exc}") from None


# The pooling, normalisation, dropout and activation layers live in xpcnn/layers.py (which needs
# Module from here); importing them registers them with `build` and makes nn.MaxPool2d etc. work.
from .layers import (  # noqa: E402
    ELU,
    GELU,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Dropout,
    LeakyReLU,
    MaxPool2d,
    Sigmoid,
    Tanh,
)
