"""Optimizers with torch.optim's update rules, in Array API code.

State (momentum buffers, Adam moments) is created lazily, at the first step, from the parameter's
own array, so it lives on whatever device the parameter lives on. Updates are written as in-place
operators on ``param.data`` and on state entries: in place on NumPy, CuPy and torch, and plain
rebinding on namespaces whose arrays are immutable.
"""

from __future__ import annotations

import math

from ._namespace import array_namespace

__all__ = ["SGD", "Adam", "Optimizer", "make_optimizer"]


class Optimizer:
    """Holds the parameters (objects with ``data`` and ``grad``), per-parameter state and hyper-
    parameters. Subclasses implement `_update` for one parameter.

    Raises ValueError for an empty parameter list or a negative hyper-parameter."""

    defaults: dict = {}

    def __init__(self, params, **hyper):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        for key, value in hyper.items():
            if not isinstance(value, int | float | bool | tuple) or (
                isinstance(value, int | float) and not isinstance(value, bool) and value < 0
            ):
                raise ValueError(f"{type(self).__name__}: {key} must be >= 0, got {value!r}")
        self.hyper = dict(hyper)
        self.state = [dict() for _ in self.params]

    def __getattr__(self, name):  # opt.lr, opt.momentum, ...
        hyper = self.__dict__.get("hyper", {})
        if name in hyper:
            return hyper[name]
        raise AttributeError(name)

    def zero_grad(self):
        """Forget every parameter's gradient (set it to None)."""
        for p in self.params:
            p.grad = None

    def step(self):
        """Apply one update to every parameter that has a gradient."""
        for p, state in zip(self.params, self.state, strict=True):
            if p.grad is not None:
                self._update(p, state, array_namespace(p.data, p.grad))

    def _update(self, p, state, xp):
        raise NotImplementedError

    def state_dict(self):
        """``(config, arrays)``: JSON-able type, hyper-parameters and scalar state, plus the state
        arrays keyed ``"<param index>.<name>"`` (still on the device)."""
        scalars, arrays = [], {}
        for i, state in enumerate(self.state):
            scalars.append({k: v for k, v in state.items() if isinstance(v, int | float)})
            for k, v in state.items():
                if not isinstance(v, int | float):
                    arrays[f"{i}.{k}"] = v
        config = {"type": type(self).__name__, "hyper": _jsonable(self.hyper), "scalars": scalars}
        return config, arrays

    def load_state_dict(self, config, arrays, to_device):
        """Restore from `state_dict` output; ``to_device(host_array)`` moves arrays onto the
        parameters' backend. Refuses a mismatched optimizer type or parameter count."""
        if config.get("type") != type(self).__name__:
            raise ValueError(
                f"optimizer state is for {config.get('type')}, not {type(self).__name__}"
            )
        if len(config["scalars"]) != len(self.params):
            raise ValueError(
                f"optimizer state has {len(config['scalars'])} parameters, "
                f"model has {len(self.params)}"
            )
        self.hyper.update(
            {k: tuple(v) if isinstance(v, list) else v for k, v in config["hyper"].items()}
        )
        self.state = [dict(s) for s in config["scalars"]]
        for key, value in arrays.items():
            index, _, name = key.partition(".")
            p = self.params[int(index)]
            if tuple(value.shape) != p.shape:
                raise ValueError(
                    f"optimizer state {key!r} has shape {value.shape}, parameter {p.shape}"
                )
            self.state[int(index)][name] = to_device(value)


def _jsonable(hyper):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()}


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD`` (dampening 0):

        g = grad + weight_decay * p
        buf = g (first step) or momentum * buf + g
        g = g + momentum * buf (nesterov) or buf
        p = p - lr * g

    Raises ValueError for negative values or ``nesterov`` without momentum.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        super().__init__(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )

    def _update(self, p, state, xp):
        h = self.hyper
        g = p.grad
        if h["weight_decay"]:
            g = g + h["weight_decay"] * p.data
        if h["momentum"]:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = xp.asarray(g, copy=True)
            else:
                state["momentum_buffer"] *= h["momentum"]
                state["momentum_buffer"] += g
            buf = state["momentum_buffer"]
            g = g + h["momentum"] * buf if h["nesterov"] else buf
        p.data -= h["lr"] * g


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 weight decay added to the gradient, no amsgrad):

        m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g**2
        p = p - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

    Raises ValueError for negative values or betas outside [0, 1).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        betas = tuple(betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adam: betas must be two numbers in [0, 1), got {betas!r}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def _update(self, p, state, xp):
        h = self.hyper
        b1, b2 = h["betas"]
        g = p.grad
        if h["weight_decay"]:
            g = g + h["weight_decay"] * p.data
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"] *= b1
        state["exp_avg"] += (1 - b1) * g
        state["exp_avg_sq"] *= b2
        state["exp_avg_sq"] += (1 - b2) * (g * g)
        denom = xp.sqrt(state["exp_avg_sq"]) / math.sqrt(1 - b2**t) + h["eps"]
        p.data -= (h["lr"] / (1 - b1**t)) * (state["exp_avg"] / denom)


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def make_optimizer(name, params, **kwargs):
    """``make_optimizer("sgd", model.parameters(), lr=0.05, momentum=0.9)``; None values are
    left at the optimizer's defaults. Raises ValueError for an unknown name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, **{k: v for k, v in kwargs.items() if v is not None})
