"""Weights in and out of PyTorch: the same networks in ``torch.nn``, state-dict files, and
conversions both ways (every zoo model, and any ``nn.Sequential`` of the layers in `SUPPORTED`).

xpcnn and PyTorch name and lay out parameters identically (``conv1.weight`` is
``(out, in, kh, kw)``), so moving a model is copying arrays; float32 values arrive bit for bit.

    model = from_torch(torch_model)          # or from_torch("weights.pth" / "x.safetensors")
    torch_model = to_torch(model)            # a torch.nn module with the same weights
    save_safetensors(model, "model.safetensors")   # readable by PyTorch and xpcnn alike

PyTorch is optional and imported only by the functions that need it; ``.safetensors`` files need
only the ``safetensors`` package.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from .backends import host_copy, to_numpy
from .checkpoint import atomic_write
from .nn import Module, Sequential, SimpleCNN

__all__ = [
    "SUPPORTED",
    "from_torch",
    "load_state_dict_file",
    "save_pth",
    "save_safetensors",
    "to_torch",
    "to_torch_state_dict",
    "torch_model",
    "torch_simple_cnn",
]

TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"this needs PyTorch ({exc}): pip install 'xpcnn[torch]'") from None
    return torch


def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError as exc:
        raise ImportError(
            f".safetensors files need the safetensors package ({exc}): pip install safetensors"
        ) from None
    return safetensors.numpy


def torch_simple_cnn(num_classes=10):
    """The seed notebook's network as a ``torch.nn.Sequential`` with PyTorch's default init.

    Built from `xpcnn.SimpleCNN`'s own layers (`torch_model`), so the architecture is written
    once; its layers carry the same names (``conv1``, ``relu1``, ..., ``fc2``) and both state
    dicts have the same keys.
    """
    from . import init

    with init.deferred():  # only the layout is needed: no weights drawn
        model = SimpleCNN(num_classes)
    return torch_model(model)


# --- files ----------------------------------------------------------------------------------------


def load_state_dict_file(path):
    """Read ``{name: NumPy array}`` from a ``.pth``/``.pt`` or ``.safetensors`` file.

    A PyTorch file may hold a plain state dict or a training checkpoint with a ``"state_dict"``
    or ``"model_state_dict"`` entry; it is read with ``weights_only=True``, so it cannot run
    code. Every error names the file.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(
            f"{path}: unknown weights file type {suffix or '(no extension)'!r}; "
            f"expected {', '.join((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    if suffix == SAFETENSORS_SUFFIX:
        st = _safetensors_numpy()
        try:
            return dict(st.load_file(path))
        except Exception as exc:  # safetensors raises its own error types for bad files
            raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None
    torch = _torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(
            f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a mapping of name -> tensor")
    state = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor "
                "(expected a state dict)"
            )
        state[str(name)] = _tensor_to_numpy(value)
    return state


def _tensor_to_numpy(t):
    t = t.detach().cpu()
    if t.dtype == _torch().bfloat16:  # NumPy has no bfloat16
        t = t.float()
    return t.numpy()


def _atomic_write(path, data):
    """Write bytes so that ``path`` holds either its old content or all of ``data``."""
    atomic_write(path, lambda f: f.write(data))


def _host_state(model_or_state):
    """Contiguous NumPy copies of a model's parameters (or of a mapping of arrays)."""
    if isinstance(model_or_state, Module):
        return model_or_state.state_dict()  # C-ordered copies already
    if isinstance(model_or_state, Mapping):
        return {k: host_copy(v) for k, v in model_or_state.items()}
    raise TypeError(f"expected an xpcnn model or a state dict, got {type(model_or_state)}")


def save_safetensors(model, path):
    """Write the parameters of ``model`` (or a state dict) to a ``.safetensors`` file,
    atomically."""
    st = _safetensors_numpy()
    _atomic_write(path, st.save(_host_state(model)))


def save_pth(model, path):
    """Write the parameters of ``model`` (or a state dict) as a PyTorch state dict
    (``torch.save``), atomically; ``torch.nn.Module.load_state_dict`` reads it."""
    torch = _torch()
    buffer = io.BytesIO()
    torch.save(to_torch_state_dict(model), buffer)
    _atomic_write(path, buffer.getvalue())


# --- models ---------------------------------------------------------------------------------------


def to_torch_state_dict(model):
    """An ``OrderedDict`` of CPU torch tensors (the model's dtype) for ``load_state_dict``."""
    torch = _torch()
    return OrderedDict((k, torch.from_numpy(v)) for k, v in _host_state(model).items())


def _torch_layer(module):
    """The ``torch.nn`` layer (PyTorch's own initial weights) that computes what ``module``
    does; a `Sequential` (or zoo model) becomes an ``nn.Sequential`` under the same names."""
    nn = _torch().nn
    if isinstance(module, Sequential):
        return nn.Sequential(OrderedDict((n, _torch_layer(m)) for n, m in module.children()))
    kind = type(module).__name__
    build = _TO_TORCH.get(kind)
    if build is None:
        raise TypeError(f"to_torch: no torch.nn equivalent for {module.label}")
    return build(nn, module)


def _ints(*pairs):
    """(h, w) pairs as torch.nn's pooling layers print them when written by hand: ``2`` for
    ``(2, 2)`` (torch keeps what it was given, so ``MaxPool2d(2)`` and ``MaxPool2d((2, 2))``
    differ in their repr, though not in what they compute)."""
    return [p[0] if p[0] == p[1] else p for p in pairs]


#: xpcnn layer class name -> torch.nn layer with the same settings.
_TO_TORCH = {
    "Conv2d": lambda nn, m: nn.Conv2d(
        m.in_channels,
        m.out_channels,
        kernel_size=m.kernel_size,
        stride=m.stride,
        padding=m.padding,
        bias=m.has_bias,
    ),
    "Linear": lambda nn, m: nn.Linear(m.in_features, m.out_features, bias=m.has_bias),
    "ReLU": lambda nn, m: nn.ReLU(),
    "Flatten": lambda nn, m: nn.Flatten(),
    "Tanh": lambda nn, m: nn.Tanh(),
    "Sigmoid": lambda nn, m: nn.Sigmoid(),
    "LeakyReLU": lambda nn, m: nn.LeakyReLU(m.negative_slope),
    "ELU": lambda nn, m: nn.ELU(m.alpha),
    "GELU": lambda nn, m: nn.GELU(approximate=m.approximate),
    "Dropout": lambda nn, m: nn.Dropout(m.p),
    "MaxPool2d": lambda nn, m: nn.MaxPool2d(*_ints(m.kernel_size, m.stride, m.padding)),
    "AvgPool2d": lambda nn, m: nn.AvgPool2d(
        *_ints(m.kernel_size, m.stride, m.padding), count_include_pad=m.count_include_pad
    ),
    "AdaptiveAvgPool2d": lambda nn, m: nn.AdaptiveAvgPool2d(*_ints(m.output_size)),
    "BatchNorm1d": lambda nn, m: nn.BatchNorm1d(
        m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats
    ),
    "BatchNorm2d": lambda nn, m: nn.BatchNorm2d(
        m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats
    ),
}


def torch_model(model):
    """The architecture of xpcnn ``model`` as ``torch.nn`` layers with PyTorch's initial
    weights (`to_torch` also copies the weights). Raises TypeError for a layer torch.nn lacks."""
    return _torch_layer(model)


def to_torch(model):
    """The same network as a ``torch.nn.Sequential`` (CPU, the model's dtype) with its weights
    and buffers, in eval mode.

    Every `Sequential` (SimpleCNN and the other zoo models included) of supported layers
    (`SUPPORTED`) becomes the matching ``torch.nn`` layers under the same names, so the state
    dicts have the same keys in the same order.
    """
    torch = _torch()
    net = _torch_layer(model)
    net = net.to(torch.float64 if model.dtype == "float64" else torch.float32)
    net.load_state_dict(to_torch_state_dict(model))
    return net.eval()


def _pair_of_ints(value, what):
    t = (value, value) if isinstance(value, int) else tuple(value)
    if len(t) != 2 or not all(isinstance(v, int) for v in t):
        raise TypeError(f"from_torch: {what} {value!r} is not supported (ints only)")
    return t


def _from_torch_layer(module, dtype):
    """The xpcnn layer for one ``torch.nn`` layer (settings only; weights are loaded after)."""
    from . import init
    from . import nn as xnn

    tnn = _torch().nn
    kind = type(module).__name__

    def refuse(why):
        raise TypeError(f"from_torch: {kind} with {why} has no xpcnn equivalent")

    with init.deferred():
        if isinstance(module, tnn.Sequential):
            return xnn.Sequential(
                {n: _from_torch_layer(m, dtype) for n, m in module.named_children()}, dtype=dtype
            )
        if kind == "Conv2d":
            if module.groups != 1 or _pair_of_ints(module.dilation, "dilation") != (1, 1):
                refuse("groups or dilation")
            if isinstance(module.padding, str) or module.padding_mode != "zeros":
                refuse(f"padding {module.padding!r} / padding_mode {module.padding_mode!r}")
            return xnn.Conv2d(
                module.in_channels,
                module.out_channels,
                _pair_of_ints(module.kernel_size, "kernel_size"),
                _pair_of_ints(module.stride, "stride"),
                _pair_of_ints(module.padding, "padding"),
                bias=module.bias is not None,
                dtype=dtype,
            )
        if kind == "Linear":
            return xnn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype
            )
        if kind in ("ReLU", "Tanh", "Sigmoid"):
            return getattr(xnn, kind)(dtype=dtype)
        if kind == "Flatten":
            if (module.start_dim, module.end_dim) != (1, -1):
                refuse(f"start_dim={module.start_dim}, end_dim={module.end_dim}")
            return xnn.Flatten(dtype=dtype)
        if kind == "LeakyReLU":
            return xnn.LeakyReLU(module.negative_slope, dtype=dtype)
        if kind == "ELU":
            return xnn.ELU(module.alpha, dtype=dtype)
        if kind == "GELU":
            return xnn.GELU(module.approximate, dtype=dtype)
        if kind == "Dropout":
            return xnn.Dropout(module.p, dtype=dtype)
        if kind == "MaxPool2d":
            if module.ceil_mode or module.return_indices:
                refuse("ceil_mode or return_indices")
            if _pair_of_ints(module.dilation, "dilation") != (1, 1):
                refuse("dilation")
            return xnn.MaxPool2d(
                _pair_of_ints(module.kernel_size, "kernel_size"),
                _pair_of_ints(module.stride, "stride"),
                _pair_of_ints(module.padding, "padding"),
                dtype=dtype,
            )
        if kind == "AvgPool2d":
            if module.ceil_mode or module.divisor_override is not None:
                refuse("ceil_mode or divisor_override")
            return xnn.AvgPool2d(
                _pair_of_ints(module.kernel_size, "kernel_size"),
                _pair_of_ints(module.stride, "stride"),
                _pair_of_ints(module.padding, "padding"),
                count_include_pad=module.count_include_pad,
                dtype=dtype,
            )
        if kind == "AdaptiveAvgPool2d":
            return xnn.AdaptiveAvgPool2d(
                _pair_of_ints(module.output_size, "output_size"), dtype=dtype
            )
        if kind in ("BatchNorm1d", "BatchNorm2d"):
            return getattr(xnn, kind)(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                dtype=dtype,
            )
    raise TypeError(
        f"from_torch: no xpcnn layer for torch.nn.{kind}; supported: Sequential, "
        f"{', '.join(sorted(_TO_TORCH))}"
    )


#: The layers `to_torch` and `from_torch` convert (inside any nesting of Sequential).
SUPPORTED = tuple(sorted(_TO_TORCH))


def _dtype_of(host):
    floats = [v for v in host.values() if v.dtype.kind == "f"]
    return "float64" if floats and all(v.dtype == np.float64 for v in floats) else "float32"


def from_torch(source, model=None, device=None, dtype=None):
    """An xpcnn model carrying PyTorch weights.

    ``source`` is a ``torch.nn.Module``, a state dict (torch tensors or NumPy arrays) or the path
    of a ``.pth``/``.pt``/``.safetensors`` file. Without ``model``: a ``torch.nn.Sequential``
    of supported layers (`SUPPORTED`, nested Sequentials too) becomes the same `Sequential`
    under the same names; any other source is matched by its parameter names and shapes
    against the zoo (`xpcnn.models.from_state_dict`: SimpleCNN, LeNet-5, MiniVGG, the number
    of classes read from the last weight matrix); a Sequential whose layers are exactly a zoo
    model's becomes that zoo model. A state dict that fits no zoo model is loaded
    into a `SimpleCNN`, whose error names the keys that differ. The dtype is read from the
    weights (float64 if every float one is, else float32) unless ``dtype`` is given.
    ``device`` defaults to the given model's own, or ``"cpu"``. Missing or unexpected names and
    wrong shapes raise ValueError naming them; a torch layer without an xpcnn twin TypeError.
    """
    torch_module = None
    if isinstance(source, str | os.PathLike):
        state = load_state_dict_file(source)
    elif isinstance(source, Mapping):
        state = source
    elif callable(getattr(source, "state_dict", None)):
        state = source.state_dict()
        torch_module = source
    else:
        raise TypeError(
            f"from_torch expects a torch.nn.Module, a state dict or a file path, got {type(source)}"
        )
    if model is not None:
        if device is not None or dtype is not None:
            model.to(device, dtype)
        return model.load_state_dict(state)
    host = {k: to_numpy(v) for k, v in state.items()}
    dtype = dtype or _dtype_of(host)
    from . import models

    if torch_module is not None and isinstance(torch_module, _torch().nn.Sequential):
        model = _from_torch_layer(torch_module, dtype).load_state_dict(host)
        try:  # the same layers as a zoo model: that model (its config names it)
            twin = models.from_state_dict(host, dtype=dtype)
        except ValueError:
            twin = None
        if twin is not None and repr(torch_model(twin)) == repr(torch_module):
            model = twin
        return model.to(device or "cpu")
    try:
        return models.from_state_dict(host, dtype=dtype, device=device or "cpu")
    except ValueError:
        pass
    fc2 = host.get("fc2.weight")
    num_classes = int(fc2.shape[0]) if fc2 is not None and fc2.ndim == 2 else 10
    model = SimpleCNN(num_classes, dtype=dtype, device=device or "cpu")
    return model.load_state_dict(host)
