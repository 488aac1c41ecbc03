"""Weights in and out of PyTorch: the same `SimpleCNN` in ``torch.nn``, state-dict files, and
conversions both ways.

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

from .backends import to_numpy
from .checkpoint import atomic_write
from .nn import Conv2d, Flatten, Linear, Module, ReLU, Sequential, SimpleCNN

__all__ = [
    "from_torch",
    "load_state_dict_file",
    "save_pth",
    "save_safetensors",
    "to_torch",
    "to_torch_state_dict",
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

    Its layers carry the names of `xpcnn.SimpleCNN`'s (``conv1``, ``relu1``, ..., ``fc2``), so
    both state dicts have the same keys.
    """
    nn = _torch().nn
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 32, kernel_size=2, stride=2, padding=0),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(32, 64, kernel_size=2, stride=2, padding=1),
            relu2=nn.ReLU(),
            conv3=nn.Conv2d(64, 128, kernel_size=2, stride=2, padding=0),
            relu3=nn.ReLU(),
            flatten=nn.Flatten(),
            fc1=nn.Linear(128 * 4 * 4, 250),
            relu4=nn.ReLU(),
            fc2=nn.Linear(250, num_classes),
        )
    )


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
        state = model_or_state.state_dict()
    elif isinstance(model_or_state, Mapping):
        state = {k: to_numpy(v) for k, v in model_or_state.items()}
    else:
        raise TypeError(f"expected an xpcnn model or a state dict, got {type(model_or_state)}")
    # a copy: on NumPy, state_dict() shares memory with the live parameters
    return {k: np.array(v, order="C", copy=True) for k, v in state.items()}


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
    nn = _torch().nn
    if isinstance(module, Sequential):
        return nn.Sequential(OrderedDict((n, _torch_layer(m)) for n, m in module.children()))
    if isinstance(module, Conv2d):
        return nn.Conv2d(
            module.in_channels,
            module.out_channels,
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            bias=module.has_bias,
        )
    if isinstance(module, Linear):
        return nn.Linear(module.in_features, module.out_features, bias=module.has_bias)
    if isinstance(module, ReLU):
        return nn.ReLU()
    if isinstance(module, Flatten):
        return nn.Flatten()
    raise TypeError(f"to_torch: no torch.nn equivalent for {module.label}")


def to_torch(model):
    """The same network as a ``torch.nn.Sequential`` (CPU, the model's dtype) with its weights.

    A `SimpleCNN` becomes `torch_simple_cnn`; any other `Sequential` of Conv2d, Linear, ReLU and
    Flatten becomes the matching ``torch.nn`` layers under the same names.
    """
    torch = _torch()
    if isinstance(model, SimpleCNN):
        net = torch_simple_cnn(model.num_classes)
    else:
        net = _torch_layer(model)
    net = net.to(torch.float64 if model.dtype == "float64" else torch.float32)
    net.load_state_dict(to_torch_state_dict(model))
    return net.eval()


def from_torch(source, model=None, device=None, dtype=None):
    """An xpcnn model carrying PyTorch weights.

    ``source`` is a ``torch.nn.Module``, a state dict (torch tensors or NumPy arrays) or the path
    of a ``.pth``/``.pt``/``.safetensors`` file. Without ``model`` a `SimpleCNN` is built, its
    number of classes read from ``fc2.weight`` and its dtype from the weights (float64 if they all
    are, else float32). ``device`` defaults to the given model's own, or ``"cpu"``. Missing or
    unexpected names and wrong shapes raise ValueError naming them.
    """
    if isinstance(source, str | os.PathLike):
        state = load_state_dict_file(source)
    elif isinstance(source, Mapping):
        state = source
    elif callable(getattr(source, "state_dict", None)):
        state = source.state_dict()
    else:
        raise TypeError(
            f"from_torch expects a torch.nn.Module, a state dict or a file path, got {type(source)}"
        )
    if model is None:
        host = {k: to_numpy(v) for k, v in state.items()}
        if dtype is None:
            all64 = bool(host) and all(v.dtype == np.float64 for v in host.values())
            dtype = "float64" if all64 else "float32"
        fc2 = host.get("fc2.weight")
        num_classes = int(fc2.shape[0]) if fc2 is not None and fc2.ndim == 2 else 10
        model = SimpleCNN(num_classes, dtype=dtype, device=device or "cpu")
        state = host
    elif device is not None or dtype is not None:
        model.to(device, dtype)
    return model.load_state_dict(state)
