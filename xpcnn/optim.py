"""Optimizers with torch.optim's update rules, in Array API code.

Each optimizer is two things. `Optimizer.update` is a pure function of arrays,
``(params, grads, state, lr) -> (params, state)``, which `xpcnn.step.TrainStep` calls (and a
backend may compile). `Optimizer.step` applies it to the `Parameter` objects it was given, for
the textbook loop ``forward; backward; opt.step()``.

The state (momentum buffers, Adam moments and step count) is created when the optimizer is, as
zeros on the parameters' device, so a compiled step sees the same structure from its first call.
Updates are written as in-place operators: in place on NumPy, CuPy and torch (a CUDA graph
replays them onto the same memory), and plain rebinding on namespaces whose arrays are
immutable (JAX, where ``update`` is then a pure function). A backend may supply a fused kernel
for a whole update (`xpcnn.kernels`); the expressions here are the fallback.
"""

from __future__ import annotations

import math

from array_api_compat import device

from ._namespace import array_namespace
from .kernels import hook

__all__ = ["SGD", "Adam", "Optimizer", "make_optimizer"]


def _check_number(owner, key, value, *, low=0.0, high=math.inf, high_open=False):
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{owner}: {key} must be a number, got {value!r}")
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or value < low or too_high:
        bound = f"in [{low}, {high})" if high_open else f">= {low}"
        raise ValueError(f"{owner}: {key} must be a finite number {bound}, got {value!r}")
    return float(value)


class Optimizer:
    """Holds the parameters (objects with ``data`` and ``grad``), their state and the hyper-
    parameters. Subclasses implement `init_state` and `_update` for one parameter.

    Raises ValueError for an empty parameter list or a hyper-parameter that is negative, not
    finite or not a number."""

    def __init__(self, params, **hyper):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        self.hyper = dict(hyper)
        self.state = self.init_state([p.data for p in self.params])

    def __getattr__(self, name):  # opt.lr, opt.momentum, ...
        hyper = self.__dict__.get("hyper", {})
        if name in hyper:
            return hyper[name]
        raise AttributeError(name)

    # --- the pure part --------------------------------------------------------------------------
    def init_state(self, arrays) -> dict:
        """Fresh state for parameters ``arrays``: ``{"slots": [per-parameter dict of arrays],
        ...}``, all zeros on the parameters' devices."""
        raise NotImplementedError

    def update(self, params, grads, state, lr):
        """One step for every parameter: returns ``(new params, new state)`` as lists/dicts of
        the same structure. ``lr`` is a Python float or a 0-d array (a compiled step passes an
        array, so a schedule does not recompile). A None gradient leaves its parameter as is."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Forget every parameter's gradient (set it to None)."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """Apply one update to every parameter that has a gradient (at ``hyper["lr"]``)."""
        params, state = self.update(
            [p.data for p in self.params],
            [p.grad for p in self.params],
            self.state,
            self.hyper["lr"],
        )
        for p, a in zip(self.params, params, strict=True):
            p.data = a
        self.state = state

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """``(config, arrays)``: JSON-able type and hyper-parameters, plus the state arrays
        keyed ``"<param index>.<name>"`` or ``"<name>"`` (still on the device)."""
        arrays = {k: v for k, v in self.state.items() if k != "slots"}
        for i, slot in enumerate(self.state["slots"]):
            arrays.update({f"{i}.{k}": v for k, v in slot.items()})
        config = {"type": type(self).__name__, "hyper": _jsonable(self.hyper)}
        return config, arrays

    def load_state_dict(self, config, arrays, to_device) -> None:
        """Restore from `state_dict` output; ``to_device(host_array)`` moves arrays onto the
        parameters' backend. Refuses (ValueError) another optimizer type, missing, unexpected
        or misshapen entries; nothing changes unless all fit."""
        if not isinstance(config, dict) or config.get("type") != type(self).__name__:
            found = config.get("type") if isinstance(config, dict) else config
            raise ValueError(f"optimizer state is for {found!r}, not {type(self).__name__}")
        hyper = config.get("hyper")
        if not isinstance(hyper, dict) or set(hyper) != set(self.hyper):
            raise ValueError(
                f"optimizer hyper-parameters {sorted(hyper) if isinstance(hyper, dict) else hyper}"
                f" do not match {type(self).__name__}'s {sorted(self.hyper)}"
            )
        _, current = self.state_dict()
        if set(arrays) != set(current):
            raise ValueError(
                f"optimizer state entries {sorted(set(arrays) ^ set(current))} are missing or "
                "unexpected"
            )
        for key, value in arrays.items():
            if tuple(value.shape) != tuple(current[key].shape):
                raise ValueError(
                    f"optimizer state {key!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(current[key].shape)}"
                )
        checked = type(self)([_Shape(p.data) for p in self.params], **_tuples(hyper))
        state = {k: to_device(v) for k, v in arrays.items() if "." not in k}
        state["slots"] = [
            {k: to_device(arrays[f"{i}.{k}"]) for k in slot}
            for i, slot in enumerate(self.state["slots"])
        ]
        self.hyper, self.state = checked.hyper, state


class _Shape:
    """Stands in for a parameter (and its array) when only hyper-parameters are validated."""

    def __init__(self, like):
        self.data = self
        self.shape = tuple(like.shape)


def _tuples(hyper):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()}


def _jsonable(hyper):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hyper.items()}


def _zeros_like(a):
    if isinstance(a, _Shape):
        return None
    return array_namespace(a).zeros_like(a)


class SGD(Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD`` (dampening 0):

        g = grad + weight_decay * p
        buf = momentum * buf + g          (buf starts at 0, so the first step sets buf = g)
        g = g + momentum * buf (nesterov) or buf
        p = p - lr * g

    Raises ValueError for negative or non-finite values or ``nesterov`` without momentum.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        name = "SGD"
        lr = _check_number(name, "lr", lr)
        momentum = _check_number(name, "momentum", momentum)
        weight_decay = _check_number(name, "weight_decay", weight_decay)
        if not isinstance(nesterov, bool):
            raise ValueError(f"SGD: nesterov must be True or False, got {nesterov!r}")
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        super().__init__(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )

    def init_state(self, arrays):
        if not self.hyper["momentum"]:
            return {"slots": [{} for _ in arrays]}
        return {"slots": [{"momentum_buffer": _zeros_like(a)} for a in arrays]}

    def update(self, params, grads, state, lr):
        h = self.hyper
        m, wd, nesterov = h["momentum"], h["weight_decay"], h["nesterov"]
        new_params, slots = [], []
        for p, g, slot in zip(params, grads, state["slots"], strict=True):
            if g is None:
                new_params.append(p)
                slots.append(slot)
                continue
            xp = array_namespace(p, g)
            if m:
                fused = hook(xp, "sgd")
                if fused:
                    p, buf = fused(p, g, slot["momentum_buffer"], lr, m, wd, nesterov)
                else:
                    if wd:
                        g = g + wd * p
                    buf = slot["momentum_buffer"]
                    buf *= m
                    buf += g
                    g = g + m * buf if nesterov else buf
                    p -= lr * g
                slot = {"momentum_buffer": buf}
            else:
                if wd:
                    g = g + wd * p
                p -= lr * g
            new_params.append(p)
            slots.append(slot)
        return new_params, {"slots": slots}


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (L2 weight decay added to the gradient, no amsgrad):

        m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g**2;  t = t + 1
        p = p - lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)

    One step count ``t`` is shared by all parameters (a 0-d array, so a compiled step does not
    recompile as it grows). Raises ValueError for negative or non-finite values or betas
    outside [0, 1).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        name = "Adam"
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"Adam: betas must be two numbers in [0, 1), got {betas!r}")
        try:
            betas = tuple(_check_number(name, "betas", b, high=1.0, high_open=True) for b in betas)
        except ValueError:
            raise ValueError(f"Adam: betas must be two numbers in [0, 1), got {betas!r}") from None
        super().__init__(
            params,
            lr=_check_number(name, "lr", lr),
            betas=betas,
            eps=_check_number(name, "eps", eps),
            weight_decay=_check_number(name, "weight_decay", weight_decay),
        )

    def init_state(self, arrays):
        first = arrays[0]
        if isinstance(first, _Shape):
            step = None
        else:
            xp = array_namespace(first)
            step = xp.zeros((), dtype=first.dtype, device=device(first))
        slots = [{"exp_avg": _zeros_like(a), "exp_avg_sq": _zeros_like(a)} for a in arrays]
        return {"step": step, "slots": slots}

    def update(self, params, grads, state, lr):
        h = self.hyper
        b1, b2 = h["betas"]
        eps, wd = h["eps"], h["weight_decay"]
        t = state["step"] + 1.0
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        xp = array_namespace(t)
        step_size, sqrt_c2 = lr / c1, xp.sqrt(c2)
        new_params, slots = [], []
        for p, g, slot in zip(params, grads, state["slots"], strict=True):
            if g is None:
                new_params.append(p)
                slots.append(slot)
                continue
            m, v = slot["exp_avg"], slot["exp_avg_sq"]
            fused = hook(xp, "adam")
            if fused:
                p, m, v = fused(p, g, m, v, lr, b1, b2, eps, wd, c1, c2)
            else:
                if wd:
                    g = g + wd * p
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * (g * g)
                p -= step_size * (m / (xp.sqrt(v) / sqrt_c2 + eps))
            new_params.append(p)
            slots.append({"exp_avg": m, "exp_avg_sq": v})
        return new_params, {"step": t, "slots": slots}


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def make_optimizer(name, params, **kwargs) -> Optimizer:
    """``make_optimizer("sgd", model.parameters(), lr=0.05, momentum=0.9)``; None values are
    left at the optimizer's defaults. Raises ValueError for an unknown name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, **{k: v for k, v in kwargs.items() if v is not None})
