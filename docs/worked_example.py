"""The worked example of docs/how-it-works.md, computed by xpcnn and checked independently.

    python docs/worked_example.py          # print every array the page shows, run the checks
    python docs/worked_example.py --check  # also: the page's copies match, and every
                                           # `xpcnn.<module>.<name>` the docs mention exists

The example is SimpleCNN's first layer in miniature: one 5x5 image, one channel in and out, a
2x2 kernel, stride 2, padding 0. A second, one-axis example (a 1x5 image, a 1x3 kernel, stride 2,
padding 1) shows the input gradient computed phase by phase, where a phase meets two taps. All
values are small integers, so every number can be checked by hand. The checks compare xpcnn's
gradients with an explicit loop written here (sharing no code with xpcnn) and, when PyTorch is
installed, with torch autograd.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import sys

import numpy as np

from xpcnn import conv, functional

DOCS = pathlib.Path(__file__).resolve().parent
PAGE = DOCS / "how-it-works.md"

STRIDE, PADDING = (2, 2), (0, 0)
X = np.arange(1.0, 26.0).reshape(1, 1, 5, 5)  # (N, C, H, W) = (1, 1, 5, 5), values 1..25
W = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)  # (O, C, kh, kw)
G = np.array([[1.0, 10.0], [100.0, 1000.0]]).reshape(1, 1, 2, 2)  # dL/dZ, (N, O, OH, OW)

# The phase example, along the width only: (N, C, H, W) = (1, 1, 1, 5), kernel 1x3.
STRIDE1, PADDING1 = (1, 2), (0, 1)
X1 = np.arange(1.0, 6.0).reshape(1, 1, 1, 5)
W1 = np.array([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
G1 = np.array([1.0, 10.0, 100.0]).reshape(1, 1, 1, 3)  # OW = (5 + 2 - 3) // 2 + 1 = 3

LOGITS = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # (N, K) = (2, 3)
LABELS = np.array([0, 2])


def compute():
    """Every array of the worked example, as float64 NumPy arrays, from xpcnn's functions."""
    kh, kw = W.shape[2:]
    h, w = X.shape[2:]
    z, col = conv.conv2d_forward(X, W, None, STRIDE, PADDING)
    dx, dw, db = conv.conv2d_backward(G, col, X.shape, W, STRIDE, PADDING)
    # The two ingredients of the input gradient, from the helpers conv2d_backward uses.
    offset = (kh - 1 - PADDING[0], kw - 1 - PADDING[1])
    d = conv.dilate_pad(conv.to_nhwc(G), STRIDE, offset, (h + kh - 1, w + kw - 1))
    d = conv.to_nchw(d)
    w_rot = conv.rotate_kernel(W)
    loss, dlogits = functional.cross_entropy(LOGITS, LABELS)
    # The phase example: dX by the default (phase) method, and the two phases' rows of it.
    _, col1 = conv.conv2d_forward(X1, W1, None, STRIDE1, PADDING1)
    dx1, _, _ = conv.conv2d_backward(G1, col1, X1.shape, W1, STRIDE1, PADDING1)
    return {
        "X": X,
        "W": W,
        "col": col,
        "Z": z,
        "G": G,
        "dW": dw,
        "db": db,
        "D": d,
        "W_rot": w_rot,
        "dX": dx,
        "dX_by_conv": conv.conv2d(d, w_rot),  # the stride-1 convolution, done by xpcnn itself
        "G1": G1[0, 0, 0],
        "W1": W1[0, 0, 0],
        "dX1": dx1[0, 0, 0],
        "phase0": dx1[0, 0, 0, 0::2],  # input columns 0, 2, 4
        "phase1": dx1[0, 0, 0, 1::2],  # input columns 1, 3
        "phases1": conv.dilation_phases(5, 3, 2, 1, 3),
        "softmax": np.exp(functional.log_softmax(LOGITS)),
        "loss": loss,
        "dlogits": dlogits,
    }


def loop_gradients(x, w, g, stride, padding):
    """dL/dX and dL/dW by the definition: output pixel (y, x) saw window (s*y.., s*x..) of the
    padded input, so it sends g[y, x] * W back to that window and g[y, x] * window to dW."""
    (sh, sw), (ph, pw) = stride, padding
    xpad = np.pad(x[0, 0], ((ph, ph), (pw, pw)))
    k = w[0, 0]
    kh, kw = k.shape
    dxpad, dw = np.zeros_like(xpad), np.zeros_like(k)
    for y in range(g.shape[2]):
        for xx in range(g.shape[3]):
            window = (slice(sh * y, sh * y + kh), slice(sw * xx, sw * xx + kw))
            dxpad[window] += g[0, 0, y, xx] * k
            dw += g[0, 0, y, xx] * xpad[window]
    h, wd = x.shape[2:]
    return dxpad[ph : ph + h, pw : pw + wd], dw


def verify(r):
    """Check the example three ways; raise AssertionError on any mismatch."""
    rdx, rdw = loop_gradients(X, W, G, STRIDE, PADDING)
    np.testing.assert_array_equal(r["dX"][0, 0], rdx, "dX differs from the loop")
    np.testing.assert_array_equal(r["dW"][0, 0], rdw, "dW differs from the loop")
    np.testing.assert_array_equal(r["db"], [G.sum()], "db differs from sum(G)")
    np.testing.assert_array_equal(r["dX_by_conv"], r["dX"], "conv(D, W_rot) differs from dX")
    _, col = conv.conv2d_forward(X, W, None, STRIDE, PADDING)
    for method in conv.INPUT_GRAD_METHODS:
        dx, _, _ = conv.conv2d_backward(G, col, X.shape, W, STRIDE, PADDING, input_grad=method)
        np.testing.assert_array_equal(dx, r["dX"], f"input_grad={method!r} differs")
    # The phase example: the loop, every method, and the page's description of the two phases.
    rdx1, _ = loop_gradients(X1, W1, G1, STRIDE1, PADDING1)
    np.testing.assert_array_equal(r["dX1"], rdx1[0], "phase example: dX differs from the loop")
    _, col1 = conv.conv2d_forward(X1, W1, None, STRIDE1, PADDING1)
    for method in conv.INPUT_GRAD_METHODS:
        dx1, _, _ = conv.conv2d_backward(
            G1, col1, X1.shape, W1, STRIDE1, PADDING1, input_grad=method
        )
        np.testing.assert_array_equal(dx1[0, 0, 0], r["dX1"], f"phase example: {method!r}")
    g1, w1 = r["G1"], r["W1"]
    np.testing.assert_array_equal(r["phase0"], g1 * w1[1], "phase 0 is not G * W[1]")
    by_hand = np.correlate(g1, np.array([w1[2], w1[0]]), mode="valid")
    np.testing.assert_array_equal(r["phase1"], by_hand, "phase 1 is not G corr (W[2], W[0])")
    assert r["phases1"] == (((0, 3, ((1, 0),)), (1, 2, ((0, 1), (2, 0)))), (0, 0))
    # The page's hand-built description of D: G's values at rows/cols 1 and 3, zeros elsewhere.
    d = np.zeros((6, 6))
    d[1:4:2, 1:4:2] = G[0, 0]
    np.testing.assert_array_equal(r["D"][0, 0], d, "D is not the dilated, padded G")
    np.testing.assert_array_equal(r["W_rot"][0, 0], W[0, 0, ::-1, ::-1], "W_rot")
    p = np.exp(LOGITS - LOGITS.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[LABELS]
    np.testing.assert_allclose(r["dlogits"], (p - onehot) / 2, rtol=1e-12)
    np.testing.assert_allclose(r["loss"], -np.log(p[[0, 1], LABELS]).mean(), rtol=1e-12)
    checks = ["explicit loop", "conv2d(D, W_rot)", "all input-gradient methods", "the phases"]
    checks.append("NumPy softmax")
    try:
        import torch
    except ImportError:
        return checks
    tx, tw = (torch.tensor(a, requires_grad=True) for a in (X, W))
    tz = torch.nn.functional.conv2d(tx, tw, stride=STRIDE, padding=PADDING)
    tz.backward(torch.tensor(G))
    np.testing.assert_array_equal(r["Z"], tz.detach().numpy(), "Z differs from torch")
    np.testing.assert_array_equal(r["dX"], tx.grad.numpy(), "dX differs from torch autograd")
    np.testing.assert_array_equal(r["dW"], tw.grad.numpy(), "dW differs from torch autograd")
    tl = torch.tensor(LOGITS, requires_grad=True)
    torch.nn.functional.cross_entropy(tl, torch.tensor(LABELS)).backward()
    np.testing.assert_allclose(r["dlogits"], tl.grad.numpy(), rtol=1e-12)
    return checks + [f"torch {torch.__version__} autograd"]


def fmt(a):
    """Integers without a decimal point, other values with 4 decimals; 2-D, as NumPy prints."""
    a = np.asarray(a)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if np.all(a == np.round(a)):
        return np.array2string(a.astype(np.int64))
    return np.array2string(a, precision=4, floatmode="fixed", suppress_small=True)


BLOCKS = [  # (key, caption) in the order the page shows them
    ("X", "X, the input (5x5)"),
    ("W", "W, the kernel (2x2)"),
    ("col", "col = im2col(X): one row per output pixel, one column per kernel offset"),
    ("Z", "Z = col @ W.reshape(1, 4).T, reshaped to 2x2"),
    ("G", "G = dL/dZ (2x2), chosen so that each output pixel is easy to follow"),
    ("dW", "dW = G.reshape(1, 4) @ col, reshaped to 2x2"),
    ("db", "db = G.sum()"),
    ("D", "D: G dilated (1 zero between elements), padded by k-1-p = 1, plus 1 remainder row"),
    ("W_rot", "W_rot: W rotated 180 degrees"),
    ("dX", "dX = stride-1 convolution of D with W_rot (5x5)"),
    ("G1", "G, one row (the phase example)"),
    ("W1", "W, one row of 3 taps"),
    ("dX1", "dX (1x5), stride 2, padding 1"),
    ("phase0", "phase 0: input columns 0, 2, 4, tap 1 only: G * W[1]"),
    ("phase1", "phase 1: input columns 1, 3, taps 0 and 2: G correlated with (W[2], W[0])"),
    ("softmax", "softmax(logits), logits = [[2, 1, 0], [0, 0, 0]], labels = [0, 2]"),
    ("loss", "loss = mean of -log softmax[n, label_n]"),
    ("dlogits", "dL/dlogits = (softmax - onehot) / N"),
]


def report(r):
    return "\n\n".join(f"{caption}:\n{fmt(r[key])}" for key, caption in BLOCKS)


def check_page(r):
    """Every printed array appears verbatim on the page; every xpcnn name the docs use exists."""
    problems = []
    page = PAGE.read_text()
    for key, _ in BLOCKS:
        if fmt(r[key]) not in page:
            problems.append(f"{PAGE.name}: the block for {key} differs from:\n{fmt(r[key])}")
    modules = (
        "conv|functional|nn|optim|trainer|datasets|checkpoint|backends|plots|pool|layers|models"
        "|random|augment|interop|reference|compare|step|kernels"
    )
    pattern = re.compile(rf"xpcnn\.({modules})\.(\w+)")
    for md in sorted(DOCS.rglob("*.md")):
        for module, name in set(pattern.findall(md.read_text())):
            if not hasattr(importlib.import_module(f"xpcnn.{module}"), name):
                problems.append(f"{md.relative_to(DOCS)}: xpcnn.{module}.{name} does not exist")
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="also check the docs pages")
    args = parser.parse_args()
    r = compute()
    print(report(r))
    print("\nverified against: " + ", ".join(verify(r)))
    if args.check:
        problems = check_page(r)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            return 1
        print("docs pages agree with xpcnn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
