"""The non-convolution math: ReLU, linear (fully connected) and softmax cross-entropy, each with
its hand-written gradient. Pure Array API; the convolution lives in `xpcnn.conv`.
"""

from __future__ import annotations

from array_api_compat import device

from ._namespace import array_namespace

_zeros = {}


def _zero(xp, dtype, dev):
    """A 0-d zero of ``dtype`` on ``dev``, made once: creating it from a Python float on every
    call would be a host-to-device copy, which stalls a GPU at every ReLU."""
    key = (xp.__name__, str(dtype), str(dev))  # CuPy devices are not hashable
    zero = _zeros.get(key)
    if zero is None:
        zero = _zeros[key] = xp.zeros((), dtype=dtype, device=dev)
    return zero


def relu(x):
    """``max(x, 0)`` elementwise."""
    xp = array_namespace(x)
    return xp.maximum(x, _zero(xp, x.dtype, device(x)))


def relu_backward(g, y):
    """dL/dx of ReLU from dL/dy and the forward *output* y: g where y > 0, else 0.

    Written as ``g * (y > 0)`` with the mask cast to g's dtype: on NumPy and torch this
    multiply is several times faster than ``where``.
    """
    xp = array_namespace(g, y)
    return g * xp.astype(y > 0, g.dtype)


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
    range-checked here (that would need a device-to-host read); `xpcnn.datasets` checks them
    when it loads a dataset.
    """
    xp = array_namespace(logits, labels)
    n, k = logits.shape
    logp = log_softmax(logits)
    hot = one_hot(labels, k)
    loss = -xp.sum(xp.where(hot, logp, 0.0)) / n
    grad = (xp.exp(logp) - xp.astype(hot, logits.dtype)) / n
    return loss, grad
