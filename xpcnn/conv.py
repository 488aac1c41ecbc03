"""Convolution math: im2col, the forward pass and its three gradients, in pure Array API code.

Conventions
-----------
Public arrays are NCHW like PyTorch: inputs ``(N, C, H, W)``, weights ``(O, C, kh, kw)``, outputs
``(N, O, OH, OW)``. Internally every function works on NHWC *views* (``permute_dims``, no copy),
because then a row of the im2col matrix is one output pixel and the matrix product
``col @ W.T`` lands directly in NHWC order. Outputs are returned as NCHW views of NHWC memory, so
the next convolution's NHWC view is again free.

Sizes, per spatial axis, with input size ``H``, kernel ``k``, stride ``s``, padding ``p``:

    OH = (H + 2p - k) // s + 1

Forward (a correlation, like every deep-learning "convolution"):

    Z[n, y, x, o] = b[o] + sum_{c,i,j} Xpad[n, s*y + i, s*x + j, c] * W[o, c, i, j]

im2col gathers, for every output pixel (n, y, x), the ``kh*kw*C`` input values it sees into one
row, so the whole layer is one matrix product ``Z = col @ Wmat.T`` with ``Wmat`` the weights laid
out as ``(O, kh*kw*C)`` (`weight_matrix`). The rows are built from ``kh*kw`` strided slices of the
padded input, one per kernel offset (i, j), each a contiguous block of C channels.

Gradients, given ``G = dL/dZ``:

* weight: ``dWmat = G.T @ col`` (each weight saw exactly the inputs in its column);
* bias: ``db = G.sum over n, y, x``;
* input, by dilation (the default): insert ``s - 1`` zeros between the elements of G, pad it by
  ``k - 1 - p`` on each side (plus the rows the stride skipped at the bottom/right), then run a
  stride-1 convolution with the kernel rotated 180 degrees and its in/out channels swapped.
  See `input_grad_dilation` for why this is exactly the transposed convolution;
* input, by col2im (optional, fewer multiply-adds): ``dcol = G @ Wmat`` then scatter-add every
  column back to the input pixel it came from. Tested equal to the dilation path.
"""

from __future__ import annotations

import array_api_extra as xpx
from array_api_compat import device

from ._namespace import array_namespace

INPUT_GRAD_METHODS = ("dilation", "col2im")


def pair(v, name="value"):
    """``3 -> (3, 3)``; ``(2, 3)`` unchanged. Raises TypeError for anything but an int or a pair
    of ints, ValueError for negative values (the message uses ``name``)."""
    if type(v) is tuple and len(v) == 2 and type(v[0]) is type(v[1]) is int and min(v) >= 0:
        return v  # already normalised (the layers pass pairs): skip the checks below
    t = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, tuple | list) else (v,)
    if len(t) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in t):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(t) < 0:
        raise ValueError(f"{name} must be non-negative, got {v!r}")
    return t


def output_size(size, kernel, stride, padding):
    """Spatial output size of a convolution along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def to_nhwc(x):
    """NCHW -> NHWC as a view (no data moves)."""
    return array_namespace(x).permute_dims(x, (0, 2, 3, 1))


def to_nchw(x):
    """NHWC -> NCHW as a view (no data moves)."""
    return array_namespace(x).permute_dims(x, (0, 3, 1, 2))


def im2col(x, kernel, stride):
    """Patches of an NHWC array (already padded) as a matrix.

    Returns ``col`` of shape ``(N*OH*OW, kh*kw*C)``: row ``(n, y, x)`` holds the window under
    output pixel (y, x), in ``(i, j, c)`` order to line up with `weight_matrix`; and ``(OH, OW)``.
    """
    xp = array_namespace(x)
    n, h, w, c = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    # One strided slice per kernel offset (i, j): element [n, y, x, c] of slice (i, j) is
    # x[n, s*y + i, s*x + j, c], the input that offset sees from output pixel (y, x).
    slices = [
        x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    col = xp.stack(slices, axis=3)  # (N, OH, OW, kh*kw, C)
    return xp.reshape(col, (n * oh * ow, kh * kw * c)), (oh, ow)


def weight_matrix(weight):
    """(O, C, kh, kw) weights as the ``(O, kh*kw*C)`` matrix whose columns match `im2col`."""
    xp = array_namespace(weight)
    o, c, kh, kw = weight.shape
    return xp.reshape(xp.permute_dims(weight, (0, 2, 3, 1)), (o, kh * kw * c))


def weight_from_matrix(wmat, shape):
    """Inverse of `weight_matrix`: ``(O, kh*kw*C)`` back to (O, C, kh, kw) (a view)."""
    xp = array_namespace(wmat)
    o, c, kh, kw = shape
    return xp.permute_dims(xp.reshape(wmat, (o, kh, kw, c)), (0, 3, 1, 2))


def conv_stride1(x, weight):
    """Valid stride-1 correlation of NHWC ``x`` with (O, C, kh, kw) ``weight``, NHWC out.

    Computed one kernel tap at a time: ``x @ W[:, :, i, j].T`` multiplies every input pixel by
    tap (i, j), and output pixel (y, x) takes that product from input pixel (y + i, x + j), so
    each tap contributes a shifted window of its product. Summing the kh*kw windows gives the
    same numbers as im2col followed by one product, without building the kh*kw-times larger
    patch matrix; every window is a dense slice, so the additions stream through memory.
    """
    xp = array_namespace(x, weight)
    n, h, w, c = x.shape
    o, _, kh, kw = weight.shape
    oh, ow = h - kh + 1, w - kw + 1
    pixels = xp.reshape(x, (n * h * w, c))
    out = None
    for i in range(kh):
        for j in range(kw):
            product = xp.reshape(pixels @ xp.matrix_transpose(weight[:, :, i, j]), (n, h, w, o))
            window = product[:, i : i + oh, j : j + ow, :]
            if out is None:
                out = xp.asarray(window, copy=True)
            else:
                out += window
    return out


def _reusable(out, shape, like):
    """``out`` if it is an array of ``shape`` with ``like``'s dtype and device, else None."""
    if out is None or tuple(out.shape) != tuple(shape) or out.dtype != like.dtype:
        return None
    return out if device(out) == device(like) else None


def pad_hw(x, padding, out=None):
    """Zero-pad the two spatial axes of an NHWC array.

    ``out`` may be an array this function returned before for the same padding and shape: its
    border is still zero, so only the interior is written (no allocation, no zero fill).
    """
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    n, h, w, c = x.shape
    out = _reusable(out, (n, h + 2 * ph, w + 2 * pw, c), x)
    if out is None:
        return xpx.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    return xpx.at(out)[:, ph : ph + h, pw : pw + w, :].set(x)


def conv2d_forward(x, weight, bias=None, stride=1, padding=0, buffers=None):
    """Convolution forward of x (N, C, H, W) with weight (O, C, kh, kw) and bias (O,) or None;
    ``stride`` and ``padding`` are ints or (h, w) pairs. ``buffers``, a dict the caller keeps
    between calls (each layer keeps its own), lets the padded input's array be reused from call
    to call; never share one dict between convolutions of different padding.

    Returns ``(Z, col)``: Z is (N, O, OH, OW), col the ``(N*OH*OW, kh*kw*C)`` im2col matrix that
    `conv2d_backward` needs for the weight gradient.
    """
    xp = array_namespace(x, weight)
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    o, c, kh, kw = weight.shape
    n = x.shape[0]
    buffers = {} if buffers is None else buffers
    xpad = pad_hw(to_nhwc(x), padding, buffers.get("pad"))
    if padding != (0, 0):
        buffers["pad"] = xpad
    col, (oh, ow) = im2col(xpad, (kh, kw), stride)
    z = col @ xp.matrix_transpose(weight_matrix(weight))  # (N*OH*OW, O)
    if bias is not None:
        z += bias
    return to_nchw(xp.reshape(z, (n, oh, ow, o))), col


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """``torch.nn.functional.conv2d`` equivalent (groups=1, dilation=1): NCHW in, NCHW out."""
    return conv2d_forward(x, weight, bias, stride, padding)[0]


def dilate_pad(g, stride, offset, size, out=None):
    """Spread NHWC ``g`` over a zero array of spatial ``size``, element (y, x) landing at
    ``(offset_h + s_h*y, offset_w + s_w*x)``.

    This is "insert s-1 zeros between elements, then pad by ``offset`` before and whatever
    fills ``size`` after" in one write. A negative offset crops instead of padding (it happens
    when the forward padding exceeds k-1), and elements that fall outside ``size`` are dropped
    (they come from outputs that only saw padding). ``out`` may be an array this function
    returned before for the same arguments' shapes: the zeros are where they were, so only g's
    elements are written again.
    """
    xp = array_namespace(g)
    n, oh, ow, o = g.shape
    out = _reusable(out, (n, size[0], size[1], o), g)
    if out is None:
        out = xp.zeros((n, size[0], size[1], o), dtype=g.dtype, device=device(g))
    index = [slice(None)]
    src = [slice(None)]
    for a, s, m, full in zip(offset, stride, (oh, ow), size, strict=True):
        lo = 0 if a >= 0 else (-a + s - 1) // s  # first element that lands at >= 0
        hi = min(m, (full - a + s - 1) // s)  # one past the last that lands at < full
        if hi <= lo:
            return out
        index.append(slice(a + lo * s, a + (hi - 1) * s + 1, s))
        src.append(slice(lo, hi))
    index.append(slice(None))
    src.append(slice(None))
    return xpx.at(out)[tuple(index)].set(g[tuple(src)])


def rotate_kernel(weight):
    """Rotate each kernel by 180 degrees, swap in/out channels: (O, C, kh, kw) -> (C, O, kh, kw)."""
    xp = array_namespace(weight)
    return xp.permute_dims(xp.flip(weight, axis=(2, 3)), (1, 0, 2, 3))


def input_grad_dilation(g, weight, in_size, stride, padding, buffers=None):
    """dL/dX (NHWC) from G = dL/dZ (NHWC) by dilation and a stride-1 convolution.

    Why it works, along one axis: ``Z[y] = sum_i Xpad[s*y + i] W[i]``, so input row ``h`` (of the
    unpadded X, i.e. ``Xpad`` row ``h + p``) receives ``G[y] * W[i]`` from every (y, i) with
    ``s*y + i = h + p``. Put G's rows at positions ``s*y`` of a zero array D (the dilation); then
    ``dX[h] = sum_i D[h + p - i] W[i]``. Substituting ``i' = k - 1 - i`` (the 180-degree rotation)
    gives ``dX[h] = sum_i' D[h - (k - 1 - p) + i'] Wrot[i']``: a stride-1 correlation of D padded
    by ``k - 1 - p`` in front with the rotated kernel. Output channel o of the forward pass is an
    input channel of this one, hence the channel swap. Rows of X beyond the last window the stride
    reached get zero gradient: that is the extra "remainder" padding at the end.
    ``buffers`` (a dict kept by the caller) lets the dilated array be reused between calls.
    """
    kh, kw = weight.shape[2:]
    (h, w), (ph, pw) = in_size, padding
    buffers = {} if buffers is None else buffers
    d = dilate_pad(
        g, stride, (kh - 1 - ph, kw - 1 - pw), (h + kh - 1, w + kw - 1), buffers.get("dilated")
    )
    buffers["dilated"] = d
    return conv_stride1(d, rotate_kernel(weight))


def col2im(cols, size, stride):
    """The adjoint of `im2col`: add every patch value back onto the pixel it was read from.

    ``cols`` is ``(N, OH, OW, kh, kw, C)``; returns the NHWC array of spatial ``size`` (the
    padded input's). Where windows overlap (kernel > stride) the patches are added one kernel
    offset at a time. Where they do not (stride >= kernel, as in SimpleCNN), each pixel gets
    at most one value, so the scatter is a plain permutation of ``cols`` (plus zeros in the
    gaps when the stride exceeds the kernel): one copy instead of kh*kw strided additions.
    """
    xp = array_namespace(cols)
    n, oh, ow, kh, kw, c = cols.shape
    (hp, wp), (sh, sw) = size, stride
    if sh < kh or sw < kw:
        out = xp.zeros((n, hp, wp, c), dtype=cols.dtype, device=device(cols))
        for i in range(kh):
            for j in range(kw):
                rows = slice(i, i + sh * (oh - 1) + 1, sh)
                cols_ = slice(j, j + sw * (ow - 1) + 1, sw)
                out = xpx.at(out)[:, rows, cols_, :].add(cols[:, :, :, i, j, :])
        return out
    tiles = xp.permute_dims(cols, (0, 1, 3, 2, 4, 5))  # (N, OH, kh, OW, kw, C)
    if (sh, sw) != (kh, kw):
        tiles = xpx.pad(tiles, ((0, 0), (0, 0), (0, sh - kh), (0, 0), (0, sw - kw), (0, 0)))
    out = xp.reshape(tiles, (n, oh * sh, ow * sw, c))
    # The tiles cover rows [0, OH*s): crop the gap past the last window, or add the rows the
    # stride never reached (they get zero gradient).
    out = out[:, : min(hp, oh * sh), : min(wp, ow * sw), :]
    if out.shape[1] < hp or out.shape[2] < wp:
        out = xpx.pad(out, ((0, 0), (0, hp - out.shape[1]), (0, wp - out.shape[2]), (0, 0)))
    return out


def input_grad_col2im(g, weight, in_size, stride, padding):
    """dL/dX (NHWC) from G (NHWC) as ``G @ Wmat`` followed by `col2im`.

    Same result as `input_grad_dilation`, without multiplying the inserted zeros.
    """
    xp = array_namespace(g, weight)
    n, oh, ow, o = g.shape
    _, c, kh, kw = weight.shape
    (h, w), (ph, pw) = in_size, padding
    dcol = xp.reshape(g, (n * oh * ow, o)) @ weight_matrix(weight)
    dx = col2im(xp.reshape(dcol, (n, oh, ow, kh, kw, c)), (h + 2 * ph, w + 2 * pw), stride)
    return dx[:, ph : ph + h, pw : pw + w, :]


def conv2d_backward(
    g,
    col,
    x_shape,
    weight,
    stride=1,
    padding=0,
    *,
    input_grad="dilation",
    need_input_grad=True,
    buffers=None,
):
    """Gradients of a convolution. ``g`` is dL/dZ (NCHW), ``col`` what the forward returned,
    ``x_shape`` the forward input's (N, C, H, W); ``buffers`` as in `conv2d_forward`. Raises
    ValueError for an unknown ``input_grad``.

    Returns ``(dx, dw, db)``: dx NCHW (None when ``need_input_grad`` is false, e.g. for the
    first layer, whose input is data), dw like ``weight``, db of shape ``(O,)``.
    """
    xp = array_namespace(g, weight)
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    n, o, oh, ow = g.shape
    g_nhwc = to_nhwc(g)
    g2d = xp.reshape(g_nhwc, (n * oh * ow, o))
    dw = weight_from_matrix(xp.matrix_transpose(g2d) @ col, weight.shape)
    db = xp.sum(g2d, axis=0)
    if not need_input_grad:
        return None, dw, db
    in_size = tuple(x_shape[2:])
    if input_grad == "dilation":
        dx = input_grad_dilation(g_nhwc, weight, in_size, stride, padding, buffers)
    elif input_grad == "col2im":
        dx = input_grad_col2im(g_nhwc, weight, in_size, stride, padding)
    else:
        raise ValueError(f"input_grad must be one of {INPUT_GRAD_METHODS}, got {input_grad!r}")
    return to_nchw(dx), dw, db
