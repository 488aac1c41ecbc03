"""A deliberately naive reference for `SimpleCNN`: explicit loops, plain NumPy, float64.

This is the seed notebook's "slow" implementation done correctly, kept for two reasons: it is the
easiest place to read what the network computes and how each gradient follows from the chain
rule, and it is the independent third party when xpcnn is compared with PyTorch
(``xpcnn compare``). It shares no code with `xpcnn.conv` or `xpcnn.functional`.

Every convolution loops over output pixels and kernel offsets; only the batch and channel axes
are vectorised (one small matrix product per pixel and offset). Parameters are a mapping with
PyTorch's names and layouts (``conv1.weight`` is ``(out, in, kh, kw)``, ``fc1.weight`` is
``(out, in)``), as `SimpleCNN.state_dict` and ``torch.nn.Module.state_dict`` give them.

    logits = reference.forward(model.state_dict(), images)             # (N, 10)
    loss, grads = reference.loss_and_grads(model.state_dict(), images, labels)
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONVS", "FCS", "PARAM_NAMES", "forward", "loss_and_grads"]

#: (name, stride, padding) of the three convolutions, as in the seed's torch model.
CONVS = (("conv1", 2, 0), ("conv2", 2, 1), ("conv3", 2, 0))
#: The two fully connected layers; a ReLU sits between them.
FCS = ("fc1", "fc2")
PARAM_NAMES = tuple(f"{layer}.{p}" for layer, *_ in CONVS for p in ("weight", "bias")) + tuple(
    f"{layer}.{p}" for layer in FCS for p in ("weight", "bias")
)


def _params(state_dict):
    """The ten parameters as float64 NumPy arrays (anything ``np.asarray`` reads is accepted)."""
    missing = [k for k in PARAM_NAMES if k not in state_dict]
    if missing:
        raise ValueError(f"reference: state dict lacks {missing} (expected {list(PARAM_NAMES)})")
    return {k: np.asarray(state_dict[k], dtype=np.float64) for k in PARAM_NAMES}


def _pad(x, p):
    """Zero-pad the two spatial axes of an (N, C, H, W) array by ``p`` on every side."""
    return np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))


# --- the layers, forward --------------------------------------------------------------------------


def conv2d(x, weight, bias, stride, padding):
    """Cross-correlation, NCHW: ``z[n, o, y, x] = b[o] + sum_{c,i,j} xpad[n, c, s*y+i, s*x+j]
    * w[o, c, i, j]``, one output pixel and one kernel offset at a time."""
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh = (h + 2 * padding - kh) // stride + 1
    ow = (w + 2 * padding - kw) // stride + 1
    xpad = _pad(x, padding)
    z = np.zeros((n, o, oh, ow))
    for y in range(oh):
        for xx in range(ow):
            for i in range(kh):
                for j in range(kw):
                    pixel = xpad[:, :, stride * y + i, stride * xx + j]  # (N, C)
                    z[:, :, y, xx] += pixel @ weight[:, :, i, j].T  # (N, C) @ (C, O)
            z[:, :, y, xx] += bias
    return z


def relu(x):
    """``max(x, 0)`` elementwise."""
    return np.maximum(x, 0.0)


def linear(x, weight, bias):
    """``x @ W.T + b`` with W of shape (out, in)."""
    return x @ weight.T + bias


def log_softmax(z):
    """``z - log(sum(exp(z)))`` per row, computed as log-sum-exp around the row maximum."""
    m = z.max(axis=1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))


def cross_entropy(logits, labels):
    """Mean negative log-likelihood of the labels and its gradient ``(softmax - one_hot) / N``."""
    n = logits.shape[0]
    logp = log_softmax(logits)
    rows = np.arange(n)
    loss = -logp[rows, labels].mean()
    grad = np.exp(logp)
    grad[rows, labels] -= 1.0
    return float(loss), grad / n


# --- the layers, backward -------------------------------------------------------------------------


def conv2d_backward(g, x, weight, stride, padding):
    """Gradients of `conv2d` from ``g = dL/dz``: ``(dx, dw, db)``.

    Output pixel (y, x) saw input ``xpad[:, :, s*y+i, s*x+j]`` through ``w[:, :, i, j]``, so it
    sends ``g[:, :, y, x] @ w[:, :, i, j]`` back to that input pixel and adds
    ``g[:, :, y, x].T @ xpad[:, :, s*y+i, s*x+j]`` to that weight. The padding's share of the
    input gradient is cut off at the end.
    """
    _, _, h, w = x.shape
    _, _, kh, kw = weight.shape
    xpad = _pad(x, padding)
    dxpad = np.zeros_like(xpad)
    dw = np.zeros_like(weight)
    for y in range(g.shape[2]):
        for xx in range(g.shape[3]):
            gy = g[:, :, y, xx]  # (N, O)
            for i in range(kh):
                for j in range(kw):
                    r, c = stride * y + i, stride * xx + j
                    dxpad[:, :, r, c] += gy @ weight[:, :, i, j]  # (N, O) @ (O, C)
                    dw[:, :, i, j] += gy.T @ xpad[:, :, r, c]  # (O, N) @ (N, C)
    db = g.sum(axis=(0, 2, 3))
    dx = dxpad[:, :, padding : padding + h, padding : padding + w]
    return dx, dw, db


def relu_backward(g, y):
    """dL/dx of ReLU from its output ``y``: the gradient passes where the output is positive."""
    return g * (y > 0)


def linear_backward(g, x, weight):
    """``dx = g @ W``, ``dW = g.T @ x``, ``db = sum over the batch of g``."""
    return g @ weight, g.T @ x, g.sum(axis=0)


# --- the network ----------------------------------------------------------------------------------


def _run(p, x):
    """Forward pass keeping every activation: ``acts[k]`` is the input of layer k."""
    acts = {}
    a = np.asarray(x, dtype=np.float64)
    for name, stride, padding in CONVS:
        acts[name] = a
        a = relu(conv2d(a, p[f"{name}.weight"], p[f"{name}.bias"], stride, padding))
    acts["flatten"] = a  # (N, 128, 4, 4), a ReLU output
    a = a.reshape(a.shape[0], -1)  # C-H-W order, as torch.nn.Flatten
    acts["fc1"] = a
    a = relu(linear(a, p["fc1.weight"], p["fc1.bias"]))
    acts["fc2"] = a
    return linear(a, p["fc2.weight"], p["fc2.bias"]), acts


def forward(state_dict, x):
    """Logits (N, num_classes), float64, of images ``x`` (N, 1, 28, 28)."""
    return _run(_params(state_dict), x)[0]


def loss_and_grads(state_dict, x, labels):
    """One training step's mean cross-entropy and the gradient of every parameter.

    Returns ``(loss, {name: gradient})`` with PyTorch's names and layouts, all float64.
    """
    p = _params(state_dict)
    labels = np.asarray(labels, dtype=np.int64)
    logits, acts = _run(p, x)
    loss, g = cross_entropy(logits, labels)
    grads = {}

    # fc2, then back through the ReLU after fc1 (its output is fc2's input)
    g, grads["fc2.weight"], grads["fc2.bias"] = linear_backward(g, acts["fc2"], p["fc2.weight"])
    g = relu_backward(g, acts["fc2"])
    g, grads["fc1.weight"], grads["fc1.bias"] = linear_backward(g, acts["fc1"], p["fc1.weight"])
    g = g.reshape(acts["flatten"].shape)

    # the convolutions in reverse; each conv's output went through a ReLU, and the next layer's
    # input is that ReLU's output
    outputs = {"conv1": acts["conv2"], "conv2": acts["conv3"], "conv3": acts["flatten"]}
    for name, stride, padding in reversed(CONVS):
        g = relu_backward(g, outputs[name])
        g, grads[f"{name}.weight"], grads[f"{name}.bias"] = conv2d_backward(
            g, acts[name], p[f"{name}.weight"], stride, padding
        )
    return loss, {k: grads[k] for k in PARAM_NAMES}
