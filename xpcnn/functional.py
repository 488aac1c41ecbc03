"""The non-convolution math: ReLU, linear (fully connected) and softmax cross-entropy, each with
its hand-written gradient. Pure Array API; the convolution lives in `xpcnn.conv`.

Where a backend registered a fused version of a step (`xpcnn.kernels`), it is used; otherwise
the Array API expression beside it is the code. Nothing here caches arrays between calls, so
every function can be traced by ``jax.jit`` or captured in a CUDA graph.
"""

from __future__ import annotations

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
