"""Pooling, batch normalisation, dropout and activation layers: thin `xpcnn.nn.Module` wrappers
around the math in `xpcnn.pool` and `xpcnn.functional` (imported into `xpcnn.nn`, so
``nn.MaxPool2d`` is the same class).

Names, constructor arguments, defaults and state-dict keys are PyTorch's (``torch.nn.MaxPool2d``,
``torch.nn.BatchNorm2d``, ...). Each class is its math plus a few lines: parameters and buffers
are found from the attributes `Module.param` and `Module.buffer` assign, and the config is the
constructor's arguments. The gradient of every layer is derived in docs/layers.md, next to a
pointer to the function that computes it.
"""

from __future__ import annotations

from . import conv as C
from . import functional as F
from . import init, random
from . import pool as P
from ._namespace import array_namespace
from .nn import Module, _positive_ints

__all__ = [
    "ELU",
    "GELU",
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Dropout",
    "LeakyReLU",
    "MaxPool2d",
    "Sigmoid",
    "Tanh",
]


# --- pooling --------------------------------------------------------------------------------------


def _only_default(layer, name, value, default):
    """Refuse a PyTorch option xpcnn does not implement, by name, instead of ignoring it."""
    if value != default or type(value) is not type(default):
        raise ValueError(f"{layer}: {name}={value!r} is not supported (only {default!r})")


class _Pool2d(Module):
    """Shared by MaxPool2d and AvgPool2d: sizes, checks and the shape arithmetic."""

    def __init__(self, kernel_size, stride=None, padding=0, *, dtype="float32", device="cpu"):
        super().__init__(dtype=dtype, device=device)
        name = type(self).__name__
        self.kernel_size = C.pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else C.pair(stride, "stride")
        self.padding = C.pair(padding, "padding")
        if min(self.kernel_size) < 1 or min(self.stride) < 1:
            raise ValueError(
                f"{name}: kernel_size and stride must be >= 1, got {kernel_size!r}, {stride!r}"
            )
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size, strict=True)):
            raise ValueError(
                f"{name}: padding {self.padding} must be at most half the kernel "
                f"{self.kernel_size} (as in PyTorch)"
            )

    def _shape_text(self):
        return f" (k={self.kernel_size}, s={self.stride}, p={self.padding})"

    def output_shape(self, input_shape) -> tuple[int, int, int, int]:
        """The (N, C, OH, OW) output shape for an (N, C, H, W) input shape."""
        return P.pool_output_shape(input_shape, self.kernel_size, self.stride, self.padding)

    def _check(self, x):
        self._check_ndim(x, 4, "(N, C, H, W)")
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise ValueError(
                f"{self.label}: input {x.shape[2]}x{x.shape[3]} is smaller than the "
                f"{kh}x{kw} window; got shape {tuple(x.shape)}"
            )


class MaxPool2d(_Pool2d):
    """Maximum over each ``kernel_size`` window, like ``torch.nn.MaxPool2d`` (``stride``
    defaults to ``kernel_size``; padding counts as -inf). NCHW in, (N, C, OH, OW) out.

    Backward sends each output's gradient to the input that was the window's maximum; on a
    tie, to the first in row-major window order, as PyTorch's CPU kernel does
    (`xpcnn.pool.max_pool2d`). PyTorch's signature; ``dilation``, ``return_indices`` and
    ``ceil_mode`` take only their defaults."""

    def __init__(
        self,
        kernel_size,
        stride=None,
        padding=0,
        dilation=1,
        return_indices=False,
        ceil_mode=False,
        *,
        dtype="float32",
        device="cpu",
    ):
        super().__init__(kernel_size, stride, padding, dtype=dtype, device=device)
        _only_default("MaxPool2d", "dilation", C.pair(dilation, "dilation"), (1, 1))
        _only_default("MaxPool2d", "return_indices", return_indices, False)
        _only_default("MaxPool2d", "ceil_mode", ceil_mode, False)

    def forward(self, x):
        self._check(x)
        y, index = P.max_pool2d(x, self.kernel_size, self.stride, self.padding)
        self._cache = (index, tuple(x.shape)) if self.training else None
        return y

    def backward(self, grad_out, need_input_grad=True):
        index, x_shape = self._pop_cache()
        self._check_grad(grad_out, self.output_shape(x_shape))
        if not need_input_grad:
            return None
        return P.max_pool2d_backward(
            grad_out, index, x_shape, self.kernel_size, self.stride, self.padding
        )


class AvgPool2d(_Pool2d):
    """Mean over each ``kernel_size`` window, like ``torch.nn.AvgPool2d``. With
    ``count_include_pad=True`` (PyTorch's default) padding zeros count in the mean; with False
    only the real inputs under the window do. PyTorch's signature (so the fourth positional
    argument is ``ceil_mode``); ``ceil_mode`` and ``divisor_override`` take only their
    defaults."""

    def __init__(
        self,
        kernel_size,
        stride=None,
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
        *,
        dtype="float32",
        device="cpu",
    ):
        super().__init__(kernel_size, stride, padding, dtype=dtype, device=device)
        _only_default("AvgPool2d", "ceil_mode", ceil_mode, False)
        _only_default("AvgPool2d", "divisor_override", divisor_override, None)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x):
        self._check(x)
        y, divisor = P.avg_pool2d(
            x, self.kernel_size, self.stride, self.padding, self.count_include_pad
        )
        self._cache = (divisor, tuple(x.shape)) if self.training else None
        return y

    def backward(self, grad_out, need_input_grad=True):
        divisor, x_shape = self._pop_cache()
        self._check_grad(grad_out, self.output_shape(x_shape))
        if not need_input_grad:
            return None
        return P.avg_pool2d_backward(
            grad_out, divisor, x_shape, self.kernel_size, self.stride, self.padding
        )


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed ``output_size`` (an int or (OH, OW)) whatever the input's
    size, like ``torch.nn.AdaptiveAvgPool2d``; ``AdaptiveAvgPool2d(1)`` is global average
    pooling, (N, C, H, W) -> (N, C, 1, 1)."""

    def __init__(self, output_size, *, dtype="float32", device="cpu"):
        super().__init__(dtype=dtype, device=device)
        self.output_size = C.pair(output_size, "output_size")
        if min(self.output_size) < 1:
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be >= 1, got {output_size!r}")

    def _shape_text(self):
        return f" (output {self.output_size})"

    def forward(self, x):
        self._check_ndim(x, 4, "(N, C, H, W)")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"{self.label}: empty spatial size; got shape {tuple(x.shape)}")
        self._cache = tuple(x.shape) if self.training else None
        return P.adaptive_avg_pool2d(x, self.output_size)

    def backward(self, grad_out, need_input_grad=True):
        x_shape = self._pop_cache()
        self._check_grad(grad_out, (*x_shape[:2], *self.output_size))
        if not need_input_grad:
            return None
        return P.adaptive_avg_pool2d_backward(grad_out, x_shape)


# --- batch normalisation --------------------------------------------------------------------------


class _BatchNorm(Module):
    """Shared by BatchNorm1d and BatchNorm2d (they differ only in the input's rank)."""

    _ndims: tuple[int, ...] = ()
    _layout = ""
    batch_dependent_train = True  # training normalises with the batch's statistics

    @property
    def batch_dependent_eval(self) -> bool:
        """Without running statistics, eval mode normalises with the batch's own."""
        return not self.track_running_stats

    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        *,
        dtype="float32",
        device="cpu",
    ):
        super().__init__(dtype=dtype, device=device)
        name = type(self).__name__
        _positive_ints(name, num_features=num_features)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise ValueError(f"{name}: eps must be a positive number, got {eps!r}")
        if momentum is not None and (
            isinstance(momentum, bool)
            or not isinstance(momentum, int | float)
            or not 0 <= momentum <= 1
        ):
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum!r}")
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.reset_parameters()

    def reset_parameters(self, seed=None):
        """PyTorch's initial state: weight 1, bias 0, running mean 0, running variance 1,
        no batches seen (``seed`` is not needed: nothing is random)."""
        c = (self.num_features,)
        self.weight = self.param(init.constant(c, 1.0)) if self.affine else None
        self.bias = self.param(init.constant(c, 0.0)) if self.affine else None
        if self.track_running_stats:
            self.running_mean = self.buffer(init.constant(c, 0.0))
            self.running_var = self.buffer(init.constant(c, 1.0))
            self.num_batches_tracked = self.buffer(init.counter(), kind="int64")
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def _shape_text(self):
        return f" ({self.num_features})"

    def forward(self, x):
        if x.ndim not in self._ndims or x.shape[1] != self.num_features:
            raise ValueError(
                f"{self.label}: expected an input {self._layout} with C = {self.num_features}, "
                f"got shape {tuple(x.shape)}"
            )
        weight = self.weight.data if self.affine else None
        bias = self.bias.data if self.affine else None
        if not self.training and self.track_running_stats:
            self._cache = None
            return F.batch_norm_eval(
                x, self.running_mean.data, self.running_var.data, weight, bias, self.eps
            )
        count = x.shape[0]
        for s in x.shape[2:]:
            count *= s
        if count < 2 and self.training:
            raise ValueError(
                f"{self.label}: expected more than 1 value per channel when training, got "
                f"input shape {tuple(x.shape)}"
            )
        y, xhat, inv_std, mean, var = F.batch_norm_train(x, weight, bias, self.eps)
        if self.training and self.track_running_stats:
            self._update_running(mean, var, count)
        self._cache = (xhat, inv_std) if self.training else None
        return y

    def _update_running(self, mean, var, count):
        """PyTorch's update: new arrays (never in place), so a traced step returns them."""
        batches = self.num_batches_tracked.data + 1
        self.num_batches_tracked.data = batches
        momentum = self.momentum
        if momentum is None:  # cumulative moving average: 1 / batches seen
            xp = array_namespace(mean)
            momentum = 1.0 / xp.astype(batches, mean.dtype)
        self.running_mean.data, self.running_var.data = F.running_update(
            self.running_mean.data, self.running_var.data, mean, var, count, momentum
        )

    def backward(self, grad_out, need_input_grad=True):
        xhat, inv_std = self._pop_cache()
        self._check_grad(grad_out, xhat.shape)
        dx, dw, db = F.batch_norm_backward(
            grad_out, xhat, inv_std, self.weight.data if self.affine else None
        )
        if self.affine:
            self.weight.grad, self.bias.grad = dw, db
        return dx if need_input_grad else None


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over (N, C) or (N, C, L) inputs, like ``torch.nn.BatchNorm1d``:
    per channel, ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    Training mode: the batch's mean and biased variance, and the running statistics updated as
    ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased* variance
    (``momentum=None``: a cumulative average); ``num_batches_tracked`` counts the batches.
    Eval mode: the running statistics. State dict: ``weight``, ``bias`` (with ``affine``),
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (int64), as PyTorch's."""

    _ndims = (2, 3)
    _layout = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) inputs per channel, like ``torch.nn.BatchNorm2d``
    (the statistics are over N, H and W); see `BatchNorm1d` for the rest."""

    _ndims = (4,)
    _layout = "(N, C, H, W)"


# --- dropout --------------------------------------------------------------------------------------


class Dropout(Module):
    """Inverted dropout, like ``torch.nn.Dropout``: in training mode each element is zeroed
    with probability ``p`` and the survivors are scaled by ``1 / (1 - p)``, so the expected
    output equals the input; in eval mode the identity. Backward multiplies by the same mask.

    The mask is drawn on the device from `xpcnn.random.current` (the trainer's seeded
    generator during training; a backend default otherwise)."""

    def __init__(self, p=0.5, *, dtype="float32", device="cpu"):
        super().__init__(dtype=dtype, device=device)
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def _shape_text(self):
        return f" (p={self.p})"

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._cache = (None, tuple(x.shape)) if self.training else None
            return x
        gen = random.current(self.backend)
        mask = F.dropout_mask(gen, tuple(x.shape), self.p, x.dtype)
        self._cache = (mask, tuple(x.shape))
        return x * mask

    def backward(self, grad_out, need_input_grad=True):
        mask, shape = self._pop_cache()
        self._check_grad(grad_out, shape)
        if not need_input_grad:
            return None
        return grad_out if mask is None else grad_out * mask


# --- activations ----------------------------------------------------------------------------------


class _Elementwise(Module):
    """An activation: ``forward`` keeps the input (or output) its derivative needs."""

    keeps = "input"  # or "output"

    def _forward(self, x):
        raise NotImplementedError

    def _backward(self, g, kept):
        raise NotImplementedError

    def forward(self, x):
        y = self._forward(x)
        self._cache = (x if self.keeps == "input" else y) if self.training else None
        return y

    def backward(self, grad_out, need_input_grad=True):
        kept = self._pop_cache()
        self._check_grad(grad_out, kept.shape)
        return self._backward(grad_out, kept) if need_input_grad else None


class LeakyReLU(_Elementwise):
    """``x`` for ``x > 0``, else ``negative_slope * x`` (``torch.nn.LeakyReLU``, slope 0.01)."""

    def __init__(self, negative_slope=0.01, *, dtype="float32", device="cpu"):
        super().__init__(dtype=dtype, device=device)
        self.negative_slope = float(negative_slope)

    def _forward(self, x):
        return F.leaky_relu(x, self.negative_slope)

    def _backward(self, g, x):
        return F.leaky_relu_backward(g, x, self.negative_slope)


class ELU(_Elementwise):
    """``x`` for ``x > 0``, else ``alpha * (exp(x) - 1)`` (``torch.nn.ELU``, alpha 1)."""

    def __init__(self, alpha=1.0, *, dtype="float32", device="cpu"):
        super().__init__(dtype=dtype, device=device)
        self.alpha = float(alpha)

    def _forward(self, x):
        return F.elu(x, self.alpha)

    def _backward(self, g, x):
        return F.elu_backward(g, x, self.alpha)


class GELU(_Elementwise):
    """``x * Phi(x)`` with Phi the standard normal CDF (``torch.nn.GELU``):
    ``approximate="none"`` (default) uses erf (`xpcnn.functional.erf`), ``"tanh"`` PyTorch's
    tanh approximation."""

    def __init__(self, approximate="none", *, dtype="float32", device="cpu"):
        super().__init__(dtype=dtype, device=device)
        if approximate not in F.GELU_APPROXIMATIONS:
            raise ValueError(
                f"GELU: approximate must be one of {F.GELU_APPROXIMATIONS}, got {approximate!r}"
            )
        self.approximate = approximate

    def _forward(self, x):
        return F.gelu(x, self.approximate)

    def _backward(self, g, x):
        return F.gelu_backward(g, x, self.approximate)


class Tanh(_Elementwise):
    """``tanh(x)``; backward ``g * (1 - y**2)`` from the output y."""

    keeps = "output"

    def _forward(self, x):
        return array_namespace(x).tanh(x)

    def _backward(self, g, y):
        return F.tanh_backward(g, y)


class Sigmoid(_Elementwise):
    """``1 / (1 + exp(-x))``; backward ``g * y * (1 - y)`` from the output y."""

    keeps = "output"

    def _forward(self, x):
        return F.sigmoid(x)

    def _backward(self, g, y):
        return F.sigmoid_backward(g, y)
