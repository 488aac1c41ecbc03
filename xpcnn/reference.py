"""A deliberately naive reference for xpcnn's networks: explicit loops, plain NumPy, float64.

This is the seed notebook's "slow" implementation done correctly, kept for two reasons: it is the
easiest place to read what a network computes and how each gradient follows from the chain
rule, and it is the independent third party when xpcnn is compared with PyTorch
(``xpcnn compare``). It shares no code with `xpcnn.conv`, `xpcnn.pool` or `xpcnn.functional`
and imports nothing from xpcnn: the network's layout is read from its *config*, the JSON-able
description ``Sequential.config(model)`` gives (a list of layers, each a type and its
constructor arguments), so every zoo model and any Sequential of supported layers runs here.

Convolutions and pooling loop over output pixels and kernel offsets (or windows); only the batch
and channel axes are vectorised. Batch norm loops over channels. Parameters are a mapping with
PyTorch's names and layouts (``conv1.weight`` is ``(out, in, kh, kw)``, ``fc1.weight`` is
``(out, in)``), as ``state_dict()`` gives them in xpcnn and in ``torch.nn``.

    layers = nn.Sequential.config(model)                                # the layout
    logits = reference.forward(model.state_dict(), images, layers)      # (N, classes)
    loss, grads = reference.loss_and_grads(model.state_dict(), images, labels, layers)

``train=True`` (the default of `loss_and_grads`) normalises with the batch's statistics, as a
network in training mode does; `forward` defaults to eval mode (running statistics). Dropout
is the identity in both: its random mask would make every comparison meaningless, so a
comparison switches dropout off in the other implementations (``xpcnn compare`` does).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["LAYER_TYPES", "forward", "layer_list", "loss_and_grads", "parameter_names"]

#: Layer types the reference implements (xpcnn class names, the ``type`` of a layer config).
LAYER_TYPES = (
    "AdaptiveAvgPool2d",
    "AvgPool2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "Conv2d",
    "Dropout",
    "ELU",
    "Flatten",
    "GELU",
    "LeakyReLU",
    "Linear",
    "MaxPool2d",
    "ReLU",
    "Sigmoid",
    "Tanh",
)


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int | np.integer) else (int(v[0]), int(v[1]))


def layer_list(config, prefix=""):
    """``[(name, type, args), ...]`` in order from a Sequential config (``{"type":
    "Sequential", "layers": [...]}``) or its list of layers; nested Sequentials are flattened
    with dotted names (``block.conv``). Raises ValueError for a type the reference lacks."""
    layers = config.get("layers") if isinstance(config, dict) else config
    if not isinstance(layers, list):
        raise ValueError(
            f"reference: expected a Sequential config (a list of layers), got {config!r:.120}; "
            "pass nn.Sequential.config(model)"
        )
    out = []
    for i, spec in enumerate(layers):
        name = prefix + str(spec.get("name", i))
        kind = spec.get("type")
        args = {k: v for k, v in spec.items() if k not in ("type", "name")}
        if kind == "Sequential":
            out += layer_list(spec, name + ".")
        elif kind in LAYER_TYPES:
            out.append((name, kind, args))
        else:
            raise ValueError(f"reference: layer {name!r} of type {kind!r} is not implemented")
    return out


def _has_params(kind, args):
    if kind in ("Conv2d", "Linear"):
        return ("weight", "bias") if args.get("bias", True) else ("weight",)
    if kind.startswith("BatchNorm"):
        return ("weight", "bias") if args.get("affine", True) else ()
    return ()


def parameter_names(config) -> list[str]:
    """The trainable parameters of the network, in PyTorch's order."""
    return [
        f"{name}.{p}" for name, kind, args in layer_list(config) for p in _has_params(kind, args)
    ]


def _params(state_dict, config):
    """The parameters (and batch-norm running statistics) as float64 NumPy arrays."""
    names = parameter_names(config)
    for name, kind, args in layer_list(config):
        if kind.startswith("BatchNorm") and args.get("track_running_stats", True):
            names += [f"{name}.running_mean", f"{name}.running_var"]
    missing = [k for k in names if k not in state_dict]
    if missing:
        raise ValueError(f"reference: state dict lacks {missing} (expected {names})")
    return {k: np.asarray(state_dict[k], dtype=np.float64) for k in names}


def _pad(x, p, value=0.0):
    """Pad the two spatial axes of an (N, C, H, W) array by ``p = (ph, pw)``."""
    return np.pad(x, ((0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])), constant_values=value)


def _out(size, k, s, p):
    return (size + 2 * p - k) // s + 1


# --- the layers, forward --------------------------------------------------------------------------


def conv2d(x, weight, bias, stride, padding):
    """Cross-correlation, NCHW: ``z[n, o, y, x] = b[o] + sum_{c,i,j} xpad[n, c, sh*y+i, sw*x+j]
    * w[o, c, i, j]``, one output pixel and one kernel offset at a time."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh, ow = _out(h, kh, sh, ph), _out(w, kw, sw, pw)
    xpad = _pad(x, (ph, pw))
    z = np.zeros((n, o, oh, ow))
    for y in range(oh):
        for xx in range(ow):
            for i in range(kh):
                for j in range(kw):
                    pixel = xpad[:, :, sh * y + i, sw * xx + j]  # (N, C)
                    z[:, :, y, xx] += pixel @ weight[:, :, i, j].T  # (N, C) @ (C, O)
            if bias is not None:
                z[:, :, y, xx] += bias
    return z


def relu(x):
    """``max(x, 0)`` elementwise."""
    return np.maximum(x, 0.0)


def linear(x, weight, bias):
    """``x @ W.T + b`` with W of shape (out, in)."""
    return x @ weight.T + (0.0 if bias is None else bias)


def _windows(shape, kernel, stride, padding):
    """(y, x, rows, cols) of every pooling window, in padded coordinates."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    oh, ow = _out(shape[2], kh, sh, ph), _out(shape[3], kw, sw, pw)
    for y in range(oh):
        for xx in range(ow):
            yield y, xx, slice(sh * y, sh * y + kh), slice(sw * xx, sw * xx + kw)


def _pool_sizes(args):
    kernel = _pair(args["kernel_size"])
    stride = kernel if args.get("stride") is None else _pair(args["stride"])
    return kernel, stride, _pair(args.get("padding", 0))


def max_pool2d(x, args):
    """Each window's maximum; also the flat position in the window of the first maximum
    (row-major), which the gradient goes to. Padding never wins (-inf)."""
    kernel, stride, padding = _pool_sizes(args)
    xpad = _pad(x, padding, -np.inf)
    n, c = x.shape[:2]
    oh, ow = (
        _out(x.shape[2], kernel[0], stride[0], padding[0]),
        _out(x.shape[3], kernel[1], stride[1], padding[1]),
    )
    y_out, where = np.zeros((n, c, oh, ow)), np.zeros((n, c, oh, ow), dtype=np.int64)
    for y, xx, rows, cols in _windows(x.shape, kernel, stride, padding):
        window = xpad[:, :, rows, cols].reshape(n, c, -1)
        where[:, :, y, xx] = np.argmax(window, axis=2)  # the first maximum
        y_out[:, :, y, xx] = window.max(axis=2)
    return y_out, where


def _avg_divisor(x_shape, args, rows, cols):
    kernel, _, padding = _pool_sizes(args)
    if args.get("count_include_pad", True):
        return kernel[0] * kernel[1]
    h, w = x_shape[2], x_shape[3]
    real_rows = [r for r in range(rows.start, rows.stop) if padding[0] <= r < padding[0] + h]
    real_cols = [c for c in range(cols.start, cols.stop) if padding[1] <= c < padding[1] + w]
    return len(real_rows) * len(real_cols)


def avg_pool2d(x, args):
    """Each window's sum over its divisor (the window's size, or with ``count_include_pad``
    False, the number of unpadded inputs in it)."""
    kernel, stride, padding = _pool_sizes(args)
    xpad = _pad(x, padding)
    n, c = x.shape[:2]
    oh, ow = (
        _out(x.shape[2], kernel[0], stride[0], padding[0]),
        _out(x.shape[3], kernel[1], stride[1], padding[1]),
    )
    out = np.zeros((n, c, oh, ow))
    for y, xx, rows, cols in _windows(x.shape, kernel, stride, padding):
        total = xpad[:, :, rows, cols].sum(axis=(2, 3))
        out[:, :, y, xx] = total / _avg_divisor(x.shape, args, rows, cols)
    return out


def _adaptive_cells(size, out):
    return [(k * size // out, math.ceil((k + 1) * size / out)) for k in range(out)]


def adaptive_avg_pool2d(x, args):
    """Mean over PyTorch's adaptive windows ``floor(k*H/OH) .. ceil((k+1)*H/OH)``."""
    oh, ow = _pair(args["output_size"])
    n, c, h, w = x.shape
    out = np.zeros((n, c, oh, ow))
    for y, (r0, r1) in enumerate(_adaptive_cells(h, oh)):
        for xx, (c0, c1) in enumerate(_adaptive_cells(w, ow)):
            out[:, :, y, xx] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


def _channel_values(x, ch):
    """All values of channel ``ch`` as a vector (any layout with channels on axis 1)."""
    return x[:, ch, ...].ravel()


def batch_norm(x, p, name, args, train):
    """Per channel, one channel at a time: ``(x - mean) / sqrt(var + eps) * weight + bias`` with
    the batch's mean and biased variance (``train``) or the running statistics. Returns the
    output and, for the backward pass, the normalised input and 1 / sqrt(var + eps)."""
    eps = float(args.get("eps", 1e-5))
    affine = args.get("affine", True)
    use_batch = train or not args.get("track_running_stats", True)
    y, xhat = np.zeros_like(x), np.zeros_like(x)
    inv_std = np.zeros(x.shape[1])
    for ch in range(x.shape[1]):
        if use_batch:
            v = _channel_values(x, ch)
            mean = v.sum() / v.size
            var = ((v - mean) ** 2).sum() / v.size
        else:
            mean, var = p[f"{name}.running_mean"][ch], p[f"{name}.running_var"][ch]
        inv_std[ch] = 1.0 / math.sqrt(var + eps)
        xhat[:, ch, ...] = (x[:, ch, ...] - mean) * inv_std[ch]
        scale, shift = (p[f"{name}.weight"][ch], p[f"{name}.bias"][ch]) if affine else (1.0, 0.0)
        y[:, ch, ...] = xhat[:, ch, ...] * scale + shift
    return y, (xhat, inv_std, use_batch)


_erf = np.vectorize(math.erf)


def activation(kind, args, x):
    """The elementwise activations, from their definitions."""
    if kind == "ReLU":
        return relu(x)
    if kind == "LeakyReLU":
        return np.where(x > 0, x, args.get("negative_slope", 0.01) * x)
    if kind == "ELU":
        return np.where(x > 0, x, args.get("alpha", 1.0) * np.expm1(np.minimum(x, 0.0)))
    if kind == "GELU":
        if args.get("approximate", "none") == "tanh":
            u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
            return 0.5 * x * (1 + np.tanh(u))
        return x * 0.5 * (1 + _erf(x / math.sqrt(2)))
    if kind == "Tanh":
        return np.tanh(x)
    if kind == "Sigmoid":
        return 1 / (1 + np.exp(-x))
    raise ValueError(kind)


def activation_derivative(kind, args, x):
    """dy/dx of each activation at ``x`` (at 0: PyTorch's choice, the left side)."""
    if kind == "ReLU":
        return (x > 0) * 1.0
    if kind == "LeakyReLU":
        return np.where(x > 0, 1.0, args.get("negative_slope", 0.01))
    if kind == "ELU":
        return np.where(x > 0, 1.0, args.get("alpha", 1.0) * np.exp(np.minimum(x, 0.0)))
    if kind == "GELU":
        if args.get("approximate", "none") == "tanh":
            k = math.sqrt(2 / math.pi)
            t = np.tanh(k * (x + 0.044715 * x**3))
            return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * k * (1 + 3 * 0.044715 * x**2)
        return 0.5 * (1 + _erf(x / math.sqrt(2))) + x * np.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)
    if kind == "Tanh":
        return 1 - np.tanh(x) ** 2
    if kind == "Sigmoid":
        s = 1 / (1 + np.exp(-x))
        return s * (1 - s)
    raise ValueError(kind)


ACTIVATIONS = ("ReLU", "LeakyReLU", "ELU", "GELU", "Tanh", "Sigmoid")


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

    Output pixel (y, x) saw input ``xpad[:, :, sh*y+i, sw*x+j]`` through ``w[:, :, i, j]``, so
    it sends ``g[:, :, y, x] @ w[:, :, i, j]`` back to that input pixel and adds
    ``g[:, :, y, x].T @ xpad[:, :, sh*y+i, sw*x+j]`` to that weight. The padding's share of the
    input gradient is cut off at the end.
    """
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    _, _, h, w = x.shape
    _, _, kh, kw = weight.shape
    xpad = _pad(x, (ph, pw))
    dxpad = np.zeros_like(xpad)
    dw = np.zeros_like(weight)
    for y in range(g.shape[2]):
        for xx in range(g.shape[3]):
            gy = g[:, :, y, xx]  # (N, O)
            for i in range(kh):
                for j in range(kw):
                    r, c = sh * y + i, sw * xx + j
                    dxpad[:, :, r, c] += gy @ weight[:, :, i, j]  # (N, O) @ (O, C)
                    dw[:, :, i, j] += gy.T @ xpad[:, :, r, c]  # (O, N) @ (N, C)
    db = g.sum(axis=(0, 2, 3))
    dx = dxpad[:, :, ph : ph + h, pw : pw + w]
    return dx, dw, db


def linear_backward(g, x, weight):
    """``dx = g @ W``, ``dW = g.T @ x``, ``db = sum over the batch of g``."""
    return g @ weight, g.T @ x, g.sum(axis=0)


def max_pool2d_backward(g, x_shape, where, args):
    """Each window's gradient goes to its (first) maximum; overlapping windows add up."""
    kernel, stride, padding = _pool_sizes(args)
    n, c, h, w = x_shape
    dxpad = np.zeros((n, c, h + 2 * padding[0], w + 2 * padding[1]))
    for y, xx, rows, cols in _windows(x_shape, kernel, stride, padding):
        i, j = np.divmod(where[:, :, y, xx], kernel[1])  # position in the window
        for a in range(n):
            for b in range(c):
                dxpad[a, b, rows.start + i[a, b], cols.start + j[a, b]] += g[a, b, y, xx]
    return dxpad[:, :, padding[0] : padding[0] + h, padding[1] : padding[1] + w]


def avg_pool2d_backward(g, x_shape, args):
    """Every input of a window receives the window's gradient over its divisor."""
    kernel, stride, padding = _pool_sizes(args)
    n, c, h, w = x_shape
    dxpad = np.zeros((n, c, h + 2 * padding[0], w + 2 * padding[1]))
    for y, xx, rows, cols in _windows(x_shape, kernel, stride, padding):
        share = g[:, :, y, xx] / _avg_divisor(x_shape, args, rows, cols)
        dxpad[:, :, rows, cols] += share[:, :, None, None]
    return dxpad[:, :, padding[0] : padding[0] + h, padding[1] : padding[1] + w]


def adaptive_avg_pool2d_backward(g, x_shape, args):
    """Every input of a cell receives the cell's gradient over the cell's area."""
    oh, ow = _pair(args["output_size"])
    _, _, h, w = x_shape
    dx = np.zeros(x_shape)
    for y, (r0, r1) in enumerate(_adaptive_cells(h, oh)):
        for xx, (c0, c1) in enumerate(_adaptive_cells(w, ow)):
            area = (r1 - r0) * (c1 - c0)
            dx[:, :, r0:r1, c0:c1] += (g[:, :, y, xx] / area)[:, :, None, None]
    return dx


def batch_norm_backward(g, cache, p, name, args):
    """Per channel. With the batch's statistics, mean and variance depend on every input, so
    ``dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``; with running
    statistics, ``dx = inv_std * dxhat``. ``dxhat = g * weight``, ``dweight = sum g * xhat``,
    ``dbias = sum g``."""
    xhat, inv_std, use_batch = cache
    affine = args.get("affine", True)
    dx = np.zeros_like(g)
    dw, db = np.zeros(g.shape[1]), np.zeros(g.shape[1])
    for ch in range(g.shape[1]):
        gc, xc = g[:, ch, ...], xhat[:, ch, ...]
        dw[ch], db[ch] = (gc * xc).sum(), gc.sum()
        dxhat = gc * (p[f"{name}.weight"][ch] if affine else 1.0)
        if use_batch:
            m = dxhat.size
            dx[:, ch, ...] = inv_std[ch] * (dxhat - dxhat.sum() / m - xc * (dxhat * xc).sum() / m)
        else:
            dx[:, ch, ...] = inv_std[ch] * dxhat
    return dx, dw, db


# --- the network ----------------------------------------------------------------------------------


def _run(p, x, layers, train):
    """Forward pass keeping what each layer's backward needs: ``caches[i]`` for layer i."""
    a = np.asarray(x, dtype=np.float64)
    caches = []
    for name, kind, args in layers:
        cache = a
        if kind == "Conv2d":
            a = conv2d(
                a,
                p[f"{name}.weight"],
                p.get(f"{name}.bias"),
                args.get("stride", 1),
                args.get("padding", 0),
            )
        elif kind == "Linear":
            a = linear(a, p[f"{name}.weight"], p.get(f"{name}.bias"))
        elif kind == "Flatten":
            a = a.reshape(a.shape[0], -1)  # C-H-W order, as torch.nn.Flatten
        elif kind == "MaxPool2d":
            a, where = max_pool2d(a, args)
            cache = (cache.shape, where)
        elif kind == "AvgPool2d":
            a = avg_pool2d(a, args)
        elif kind == "AdaptiveAvgPool2d":
            a = adaptive_avg_pool2d(a, args)
        elif kind.startswith("BatchNorm"):
            a, cache = batch_norm(a, p, name, args, train)
        elif kind == "Dropout":
            pass  # the identity here; see the module docstring
        else:
            a = activation(kind, args, a)
        caches.append(cache)
    return a, caches


def forward(state_dict, x, config, *, train=False):
    """Logits, float64, of images ``x`` (N, C, H, W) through the network ``config`` describes
    (a Sequential config or its layer list) with the weights of ``state_dict``; eval mode
    unless ``train``."""
    layers = layer_list(config)
    return _run(_params(state_dict, config), x, layers, train)[0]


def loss_and_grads(state_dict, x, labels, config, *, train=True):
    """One training step's mean cross-entropy and the gradient of every parameter.

    Returns ``(loss, {name: gradient})`` with PyTorch's names, order and layouts, all float64.
    """
    layers = layer_list(config)
    p = _params(state_dict, config)
    labels = np.asarray(labels, dtype=np.int64)
    logits, caches = _run(p, x, layers, train)
    loss, g = cross_entropy(logits, labels)
    grads = {}
    for (name, kind, args), cache in zip(reversed(layers), reversed(caches), strict=True):
        if kind == "Conv2d":
            g, dw, db = conv2d_backward(
                g, cache, p[f"{name}.weight"], args.get("stride", 1), args.get("padding", 0)
            )
            grads[f"{name}.weight"], grads[f"{name}.bias"] = dw, db
        elif kind == "Linear":
            g, grads[f"{name}.weight"], grads[f"{name}.bias"] = linear_backward(
                g, cache, p[f"{name}.weight"]
            )
        elif kind == "Flatten":
            g = g.reshape(cache.shape)
        elif kind == "MaxPool2d":
            g = max_pool2d_backward(g, cache[0], cache[1], args)
        elif kind == "AvgPool2d":
            g = avg_pool2d_backward(g, cache.shape, args)
        elif kind == "AdaptiveAvgPool2d":
            g = adaptive_avg_pool2d_backward(g, cache.shape, args)
        elif kind.startswith("BatchNorm"):
            g, grads[f"{name}.weight"], grads[f"{name}.bias"] = batch_norm_backward(
                g, cache, p, name, args
            )
        elif kind == "Dropout":
            pass
        else:
            g = g * activation_derivative(kind, args, cache)
    return loss, {k: grads[k] for k in parameter_names(config)}
