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
padded input, one per kernel offset (i, j), each a contiguous block of C channels (or, where the
windows tile the input, by one reshape and permutation). `Conv2d` stores its weight in the memory
order of ``Wmat.T`` (`matrix_order`), so that the product's right factor is a view.

Gradients, given ``G = dL/dZ``:

* weight: ``dWmat = G.T @ col`` (each weight saw exactly the inputs in its column);
* bias: ``db = G.sum over n, y, x``;
* input, by dilation, literally (``"dilation-zeros"``, `input_grad_dilation_zeros`): insert
  ``s - 1`` zeros between the elements of G, pad it by ``k - 1 - p`` on each side (plus the rows
  the stride skipped at the bottom/right), then run a stride-1 convolution with the kernel rotated
  180 degrees and its in/out channels swapped. See `input_grad_dilation_zeros` for why this is
  exactly the transposed convolution;
* input, by dilation phase by phase (``"dilation"``, the default, `input_grad_dilation`): the
  same sum without its products with the inserted zeros. Input rows of one residue mod the stride
  (a phase) only ever meet the kernel taps of one residue, so each phase is a stride-1
  convolution of G itself with those taps, written into every s-th row and column of dX;
* input, by col2im (``"col2im"``): ``dcol = G @ Wmat`` then scatter-add every column back to the
  input pixel it came from.

The three input gradients are tested equal.

Arrays are never kept from one call to the next unless the caller passes a ``buffers`` dict and
the array can be written in place (not a JAX array or tracer, not a read-only view), so every
function here can be traced by ``jax.jit`` or captured in a CUDA graph.
"""

from __future__ import annotations

import functools
from typing import Any

import array_api_extra as xpx
from array_api_compat import device, is_writeable_array

from ._namespace import array_namespace

Array = Any  # an array of any Array API namespace (NumPy, CuPy, torch, JAX, array-api-strict)
Pair = tuple[int, int]  # (height, width)

INPUT_GRAD_METHODS = ("dilation", "dilation-zeros", "col2im")
"""The ``input_grad`` choices of `conv2d_backward`; the first is the default."""


def pair(v: int | tuple[int, int] | list[int], name: str = "value") -> tuple[int, int]:
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


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution along one axis."""
    return (size + 2 * padding - kernel) // stride + 1


def to_nhwc(x: Array) -> Array:
    """NCHW -> NHWC as a view (no data moves)."""
    return array_namespace(x).permute_dims(x, (0, 2, 3, 1))


def to_nchw(x: Array) -> Array:
    """NHWC -> NCHW as a view (no data moves)."""
    return array_namespace(x).permute_dims(x, (0, 3, 1, 2))


def im2col(x: Array, kernel: Pair, stride: Pair) -> tuple[Array, Pair]:
    """Patches of an NHWC array (already padded) as a matrix.

    Returns ``col`` of shape ``(N*OH*OW, kh*kw*C)``: row ``(n, y, x)`` holds the window under
    output pixel (y, x), in ``(i, j, c)`` order to line up with `weight_matrix`; and ``(OH, OW)``.
    """
    xp = array_namespace(x)
    n, h, w, c = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    if (sh, sw) == (kh, kw) and c > 1:
        # The windows tile the input (SimpleCNN's 2x2 stride-2 case): splitting each spatial
        # axis into (output pixel, kernel offset) and moving the offsets next to the channels
        # is one copy, 1.4-1.7x faster than the slices below. For one channel the slices win:
        # the copy would move runs of kw values (measured: benchmarks/micro.py --only im2col).
        # copy=True: col never shares memory with x (a 1x1 kernel would make it a view).
        tiles = xp.reshape(x[:, : oh * kh, : ow * kw, :], (n, oh, kh, ow, kw, c))
        col = xp.permute_dims(tiles, (0, 1, 3, 2, 4, 5))  # (N, OH, OW, kh, kw, C)
        return xp.reshape(col, (n * oh * ow, kh * kw * c), copy=True), (oh, ow)
    # One strided slice per kernel offset (i, j): element [n, y, x, c] of slice (i, j) is
    # x[n, s*y + i, s*x + j, c], the input that offset sees from output pixel (y, x).
    slices = [
        x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    col = xp.stack(slices, axis=3)  # (N, OH, OW, kh*kw, C)
    return xp.reshape(col, (n * oh * ow, kh * kw * c)), (oh, ow)


def weight_matrix(weight: Array) -> Array:
    """(O, C, kh, kw) weights as the ``(O, kh*kw*C)`` matrix whose columns match `im2col`."""
    xp = array_namespace(weight)
    o, c, kh, kw = weight.shape
    return xp.reshape(xp.permute_dims(weight, (0, 2, 3, 1)), (o, kh * kw * c))


def matrix_order(weight: Array) -> Array:
    """The same (O, C, kh, kw) weight, stored in memory as the ``(kh*kw*C, O)`` matrix that the
    forward multiplies by (the transpose of `weight_matrix`), C order.

    `Conv2d` keeps its weight this way, for speed only: the forward's ``col @ Wmat.T`` then
    needs no copy of the weight, and OpenBLAS multiplies small matrices about twice as fast
    when the right factor is C-ordered rather than a transposed view (batch 1:
    ``benchmarks/micro.py --only weight_order``). The order survives training where the
    namespace updates in place (NumPy, PyTorch: the optimizer's ``p -= lr * g``).
    """
    o, c, kh, kw = weight.shape
    xp = array_namespace(weight)
    # copy=True: a fresh C-ordered array even where a view would do (one input channel)
    wt = xp.reshape(xp.permute_dims(weight, (2, 3, 1, 0)), (kh * kw * c, o), copy=True)
    return weight_from_matrix(xp.matrix_transpose(wt), (o, c, kh, kw))


def weight_from_matrix(wmat: Array, shape: tuple[int, int, int, int]) -> Array:
    """Inverse of `weight_matrix`: ``(O, kh*kw*C)`` back to (O, C, kh, kw) (a view)."""
    xp = array_namespace(wmat)
    o, c, kh, kw = shape
    return xp.permute_dims(xp.reshape(wmat, (o, kh, kw, c)), (0, 3, 1, 2))


def conv_stride1(x: Array, weight: Array) -> Array:
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


def _writeable(x: Array) -> bool:
    """True if ``x`` may be kept and written in place on a later call: not a JAX array or tracer
    (immutable, and a tracer must not outlive its trace), not a read-only view."""
    return is_writeable_array(x)


def _reusable(out, shape, like):
    """``out`` if it is a writeable array of ``like``'s type, dtype and device and of ``shape``,
    else None (then the caller allocates a new array)."""
    if out is None or type(out) is not type(like) or not _writeable(out):
        return None
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype:
        return None
    return out if device(out) == device(like) else None


def _set(x, where, value):
    """``x`` with ``x[where] = value``: in place where the namespace allows it (NumPy, CuPy,
    torch, array-api-strict), else a new array (JAX). ``xpx.at`` does the same, at several times
    the Python cost of a plain item assignment."""
    if _writeable(x):
        x[where] = value
        return x
    return xpx.at(x)[where].set(value)


def _keep(buffers, key, a):
    """Keep ``a`` in the caller's ``buffers`` for reuse: only if there is a dict and ``a`` is
    writeable (a JAX array or tracer kept across calls would be stale or leaked)."""
    if buffers is not None and _writeable(a):
        buffers[key] = a


def pad_hw(x: Array, padding: Pair, out: Array | None = None) -> Array:
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
    return _set(out, (slice(None), slice(ph, ph + h), slice(pw, pw + w), slice(None)), x)


def conv2d_forward(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: int | Pair = 1,
    padding: int | Pair = 0,
    buffers: dict | None = None,
) -> tuple[Array, Array]:
    """Convolution forward of x (N, C, H, W) with weight (O, C, kh, kw) and bias (O,) or None;
    ``stride`` and ``padding`` are ints or (h, w) pairs. ``buffers``, a dict the caller keeps
    between calls (each layer keeps its own), lets the padded input's array be reused from call
    to call where the namespace writes in place (never for JAX); None means no reuse. Never share
    one dict between convolutions of different padding.

    Returns ``(Z, col)``: Z is (N, O, OH, OW), col the ``(N*OH*OW, kh*kw*C)`` im2col matrix that
    `conv2d_backward` needs for the weight gradient.
    """
    xp = array_namespace(x, weight)
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    o, c, kh, kw = weight.shape
    n = x.shape[0]
    xpad = pad_hw(to_nhwc(x), padding, None if buffers is None else buffers.get("pad"))
    if padding != (0, 0):
        _keep(buffers, "pad", xpad)
    col, (oh, ow) = im2col(xpad, (kh, kw), stride)
    z = col @ xp.matrix_transpose(weight_matrix(weight))  # (N*OH*OW, O)
    if bias is not None:
        z += bias
    return to_nchw(xp.reshape(z, (n, oh, ow, o))), col


def conv2d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    stride: int | Pair = 1,
    padding: int | Pair = 0,
) -> Array:
    """``torch.nn.functional.conv2d`` equivalent (groups=1, dilation=1): NCHW in, NCHW out."""
    return conv2d_forward(x, weight, bias, stride, padding)[0]


def dilate_pad(g: Array, stride: Pair, offset: Pair, size: Pair, out: Array | None = None) -> Array:
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


def rotate_kernel(weight: Array) -> Array:
    """Rotate each kernel by 180 degrees, swap in/out channels: (O, C, kh, kw) -> (C, O, kh, kw)."""
    xp = array_namespace(weight)
    return xp.permute_dims(xp.flip(weight, axis=(2, 3)), (1, 0, 2, 3))


def input_grad_dilation_zeros(
    g: Array, weight: Array, in_size: Pair, stride: Pair, padding: Pair, buffers: dict | None = None
) -> Array:
    """dL/dX (NHWC) from G = dL/dZ (NHWC) by dilation and a stride-1 convolution, literally.

    Why it works, along one axis: ``Z[y] = sum_i Xpad[s*y + i] W[i]``, so input row ``h`` (of the
    unpadded X, i.e. ``Xpad`` row ``h + p``) receives ``G[y] * W[i]`` from every (y, i) with
    ``s*y + i = h + p``. Put G's rows at positions ``s*y`` of a zero array D (the dilation); then
    ``dX[h] = sum_i D[h + p - i] W[i]``. Substituting ``i' = k - 1 - i`` (the 180-degree rotation)
    gives ``dX[h] = sum_i' D[h - (k - 1 - p) + i'] Wrot[i']``: a stride-1 correlation of D padded
    by ``k - 1 - p`` in front with the rotated kernel. Output channel o of the forward pass is an
    input channel of this one, hence the channel swap. Rows of X beyond the last window the stride
    reached get zero gradient: that is the extra "remainder" padding at the end.

    This is the form the documentation teaches and draws (input gradient ``"dilation-zeros"``);
    `input_grad_dilation` computes the same sum without the products with D's zeros.
    ``buffers`` (a dict kept by the caller, or None) lets the dilated array be reused between
    calls where the namespace writes in place.
    """
    kh, kw = weight.shape[2:]
    (h, w), (ph, pw) = in_size, padding
    offset, size = (kh - 1 - ph, kw - 1 - pw), (h + kh - 1, w + kw - 1)
    d = dilate_pad(g, stride, offset, size, None if buffers is None else buffers.get("dilated"))
    _keep(buffers, "dilated", d)
    return conv_stride1(d, rotate_kernel(weight))


@functools.lru_cache(maxsize=256)  # ints in, tuples of ints out: nothing array-valued is kept
def dilation_phases(
    size: int, kernel: int, stride: int, padding: int, out_size: int
) -> tuple[tuple[tuple[int, int, tuple[Pair, ...]], ...], Pair]:
    """The phases of the input gradient along one axis, and the zero rows G needs around it.

    Input row ``h`` (padded row ``t = h + p``) receives ``G[y] W[i]`` for ``s*y + i = t``, so only
    taps ``i`` with ``i = t (mod s)`` reach it: writing ``t = s*q + r`` and ``i = r + s*m``,
    ``dX[h] = sum_m G[q - m] W[r + s*m]``. The rows ``h = rho, rho + s, rho + 2s, ...`` of one
    residue ``rho`` (one phase) share ``r = (rho + p) % s`` and ``q = (rho + p) // s + j`` for
    their j-th row: each phase is a stride-1 correlation of G with the phase's taps in reverse.

    Returns ``(phases, (front, back))``: one ``(rho, rows, taps)`` per residue that has input rows,
    where the first ``rows`` rows of the phase can receive gradient (the rest, past the last
    window, get zero) and ``taps`` lists ``(i, start)``: tap ``i`` multiplies rows
    ``start .. start + rows - 1`` of G padded by ``front`` zero rows before and ``back`` after
    (padding needed only by phases of several taps). ``taps`` is empty, and ``rows`` 0, for a
    phase no tap reaches (stride larger than the kernel).
    """
    phases = []
    for rho in range(min(stride, size)):
        r, q0 = (rho + padding) % stride, (rho + padding) // stride
        taps = range(r, kernel, stride)  # i = r + s*m for m = 0, 1, ...
        rows = min(len(range(rho, size, stride)), out_size + len(taps) - 1 - q0) if taps else 0
        rows = max(rows, 0)
        phases.append((rho, rows, [(i, q0 - m) for m, i in enumerate(taps)] if rows else []))
    front = max([0] + [-a for _, _, taps in phases for _, a in taps])
    back = max([0] + [a + rows - out_size for _, rows, taps in phases for _, a in taps])
    phases = tuple(
        (rho, rows, tuple((i, a + front) for i, a in taps)) for rho, rows, taps in phases
    )
    return phases, (front, back)


def input_grad_dilation(
    g: Array, weight: Array, in_size: Pair, stride: Pair, padding: Pair
) -> Array:
    """dL/dX (NHWC) from G = dL/dZ (NHWC): the dilation's stride-1 convolution, phase by phase.

    The convolution of `input_grad_dilation_zeros` multiplies every kernel tap with D, mostly
    zeros, but at a given input row only the taps of one residue mod the stride ever meet G's
    values (`dilation_phases`). So for each of the ``s_h*s_w`` phases (input rows and columns of
    one residue mod the stride) this runs a stride-1 correlation of G itself with the phase's
    sub-kernel, ``W[:, :, r_h::s_h, r_w::s_w]`` (at most ``ceil(k/s)`` taps per axis; tap m's
    window starts m rows earlier in G, which is the rotation), and writes the result into every
    s-th row and column of dX from the phase's residue on. It is the dilation's sum term for term
    without the products with inserted zeros; G is padded only where a phase of several taps
    reaches past its edges, and input rows no tap reaches (past the last window, or in a phase
    without taps when the stride exceeds the kernel) are set to zero.

    The taps' products are ``(N*OH*OW, O) @ (O, taps*C)`` matrix products: one per phase, or,
    when every phase has at most one tap, one for all taps. With SimpleCNN's 2x2 stride-2 kernels
    dX is ``G @ [W_00 W_01 W_10 W_11]`` (the taps as (O, C) blocks side by side) with its four
    column blocks written interleaved into a dX of exactly its size, and nothing else. Where the
    phases tile dX with nothing to crop (kernel = stride, no padding, no remainder), one
    permutation interleaves them instead of ``s_h*s_w`` strided writes: fewer operations for a
    GPU to dispatch. Elsewhere the strided writes keep dX exactly its size, where a permuted
    copy would be a larger array seen through a cropped view.
    """
    xp = array_namespace(g, weight)
    n, oh, ow, o = g.shape
    _, c, kh, kw = weight.shape
    (h, w), (sh, sw), (ph, pw) = in_size, stride, padding
    if (kh, kw) == (sh, sw) and (h, w) == (sh * oh, sw * ow) and (ph, pw) == (0, 0):
        # One tap per phase, and the phases tile dX exactly: row s*y + i is G[y] @ W[i]. The
        # product's (kh, kw) tap blocks are the phases, and interleaving them is the very
        # permutation col2im does for windows that do not overlap.
        return input_grad_col2im(g, weight, in_size, stride, padding)
    rows_h, (fh, bh) = dilation_phases(h, kh, sh, ph, oh)
    rows_w, (fw, bw) = dilation_phases(w, kw, sw, pw, ow)
    if fh or bh or fw or bw:
        g = xpx.pad(g, ((0, 0), (fh, bh), (fw, bw), (0, 0)))
    g2d = xp.reshape(g, (-1, o))
    ohp, owp = oh + fh + bh, ow + fw + bw
    dx = xp.empty((n, h, w, c), dtype=g.dtype, device=device(g))
    every = slice(None)
    for rho, rows, _ in rows_h:  # rows past the last window or in a phase without taps: zero
        if rows < len(range(rho, h, sh)):
            dx = _set(dx, (every, slice(rho + sh * rows, None, sh), every, every), 0.0)
    for rho, cols, _ in rows_w:
        if cols < len(range(rho, w, sw)):
            dx = _set(dx, (every, every, slice(rho + sw * cols, None, sw), every), 0.0)
    if kh <= sh and kw <= sw:  # at most one tap per phase: all taps in one product
        products = xp.reshape(g2d @ weight_matrix(weight), (n, ohp, owp, kh, kw, c))
    for rho_h, rows, taps_h in rows_h:
        for rho_w, cols, taps_w in rows_w:
            if not (taps_h and taps_w):
                continue
            r_h, r_w = taps_h[0][0], taps_w[0][0]  # the phase's first taps: r = (rho + p) % s
            if kh <= sh and kw <= sw:
                taps = products[:, :, :, r_h : r_h + 1, r_w : r_w + 1, :]
            else:  # the phase's taps W[:, :, r_h + s_h*m_h, r_w + s_w*m_w] in one product
                sub = weight_matrix(weight[:, :, r_h::sh, r_w::sw])
                taps = xp.reshape(g2d @ sub, (n, ohp, owp, len(taps_h), len(taps_w), c))
            phase, fresh = None, False  # fresh: phase is our own array, safe to add into
            for m_h, (_, a) in enumerate(taps_h):
                for m_w, (_, b) in enumerate(taps_w):
                    window = taps[:, a : a + rows, b : b + cols, m_h, m_w, :]
                    if phase is None:
                        phase = window
                    elif fresh:
                        phase += window
                    else:
                        phase, fresh = phase + window, True
            rows_of_phase = slice(rho_h, rho_h + sh * (rows - 1) + 1, sh)
            cols_of_phase = slice(rho_w, rho_w + sw * (cols - 1) + 1, sw)
            dx = _set(dx, (every, rows_of_phase, cols_of_phase, every), phase)
    return dx


def col2im(cols: Array, size: Pair, stride: Pair) -> Array:
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


def input_grad_col2im(g: Array, weight: Array, in_size: Pair, stride: Pair, padding: Pair) -> Array:
    """dL/dX (NHWC) from G (NHWC) as ``G @ Wmat`` followed by `col2im`.

    Same result as the dilation, without multiplying the inserted zeros: the same products as
    `input_grad_dilation`, summed by scattering windows instead of phase by phase.
    """
    xp = array_namespace(g, weight)
    n, oh, ow, o = g.shape
    _, c, kh, kw = weight.shape
    (h, w), (ph, pw) = in_size, padding
    dcol = xp.reshape(g, (n * oh * ow, o)) @ weight_matrix(weight)
    dx = col2im(xp.reshape(dcol, (n, oh, ow, kh, kw, c)), (h + 2 * ph, w + 2 * pw), stride)
    return dx[:, ph : ph + h, pw : pw + w, :]


def conv2d_backward(
    g: Array,
    col: Array,
    x_shape: tuple[int, ...],
    weight: Array,
    stride: int | Pair = 1,
    padding: int | Pair = 0,
    *,
    input_grad: str = "dilation",
    need_input_grad: bool = True,
    buffers: dict | None = None,
) -> tuple[Array | None, Array, Array]:
    """Gradients of a convolution. ``g`` is dL/dZ (NCHW), ``col`` what the forward returned,
    ``x_shape`` the forward input's (N, C, H, W); ``buffers`` as in `conv2d_forward`. Raises
    ValueError for an unknown ``input_grad``.

    Returns ``(dx, dw, db)``: dx NCHW (None when ``need_input_grad`` is false, e.g. for the
    first layer, whose input is data), dw like ``weight``, db of shape ``(O,)``.
    """
    xp = array_namespace(g, weight)
    stride, padding = pair(stride, "stride"), pair(padding, "padding")
    n, o, oh, ow = g.shape
    g2d = xp.reshape(to_nhwc(g), (n * oh * ow, o))  # a copy only if g is not NHWC in memory
    g_nhwc = xp.reshape(g2d, (n, oh, ow, o))  # so that later reshapes of it are free
    dw = weight_from_matrix(xp.matrix_transpose(g2d) @ col, weight.shape)
    db = xp.sum(g2d, axis=0)
    if not need_input_grad:
        return None, dw, db
    in_size = tuple(x_shape[2:])
    if input_grad == "dilation":
        dx = input_grad_dilation(g_nhwc, weight, in_size, stride, padding)
    elif input_grad == "dilation-zeros":
        dx = input_grad_dilation_zeros(g_nhwc, weight, in_size, stride, padding, buffers)
    elif input_grad == "col2im":
        dx = input_grad_col2im(g_nhwc, weight, in_size, stride, padding)
    else:
        raise ValueError(f"input_grad must be one of {INPUT_GRAD_METHODS}, got {input_grad!r}")
    return to_nchw(dx), dw, db
