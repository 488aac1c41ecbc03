"""xpcnn: convolutional networks with hand-written gradients on the Python Array API.

The same layer code runs on NumPy, CuPy, PyTorch tensors and any other Array API namespace;
`get_backend` maps a device string ("cpu", "cuda:1", "torch:cpu", ...) to a namespace and device.
"""

from . import augment, conv, datasets, functional, models, nn, optim, pool, random
from .backends import BackendUnavailable, available_backends, get_backend, register_backend
from .nn import SimpleCNN
from .trainer import evaluate, load_checkpoint, train

__version__ = "0.2.0"

__all__ = [
    "BackendUnavailable",
    "SimpleCNN",
    "augment",
    "models",
    "pool",
    "random",
    "available_backends",
    "conv",
    "datasets",
    "evaluate",
    "load_checkpoint",
    "optim",
    "train",
    "functional",
    "get_backend",
    "nn",
    "register_backend",
]
