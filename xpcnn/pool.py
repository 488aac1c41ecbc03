"""Pooling math: max, average and adaptive average pooling with their hand-written gradients, in
pure Array API code (NCHW, like PyTorch).

Sizes per spatial axis, as for a convolution: input ``H``, kernel ``k``, stride ``s``, padding
``p`` give ``OH = (H + 2p - k) // s + 1`` (PyTorch's ``ceil_mode=False``).

Like `xpcnn.conv`, every window is seen through *strided slices*: for kernel offset (i, j),

    window[n, c, y, x] at offset (i, j) = Xpad[n, c, s*y + i, s*x + j]
                                        = Xpad[:, :, i : i + s*(OH-1) + 1 : s, j : ...][n, c, y, x]

so a pooling layer is ``kh*kw`` slices combined elementwise, and its backward adds ``kh*kw``
slices of the gradient back into the strided positions they came from (``xpx.at(...).add``;
windows that overlap, ``s < k``, simply add twice).

Max pooling, forward: ``Y = max over (i, j) of window(i, j)``; backward: each output's gradient
goes to the one input that was the maximum, all others get 0. When several inputs of a window
share the maximum, PyTorch's CPU kernel sends the gradient to the *first* of them in row-major
window order (``(0, 0), (0, 1), ..., (1, 0), ...``) and so does this code: a later offset takes
over only if it is strictly greater (or NaN, which PyTorch also lets win). Padding is ``-inf``
and never the chosen maximum: an input takes over from it even when the input is ``-inf`` too.

Average pooling, forward: ``Y = sum over (i, j) of window(i, j) / divisor``; backward: every
input of the window receives ``G / divisor``. The divisor is ``kh*kw`` (``count_include_pad=True``,
PyTorch's default: the padding zeros count) or the number of real (unpadded) inputs under the
window.

Adaptive average pooling to ``(OH, OW)``: output cell (y, x) averages the input rows
``floor(y*H/OH) .. ceil((y+1)*H/OH) - 1`` and the columns likewise (PyTorch's windows); for
``(1, 1)`` that is the global average over H and W, and where OH divides H and OW divides W it
is average pooling with kernel = stride = ``(H/OH, W/OW)``.
"""

from __future__ import annotations

import math

import array_api_extra as xpx
from array_api_compat import device

from ._namespace import array_namespace
from .conv import output_size

__all__ = [
    "adaptive_avg_pool2d",
    "adaptive_avg_pool2d_backward",
    "adaptive_windows",
    "avg_pool2d",
    "avg_pool2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "pool_output_shape",
]


def pool_output_shape(input_shape, kernel, stride, padding):
    """``(N, C, OH, OW)`` of pooling an ``(N, C, H, W)`` input."""
    n, c, h, w = input_shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return (n, c, output_size(h, kh, sh, ph), output_size(w, kw, sw, pw))


def _pad(x, padding, value):
    (ph, pw) = padding
    if ph == 0 and pw == 0:
        return x
    xp = array_namespace(x)
    return xpx.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value, xp=xp)


def _window(xpad, i, j, out_hw, stride):
    """The strided slice that kernel offset (i, j) sees from every output pixel."""
    (oh, ow), (sh, sw) = out_hw, stride
    return xpad[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]


def _offsets(kernel):
    kh, kw = kernel
    return [(i, j) for i in range(kh) for j in range(kw)]  # row-major window order


def max_pool2d(x, kernel, stride, padding):
    """Max pooling of NCHW ``x``. Returns ``(y, index)``: the maxima (N, C, OH, OW) and, for
    `max_pool2d_backward`, which offset of the window held each (an int32 array, offsets
    numbered in row-major order; ties go to the first)."""
    xp = array_namespace(x)
    _, _, oh, ow = pool_output_shape(x.shape, kernel, stride, padding)
    xpad = _pad(x, padding, -math.inf)
    real = None  # with padding: which window positions are inputs (PyTorch never picks padding)
    if padding != (0, 0):
        ones = xp.ones((1, 1, x.shape[2], x.shape[3]), dtype=xp.bool, device=device(x))
        real = _pad(ones, padding, False)
    y = index = y_real = None
    for k, (i, j) in enumerate(_offsets(kernel)):
        s = _window(xpad, i, j, (oh, ow), stride)
        if y is None:
            y = s
            index = xp.zeros(s.shape, dtype=xp.int32, device=device(x))
            y_real = None if real is None else _window(real, i, j, (oh, ow), stride)
            continue
        better = (s > y) | xp.isnan(s)  # strictly greater: an earlier equal maximum stays
        if real is not None:  # an input takes over from padding even at -inf
            better = better | (_window(real, i, j, (oh, ow), stride) & ~y_real)
            y_real = y_real | better
        y = xp.where(better, s, y)
        index = xp.where(better, k, index)
    return y, index


def max_pool2d_backward(g, index, x_shape, kernel, stride, padding):
    """dL/dx of `max_pool2d` from ``g = dL/dy`` and its ``index``: each window's gradient
    goes to the input that was its maximum."""
    xp = array_namespace(g)
    (ph, pw), (_, _, h, w) = padding, x_shape
    oh, ow = g.shape[2], g.shape[3]
    n, c = x_shape[0], x_shape[1]
    dx = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=g.dtype, device=device(g))
    (sh, sw) = stride
    for k, (i, j) in enumerate(_offsets(kernel)):
        rows = slice(i, i + sh * (oh - 1) + 1, sh)
        cols = slice(j, j + sw * (ow - 1) + 1, sw)
        dx = xpx.at(dx)[:, :, rows, cols].add(xp.where(index == k, g, 0.0))
    return dx[:, :, ph : ph + h, pw : pw + w]


def _divisor(x_shape, kernel, stride, padding, count_include_pad, like):
    """The per-window divisor: ``kh*kw`` (a float), or an (OH, OW) array counting the real
    inputs under each window."""
    kh, kw = kernel
    if count_include_pad or padding == (0, 0):
        return float(kh * kw)
    xp = array_namespace(like)
    ones = xp.ones((1, 1, x_shape[2], x_shape[3]), dtype=like.dtype, device=device(like))
    count, _ = avg_pool2d(ones, kernel, stride, padding, True)  # mean of a 0/1 mask
    return count * float(kh * kw)


def avg_pool2d(x, kernel, stride, padding, count_include_pad=True):
    """Average pooling of NCHW ``x``. Returns ``(y, divisor)``; the divisor (a float, or an
    (1, 1, OH, OW) array of counts) is what `avg_pool2d_backward` needs."""
    _, _, oh, ow = pool_output_shape(x.shape, kernel, stride, padding)
    xpad = _pad(x, padding, 0.0)
    total = None
    for i, j in _offsets(kernel):
        s = _window(xpad, i, j, (oh, ow), stride)
        total = s if total is None else total + s
    divisor = _divisor(x.shape, kernel, stride, padding, count_include_pad, x)
    return total / divisor, divisor


def avg_pool2d_backward(g, divisor, x_shape, kernel, stride, padding):
    """dL/dx of `avg_pool2d`: every input under a window receives ``g / divisor``."""
    xp = array_namespace(g)
    (ph, pw), (n, c, h, w), (sh, sw) = padding, x_shape, stride
    oh, ow = g.shape[2], g.shape[3]
    share = g / divisor
    dx = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=g.dtype, device=device(g))
    for i, j in _offsets(kernel):
        rows = slice(i, i + sh * (oh - 1) + 1, sh)
        cols = slice(j, j + sw * (ow - 1) + 1, sw)
        dx = xpx.at(dx)[:, :, rows, cols].add(share)
    return dx[:, :, ph : ph + h, pw : pw + w]


def adaptive_windows(size, out):
    """PyTorch's adaptive-pooling windows along one axis: ``[(start, stop), ...]`` with
    ``start = floor(k * size / out)`` and ``stop = ceil((k + 1) * size / out)``."""
    return [((k * size) // out, -((-(k + 1) * size) // out)) for k in range(out)]


def adaptive_avg_pool2d(x, output_size):
    """Adaptive average pooling of NCHW ``x`` to ``output_size = (OH, OW)``."""
    xp = array_namespace(x)
    oh, ow = output_size
    h, w = x.shape[2], x.shape[3]
    if (oh, ow) == (1, 1):
        return xp.mean(x, axis=(2, 3), keepdims=True)
    if h % oh == 0 and w % ow == 0:  # equal windows that tile x: plain average pooling
        kernel = (h // oh, w // ow)
        return avg_pool2d(x, kernel, kernel, (0, 0))[0]
    rows = []
    for r0, r1 in adaptive_windows(h, oh):
        cells = [xp.mean(x[:, :, r0:r1, c0:c1], axis=(2, 3)) for c0, c1 in adaptive_windows(w, ow)]
        rows.append(xp.stack(cells, axis=2))  # (N, C, OW)
    return xp.stack(rows, axis=2)  # (N, C, OH, OW)


def adaptive_avg_pool2d_backward(g, x_shape):
    """dL/dx of `adaptive_avg_pool2d`: output cell (y, x) hands ``g / window area`` to every
    input of its window (windows may overlap; their shares add up)."""
    xp = array_namespace(g)
    n, c, h, w = x_shape
    oh, ow = g.shape[2], g.shape[3]
    if (oh, ow) == (1, 1):
        return xp.broadcast_to(g / float(h * w), (n, c, h, w))
    if h % oh == 0 and w % ow == 0:
        kernel = (h // oh, w // ow)
        return avg_pool2d_backward(g, float(h * w // (oh * ow)), x_shape, kernel, kernel, (0, 0))
    dx = xp.zeros((n, c, h, w), dtype=g.dtype, device=device(g))
    for y, (r0, r1) in enumerate(adaptive_windows(h, oh)):
        for x_, (c0, c1) in enumerate(adaptive_windows(w, ow)):
            share = g[:, :, y : y + 1, x_ : x_ + 1] / float((r1 - r0) * (c1 - c0))
            dx = xpx.at(dx)[:, :, r0:r1, c0:c1].add(share)
    return dx
