"""The model zoo: networks by name, each with the training recipe that is its default.

    model = models.create("minivgg", num_classes=10, seed=0)   # a fresh xpcnn model
    models.recipe("minivgg")      # Recipe(epochs=30, optimizer='sgd', lr=0.1, ...)
    xpcnn.train(model="minivgg", dataset="fashion-mnist")      # trains with that recipe

==============  =================================================================  =======
name            layers (28x28 grey images in)                                      params
==============  =================================================================  =======
``simplecnn``   the seed notebook's: three 2x2 stride-2 convs with ReLU, fc 250    0.56 M
``lenet5``      LeNet-5: conv5 (pad 2) 6, pool, conv5 16, pool, fc 120, 84, 10    0.06 M
``minivgg``     conv3-BN-ReLU blocks (32, pool, 64, pool, 128, 128), fc 256, dropout  1.85 M
==============  =================================================================  =======

A model given as a path is read as a JSON config (what `xpcnn.nn.Module.config` writes and
`xpcnn.nn.build` reads) and trained with its zoo class's recipe if it builds one, else with
SimpleCNN's, unless the caller overrides it.
Each zoo class is an `xpcnn.nn.Sequential` with named layers, so its state dict, its torch twin
(`xpcnn.interop.to_torch`) and the naive reference (`xpcnn.reference`) all follow from its
layers; its config is just its constructor call, e.g. ``{"type": "MiniVGG", "num_classes":
10}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from . import nn

__all__ = [
    "LeNet5",
    "MiniVGG",
    "Recipe",
    "SimpleCNN",
    "ZOO",
    "create",
    "from_state_dict",
    "build_named",
    "load_config",
    "names",
    "recipe",
    "recipe_of",
]

SimpleCNN = nn.SimpleCNN


class _Zoo(nn.Sequential):
    """A Sequential whose config is its constructor call (the layers follow from it)."""

    def config(self) -> dict:
        return nn.Module.config(self)

    def _finish(self, seed, device):
        self.reset_parameters(seed)
        if device != "cpu":
            self.to(device)


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "elu": nn.ELU}


class LeNet5(_Zoo):
    """LeNet-5 (LeCun, Bottou, Bengio and Haffner, 1998) for 28x28 images: the original's
    32x32 input becomes 28x28 with 2 pixels of padding in the first convolution.

        conv1 1->6 k5 p2, act, pool1 (2x2 average)  -> 6x14x14
        conv2 6->16 k5, act, pool2 (2x2 average)    -> 16x5x5
        flatten (400), fc1 400->120, act, fc2 120->84, act, fc3 84->num_classes

    ``activation`` is ``"tanh"`` (default: the original's squashing function, with its
    average-pooling "subsampling"), ``"relu"``, ``"sigmoid"`` or ``"elu"``. Every
    convolution connects all channels (the original wired conv2 to subsets of conv1's maps)
    and the output is a plain linear layer (the original used RBF units).
    """

    def __init__(
        self,
        num_classes=10,
        activation="tanh",
        *,
        seed=0,
        dtype="float32",
        device="cpu",
        input_grad="dilation",
    ):
        nn._positive_ints("LeNet5", num_classes=num_classes)
        if activation not in ACTIVATIONS:
            raise ValueError(f"LeNet5: activation must be one of {sorted(ACTIVATIONS)}")
        act = ACTIVATIONS[activation]
        conv = {"input_grad": input_grad, "dtype": dtype}
        super().__init__(
            {
                "conv1": nn.Conv2d(1, 6, 5, padding=2, **conv),
                "act1": act(dtype=dtype),
                "pool1": nn.AvgPool2d(2, dtype=dtype),
                "conv2": nn.Conv2d(6, 16, 5, **conv),
                "act2": act(dtype=dtype),
                "pool2": nn.AvgPool2d(2, dtype=dtype),
                "flatten": nn.Flatten(dtype=dtype),
                "fc1": nn.Linear(16 * 5 * 5, 120, dtype=dtype),
                "act3": act(dtype=dtype),
                "fc2": nn.Linear(120, 84, dtype=dtype),
                "act4": act(dtype=dtype),
                "fc3": nn.Linear(84, num_classes, dtype=dtype),
            },
            dtype=dtype,
        )
        self._finish(seed, device)


class MiniVGG(_Zoo):
    """A small VGG-style network for 28x28 images: three blocks of 3x3 convolutions, each
    followed by batch norm and ReLU; 2x2 max pooling after the first two blocks; then a hidden
    fully connected layer with dropout.

        block 1: conv1 1->32, bn1, relu1, pool1                        -> 32 x 14 x 14
        block 2: conv2 32->64, bn2, relu2, pool2                       -> 64 x 7 x 7
        block 3: conv3 64->128, bn3, relu3, conv4 128->128, bn4, relu4 -> 128 x 7 x 7
        flatten (6272), fc1 -> 256, relu_fc, dropout (0.5), fc2 -> num_classes

    Every convolution is 3x3 with padding 1 and no bias (the batch norm after it would cancel
    a bias; its own ``bias`` is the shift). ``widths`` are the blocks' channel counts (default
    (32, 64, 128)), ``convs`` their numbers of convolutions (default (1, 1, 2)); layers are
    numbered in order (conv1/bn1/relu1 ... convK/bnK/reluK). The last block is not pooled:
    the classifier sees the 7x7 maps. About 16 M multiply-adds per image forward, 1.85 M
    parameters (with the defaults).
    """

    def __init__(
        self,
        num_classes=10,
        widths=(32, 64, 128),
        convs=(1, 1, 2),
        hidden=256,
        dropout=0.5,
        *,
        seed=0,
        dtype="float32",
        device="cpu",
        input_grad="dilation",
    ):
        widths, convs = tuple(widths), tuple(convs)
        if len(widths) != 3 or len(convs) != 3:
            raise ValueError(
                f"MiniVGG: widths and convs must have three entries, got {widths!r}, {convs!r}"
            )
        nn._positive_ints("MiniVGG", num_classes=num_classes, hidden=hidden)
        nn._positive_ints("MiniVGG", **{f"widths[{i}]": w for i, w in enumerate(widths)})
        nn._positive_ints("MiniVGG", **{f"convs[{i}]": n for i, n in enumerate(convs)})
        conv = {"input_grad": input_grad, "dtype": dtype, "bias": False}
        layers = {}
        c, k = 1, 0
        for block, (w, n) in enumerate(zip(widths, convs, strict=True), start=1):
            for _ in range(n):
                k += 1
                layers[f"conv{k}"] = nn.Conv2d(c, w, 3, padding=1, **conv)
                layers[f"bn{k}"] = nn.BatchNorm2d(w, dtype=dtype)
                layers[f"relu{k}"] = nn.ReLU(dtype=dtype)
                c = w
            if block < 3:
                layers[f"pool{block}"] = nn.MaxPool2d(2, dtype=dtype)
        layers["flatten"] = nn.Flatten(dtype=dtype)
        layers["fc1"] = nn.Linear(c * 7 * 7, hidden, dtype=dtype)
        layers["relu_fc"] = nn.ReLU(dtype=dtype)
        layers["dropout"] = nn.Dropout(dropout, dtype=dtype)
        layers["fc2"] = nn.Linear(hidden, num_classes, dtype=dtype)
        super().__init__(layers, dtype=dtype)
        self._finish(seed, device)


@dataclass(frozen=True)
class Recipe:
    """How a zoo model is trained when the caller says nothing else: `xpcnn.train`'s
    ``epochs``, ``batch_size``, ``optimizer``, ``lr``, ``momentum``, ``weight_decay``,
    ``schedule`` and ``augment``. ``note`` says where the numbers come from."""

    epochs: int
    lr: float
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float | None = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    augment: str = "none"
    note: str = field(default="", compare=False)

    def settings(self) -> dict:
        """The recipe as `xpcnn.train` keyword arguments."""
        out = {k: v for k, v in asdict(self).items() if k != "note"}
        if self.optimizer != "sgd":
            out.pop("momentum")
        return out

    def fill(self, given: dict) -> dict:
        """``given`` (`xpcnn.train` keyword arguments, None where unset) with the recipe's value
        wherever it is None. The recipe's ``lr`` and ``momentum`` belong to its optimizer: when
        ``given`` asks for another optimizer, they stay None (that optimizer's defaults)."""
        defaults = self.settings()
        if given.get("optimizer") not in (None, self.optimizer):
            defaults.pop("lr", None)
            defaults.pop("momentum", None)
        return {k: defaults.get(k) if v is None else v for k, v in given.items()}


#: name -> (class, recipe). Results of each recipe on Fashion-MNIST: docs/models.md.
ZOO: dict[str, tuple[type[nn.Module], Recipe]] = {
    "simplecnn": (
        SimpleCNN,
        Recipe(epochs=15, lr=0.1, note="xpcnn's defaults (benchmarks/sweep_defaults.py)"),
    ),
    "lenet5": (
        LeNet5,
        Recipe(epochs=20, lr=0.05, note="SGD with momentum; tanh needs a smaller step"),
    ),
    "minivgg": (
        MiniVGG,
        Recipe(
            epochs=30,
            lr=0.1,
            weight_decay=5e-4,
            augment="crop2+flip",
            note="docs/models.md: 0.936 on Fashion-MNIST, mean of 3 seeds (goal 0.94 not reached)",
        ),
    ),
}


def names() -> list[str]:
    """The zoo's model names."""
    return list(ZOO)


def _entry(name):
    key = str(name).lower()
    if key not in ZOO:
        raise ValueError(f"unknown model {name!r}; the zoo has {names()} (or give a JSON config)")
    return ZOO[key]


def recipe(name) -> Recipe:
    """The default training recipe of zoo model ``name``."""
    return _entry(name)[1]


def recipe_of(model: nn.Module) -> Recipe | None:
    """The recipe of a zoo model object (by its exact class), None for any other model."""
    for cls, found in ZOO.values():
        if type(model) is cls:
            return found
    return None


def create(name, num_classes=10, *, seed=0, dtype="float32", device="cpu") -> nn.Module:
    """A fresh zoo model ``name`` with weights drawn from ``seed``. Raises ValueError for an
    unknown name (listing the zoo)."""
    cls, _ = _entry(name)
    return cls(num_classes, seed=seed, dtype=dtype, device=device)


def load_config(path, *, seed=0, dtype="float32", device="cpu") -> nn.Module:
    """A fresh model, weights drawn from ``seed``, from a JSON file holding a
    `xpcnn.nn.Module.config`. Raises ValueError for a file that is not JSON or not a valid
    config."""
    try:
        with open(os.fspath(path)) as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a JSON model config ({exc})") from None
    model = nn.build(config, dtype=dtype, device=device)
    model.reset_parameters(seed)
    return model


def build_named(name, num_classes=10, *, seed=0, dtype="float32") -> nn.Module:
    """The model a name stands for on the command line and in `xpcnn.train`: a zoo model
    (`create`) or, for a JSON config path (`is_config_path`), that config (`load_config`).
    Its recipe is `recipe_of` the result."""
    if is_config_path(name):
        return load_config(name, seed=seed, dtype=dtype)
    return create(name, num_classes, seed=seed, dtype=dtype)


def is_config_path(name) -> bool:
    """True when ``name`` names a JSON config file rather than a zoo model: a zoo name always
    means the zoo model, even if a file of that name is in the working directory."""
    text = os.fspath(name)
    if text.lower() in ZOO:
        return False
    return text.lower().endswith(".json") or os.sep in text or os.path.isfile(text)


def from_state_dict(state, *, dtype="float32", device="cpu") -> nn.Module:
    """The zoo model whose parameter and buffer names and shapes are exactly those of
    ``state`` (a mapping of arrays), with those values loaded. The number of classes is read
    from the last weight matrix. Raises ValueError when no zoo model fits."""
    from . import init

    shapes = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    matrices = [s for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]
    num_classes = matrices[-1][0] if matrices else 10
    for cls, _ in ZOO.values():
        with init.deferred():
            candidate = cls(num_classes, dtype=dtype)
        if {k: p.shape for k, p in candidate.named_state()} == shapes:
            return candidate.load_state_dict(state).to(device)
    raise ValueError(
        f"the state dict's names and shapes fit no zoo model ({names()}); pass model= "
        f"(keys: {list(shapes)[:6]}{' ...' if len(shapes) > 6 else ''})"
    )
