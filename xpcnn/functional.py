"""The non-convolution math: ReLU, linear (fully connected) and softmax cross-entropy, each with
its hand-written gradient. Pure Array API; the convolution lives in `xpcnn.conv`.

Where a backend registered a fused version of a step (`xpcnn.kernels`), it is used; otherwise
the Array API expression beside it is the code. Nothing here caches arrays between calls, so
every function can be traced by ``jax.jit`` or captured in a CUDA graph.
"""

from __future__ import annotations

import math

from array_api_compat import device

from ._namespace import array_namespace
from .kernels import hook


def relu(x):
    """``max(x, 0)`` elementwise."""
    xp = array_namespace(x)
    fused = hook(xp, "relu")
    return fused(x) if fused else xp.maximum(x, 0.0)


def relu_backward(g, y):
    """dL/dx of ReLU from dL/dy and the forward *output* y: g where y > 0, else 0.

    Written as ``g * (y > 0)`` with the mask cast to g's dtype: on NumPy this multiply is
    several times faster than ``where``.
    """
    xp = array_namespace(g, y)
    fused = hook(xp, "relu_backward")
    return fused(g, y) if fused else g * xp.astype(y > 0, g.dtype)


def linear(x, weight, bias=None):
    """``y = x @ W.T + b`` with PyTorch's layout: x (N, in), W (out, in), b (out,)."""
    xp = array_namespace(x, weight)
    y = x @ xp.matrix_transpose(weight)
    if bias is not None:
        y += bias
    return y


def linear_backward(g, x, weight, need_input_grad=True):
    """Gradients of `linear` from g = dL/dy (N, out): ``dx = g @ W`` (N, in), ``dW = g.T @ x``
    (out, in), ``db = sum_n g`` (out,). Returns ``(dx, dW, db)``; dx is None when
    ``need_input_grad`` is false."""
    xp = array_namespace(g, x, weight)
    dw = xp.matrix_transpose(g) @ x
    db = xp.sum(g, axis=0)
    dx = g @ weight if need_input_grad else None
    return dx, dw, db


def log_softmax(logits):
    """``z - logsumexp(z)`` per row of (N, K) logits, shifted by the row maximum so exp never
    overflows."""
    xp = array_namespace(logits)
    shifted = logits - xp.max(logits, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


def one_hot(labels, num_classes, dtype=None):
    """Boolean (or ``dtype``) one-hot matrix (N, K) of integer labels, on the labels' device."""
    xp = array_namespace(labels)
    classes = xp.arange(num_classes, dtype=labels.dtype, device=device(labels))
    hot = labels[:, None] == classes
    return hot if dtype is None else xp.astype(hot, dtype)


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy over the batch and its gradient with respect to the logits.

    ``logits`` (N, K) float, ``labels`` (N,) integers in [0, K). With p = softmax(z) and y the
    one-hot label, ``L = -mean_n log p[n, label_n]`` and ``dL/dz = (p - y) / N``.
    Returns ``(loss, dlogits)``; loss is a 0-d array on the logits' device. Labels are not
    range-checked here (that would need a device-to-host read); `xpcnn.datasets.Dataset` and
    the trainer check them where data enters.
    """
    xp = array_namespace(logits, labels)
    n, k = logits.shape
    logp = log_softmax(logits)
    hot = one_hot(labels, k)
    loss = -xp.sum(xp.where(hot, logp, 0.0)) / n
    fused = hook(xp, "softmax_xent_grad")
    if fused:
        return loss, fused(logp, hot, n)
    return loss, (xp.exp(logp) - xp.astype(hot, logits.dtype)) / n


def correct_count(logits, labels):
    """How many rows of ``logits`` have their largest value at the label, as a 0-d array of the
    logits' dtype (it stays on the device)."""
    xp = array_namespace(logits)
    return xp.sum(xp.astype(xp.argmax(logits, axis=1) == labels, logits.dtype))


# --- activations ----------------------------------------------------------------------------------
#
# Each activation is a pair: the forward function, and its backward from g = dL/dy and what the
# forward kept (the input x or the output y, whichever gives the cheaper formula). All are
# elementwise, so dL/dx = g * dy/dx, with dy/dx written out beside each.


def leaky_relu(x, negative_slope=0.01):
    """``x`` where ``x > 0``, else ``negative_slope * x``."""
    xp = array_namespace(x)
    return xp.where(x > 0, x, x * negative_slope)


def leaky_relu_backward(g, x, negative_slope=0.01):
    """dy/dx is 1 where ``x > 0``, else ``negative_slope`` (at 0 too, as PyTorch)."""
    xp = array_namespace(g, x)
    return xp.where(x > 0, g, g * negative_slope)


def elu(x, alpha=1.0):
    """``x`` where ``x > 0``, else ``alpha * (exp(x) - 1)`` (computed with ``expm1``)."""
    xp = array_namespace(x)
    return xp.where(x > 0, x, alpha * xp.expm1(xp.minimum(x, 0.0)))


def elu_backward(g, x, alpha=1.0):
    """dy/dx is 1 where ``x > 0``, else ``alpha * exp(x)`` (at 0: ``alpha``, as PyTorch)."""
    xp = array_namespace(g, x)
    return xp.where(x > 0, g, g * (alpha * xp.exp(xp.minimum(x, 0.0))))


def tanh_backward(g, y):
    """dy/dx of ``y = tanh(x)`` is ``1 - y**2``."""
    return g * (1.0 - y * y)


def sigmoid(x):
    """``1 / (1 + exp(-x))`` without overflow: with ``e = exp(-|x|)`` (never above 1) it is
    ``1 / (1 + e)`` for ``x >= 0`` and ``e / (1 + e)`` for ``x < 0``."""
    xp = array_namespace(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0, e) / (1.0 + e)


def sigmoid_backward(g, y):
    """dy/dx of ``y = sigmoid(x)`` is ``y * (1 - y)``."""
    return g * (y * (1.0 - y))


# erf, W. J. Cody's rational Chebyshev approximations ("Rational Chebyshev approximations for
# the error function", Math. Comp. 23 (1969) 631-637; the coefficients of his CALERF routine).
# Relative error below 1e-16 in three ranges of |x|: erf directly for |x| <= 0.5, erfc for
# 0.5 < |x| <= 4 and, as an asymptotic series in 1/x**2, for |x| > 4.
_ERF_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02,
          3.20937758913846947e03, 1.85777706184603153e-1)  # fmt: skip
_ERF_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
          2.84423683343917062e03)  # fmt: skip
_ERF_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01,
          2.98635138197400131e02, 8.81952221241769090e02, 1.71204761263407058e03,
          2.05107837782607147e03, 1.23033935479799725e03, 2.15311535474403846e-8)  # fmt: skip
_ERF_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
          1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
          3.43936767414372164e03, 1.23033935480374942e03)  # fmt: skip
_ERF_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1,
          1.60837851487422766e-2, 6.58749161529837803e-4, 1.63153871373020978e-2)  # fmt: skip
_ERF_Q = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1,
          6.05183413124413191e-2, 2.33520497626869185e-3)  # fmt: skip
_SQRT_PI_INV = 5.6418958354775628695e-1  # 1 / sqrt(pi)


def erf(x):
    """The error function ``erf(x) = 2/sqrt(pi) * integral_0^x exp(-t**2) dt`` elementwise.

    The Array API has no erf. A backend may register its own (`xpcnn.kernels` hook ``"erf"``:
    torch, JAX and CuPy do); the fallback is W. J. Cody's rational approximation (relative
    error below 1e-16, so float64-accurate), all three ranges computed and picked with
    ``where``.
    """
    xp = array_namespace(x)
    fused = hook(xp, "erf")
    if fused:
        return fused(x)
    a = xp.abs(x)
    # |x| <= 0.5: erf(x) = x * P(x^2) / Q(x^2)
    z = xp.minimum(a, 0.5) ** 2
    num, den = _ERF_A[4] * z, z
    for i in range(3):
        num, den = (num + _ERF_A[i]) * z, (den + _ERF_B[i]) * z
    small = x * (num + _ERF_A[3]) / (den + _ERF_B[3])
    # 0.5 < |x| <= 4: erfc(|x|) = exp(-x^2) * R(|x|)
    y = xp.clip(a, 0.5, 4.0)
    num, den = _ERF_C[8] * y, y
    for i in range(7):
        num, den = (num + _ERF_C[i]) * y, (den + _ERF_D[i]) * y
    middle = (num + _ERF_C[7]) / (den + _ERF_D[7])
    # |x| > 4: erfc(|x|) = exp(-x^2) / |x| * (1/sqrt(pi) + S(1/x^2) / x^2)
    y = xp.maximum(a, 4.0)
    z = 1.0 / (y * y)
    num, den = _ERF_P[5] * z, z
    for i in range(4):
        num, den = (num + _ERF_P[i]) * z, (den + _ERF_Q[i]) * z
    large = (_SQRT_PI_INV - z * (num + _ERF_P[4]) / (den + _ERF_Q[4])) / y
    # exp(-x^2) as exp(-xf^2) * exp(-(x - xf)(x + xf)) with xf = x rounded to 1/16 (Cody's
    # trick: x^2 itself would lose the low bits that matter once it is large)
    b = xp.maximum(a, 0.5)
    bf = xp.floor(b * 16.0) / 16.0
    decay = xp.exp(-bf * bf) * xp.exp(-(b - bf) * (b + bf))
    erfc = decay * xp.where(a <= 4.0, middle, large)
    big = xp.where(x < 0, erfc - 1.0, 1.0 - erfc)  # erf(-x) = -erf(x)
    return xp.where(a <= 0.5, small, big)


_SQRT_HALF = 0.70710678118654752440  # 1 / sqrt(2)
_INV_SQRT_2PI = 0.39894228040143267794  # 1 / sqrt(2 pi)
_SQRT_2_OVER_PI = 0.79788456080286535588  # sqrt(2 / pi)
_GELU_TANH_C = 0.044715
GELU_APPROXIMATIONS = ("none", "tanh")


def gelu(x, approximate="none"):
    """``x * Phi(x)``, Phi the standard normal CDF: ``Phi(x) = (1 + erf(x / sqrt(2))) / 2``
    (``approximate="none"``), or PyTorch's tanh form ``0.5 x (1 + tanh(u))`` with
    ``u = sqrt(2/pi) (x + 0.044715 x**3)`` (``approximate="tanh"``)."""
    xp = array_namespace(x)
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x * x)
        return 0.5 * x * (1.0 + xp.tanh(u))
    return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))


def gelu_backward(g, x, approximate="none"):
    """dy/dx of `gelu`. Exact form: ``Phi(x) + x * phi(x)``, phi the normal density
    ``exp(-x**2 / 2) / sqrt(2 pi)``. Tanh form, with ``t = tanh(u)``:
    ``0.5 (1 + t) + 0.5 x (1 - t**2) sqrt(2/pi) (1 + 3 * 0.044715 x**2)``."""
    xp = array_namespace(g, x)
    if approximate == "tanh":
        x2 = x * x
        t = xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_C * x2 * x))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * x2)
        return g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
    cdf = 0.5 * (1.0 + erf(x * _SQRT_HALF))
    pdf = _INV_SQRT_2PI * xp.exp(-0.5 * x * x)
    return g * (cdf + x * pdf)


# --- dropout --------------------------------------------------------------------------------------


def dropout_mask(generator, shape, p, dtype):
    """The inverted-dropout multiplier: ``1 / (1 - p)`` with probability ``1 - p``, else 0, of
    ``shape`` and ``dtype``, drawn from ``generator`` (an `xpcnn.random.Generator`) on its
    device. ``p = 1`` gives all zeros (nothing is kept; no division by zero)."""
    keep = generator.bernoulli(1.0 - p, shape)
    xp = array_namespace(keep)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return xp.astype(keep, dtype) * scale


# --- batch normalisation --------------------------------------------------------------------------
#
# For an input with channels on axis 1, ``axes`` are the other axes (the ones averaged over):
# (0,) for (N, C), (0, 2, 3) for (N, C, H, W). With M = the number of values per channel,
#
#     mean = sum x / M,  var = sum (x - mean)^2 / M   (biased: what normalises)
#     xhat = (x - mean) / sqrt(var + eps),  y = weight * xhat + bias
#
# Backward (per channel, sums over ``axes``; dxhat = g * weight):
#
#     dbias = sum g,  dweight = sum g * xhat
#     dx = (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) / sqrt(var + eps)
#
# The last line because mean and var depend on every x of the channel: dxhat reaches x directly
# (1 / sqrt(var + eps)), through the mean (-1/M each) and through the variance
# (d var / dx = 2 (x - mean) / M), and the two indirect paths give the two subtracted means.


def _channel_shape(x):
    """Shape that broadcasts a per-channel (C,) vector against ``x`` (channels on axis 1)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _channel_sum(x):
    """Sum of ``x`` over every axis but the channels (axis 1), as a (C,) vector: first over the
    batch, then over the rest. In float32 this order matters: one reduction over (N, H, W)
    of an NHWC-strided array adds tens of thousands of values one after another (NumPy sums
    pairwise only along a contiguous axis), a relative error of 1e-4 for batch 128 at 28x28;
    two shorter reductions keep it near 1e-6."""
    xp = array_namespace(x)
    s = xp.sum(x, axis=0)
    return s if s.ndim == 1 else xp.sum(s, axis=tuple(range(1, s.ndim)))


def _channel_mean(x):
    """Mean over every axis but the channels (see `_channel_sum`), a (C,) vector."""
    return _channel_sum(x) / float(math.prod(x.shape) // x.shape[1])


def batch_norm_train(x, weight, bias, eps):
    """Batch normalisation with the batch's own statistics (training mode).

    ``x`` is (N, C) or (N, C, H, W); ``weight``/``bias`` are (C,) or None (no affine).
    Returns ``(y, xhat, inv_std, mean, var)``: the output, what `batch_norm_backward` needs,
    and the per-channel batch mean and *biased* variance, (C,) each.
    """
    xp = array_namespace(x)
    shape = _channel_shape(x)
    mean = _channel_mean(x)
    centred = x - xp.reshape(mean, shape)
    var = _channel_mean(centred * centred)
    inv_std = 1.0 / xp.sqrt(var + eps)
    xhat = centred * xp.reshape(inv_std, shape)
    y = xhat
    if weight is not None:
        y = xhat * xp.reshape(weight, shape) + xp.reshape(bias, shape)
    return y, xhat, inv_std, mean, var


def batch_norm_backward(g, xhat, inv_std, weight):
    """Gradients of `batch_norm_train` from ``g = dL/dy``: ``(dx, dweight, dbias)``; the last
    two are None when there is no ``weight``."""
    xp = array_namespace(g, xhat)
    shape = _channel_shape(g)
    count = float(math.prod(g.shape) // g.shape[1])
    # dxhat = g * w with w one value per channel, so mean(dxhat) and mean(dxhat * xhat) are
    # w * dbias / count and w * dweight / count: two reductions serve all three gradients.
    sum_g = _channel_sum(g)
    sum_g_xhat = _channel_sum(g * xhat)
    scale = inv_std if weight is None else inv_std * weight
    centred = g - xp.reshape(sum_g / count, shape) - xhat * xp.reshape(sum_g_xhat / count, shape)
    dx = centred * xp.reshape(scale, shape)
    if weight is None:
        return dx, None, None
    return dx, sum_g_xhat, sum_g


def running_update(running_mean, running_var, mean, var, count, momentum):
    """PyTorch's running statistics: ``r <- (1 - momentum) r + momentum * batch value``, with
    the *unbiased* batch variance ``var * count / (count - 1)`` (``count`` values per channel;
    for ``count == 1`` the unbiased variance is undefined and the biased one is used).
    ``momentum`` may be a 0-d array (the cumulative average uses 1 / batches seen)."""
    unbiased = var * (count / (count - 1)) if count > 1 else var
    new_mean = running_mean + momentum * (mean - running_mean)
    new_var = running_var + momentum * (unbiased - running_var)
    return new_mean, new_var


def batch_norm_eval(x, running_mean, running_var, weight, bias, eps):
    """Batch normalisation with fixed statistics (eval mode): an affine map per channel,
    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``."""
    xp = array_namespace(x)
    shape = _channel_shape(x)
    scale = 1.0 / xp.sqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    y = (x - xp.reshape(running_mean, shape)) * xp.reshape(scale, shape)
    return y if bias is None else y + xp.reshape(bias, shape)


def batch_norm_eval_backward(g, x, running_mean, running_var, weight, eps):
    """Gradients of `batch_norm_eval` (the statistics are constants): ``dx = g * weight /
    sqrt(running_var + eps)``, ``dweight = sum g * xhat``, ``dbias = sum g``; returns
    ``(dx, dweight, dbias)`` (the last two None without ``weight``)."""
    xp = array_namespace(g, x)
    shape = _channel_shape(g)
    inv_std = 1.0 / xp.sqrt(running_var + eps)
    if weight is None:
        return g * xp.reshape(inv_std, shape), None, None
    xhat = (x - xp.reshape(running_mean, shape)) * xp.reshape(inv_std, shape)
    dx = g * xp.reshape(inv_std * weight, shape)
    return dx, _channel_sum(g * xhat), _channel_sum(g)
