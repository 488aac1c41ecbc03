"""Independent reference implementations for the tests: explicit loops over output pixels, NCHW,
float64 NumPy. Written from the definitions, sharing no code with xpcnn."""

import numpy as np


def _pad(x, p):
    return np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])))


def conv2d(x, w, b, stride, padding):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    xp = _pad(x, padding)
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    z = np.zeros((n, o, oh, ow))
    for y in range(oh):
        for xx in range(ow):
            patch = xp[:, :, y * sh : y * sh + kh, xx * sw : xx * sw + kw]  # (N, C, kh, kw)
            z[:, :, y, xx] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3]))
    if b is not None:
        z += b[None, :, None, None]
    return z


def conv2d_backward(g, x, w, stride, padding):
    """Loop gradients: every output pixel sends g * W back to the window it saw."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    xp = _pad(x, padding)
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for y in range(g.shape[2]):
        for xx in range(g.shape[3]):
            rows, cols = slice(y * sh, y * sh + kh), slice(xx * sw, xx * sw + kw)
            gy = g[:, :, y, xx]  # (N, O)
            dxp[:, :, rows, cols] += np.tensordot(gy, w, axes=([1], [0]))
            dw += np.tensordot(gy, xp[:, :, rows, cols], axes=([0], [0]))
    dx = dxp[:, :, ph : ph + h, pw : pw + wd]
    return dx, dw, g.sum(axis=(0, 2, 3))


def cross_entropy(z, labels):
    z = np.asarray(z, dtype=np.float64)
    loss, grad = 0.0, np.zeros_like(z)
    for i, t in enumerate(labels):
        e = np.exp(z[i] - z[i].max())
        p = e / e.sum()
        loss -= np.log(p[t])
        grad[i] = p
        grad[i, t] -= 1.0
    return loss / len(labels), grad / len(labels)
