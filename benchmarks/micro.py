"""The single-operation measurements behind docs/performance.md's "What was tried" table.

    python benchmarks/micro.py --threads 2
    python benchmarks/micro.py --threads 2 --only conv_backward_methods   # one part

Each line times xpcnn's current way of doing one thing against the alternative it replaced (the
alternatives are written out here, since they are no longer in the package), on SimpleCNN's
shapes at batch 128: calls of the two alternate, so a slow spell of this shared machine hits
both, and each figure is the median of its calls.
"""

import sys

from common import machine, median, pin_threads

THREADS = pin_threads()

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import array_api_compat  # noqa: E402
import array_api_compat.numpy as xp  # noqa: E402
import numpy as np  # noqa: E402

import xpcnn  # noqa: E402
from xpcnn import conv  # noqa: E402
from xpcnn import functional as F  # noqa: E402
from xpcnn._namespace import array_namespace  # noqa: E402

rng = np.random.default_rng(0)


def ms2(new, old, repeats=30):
    """Median milliseconds of ``new`` and ``old``, their calls alternating."""
    new(), old()
    times = ([], [])
    for _ in range(repeats):
        for fn, t in zip((new, old), times, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return median(times[0]) * 1e3, median(times[1]) * 1e3


def nhwc_view(shape_nhwc):
    """An NCHW view of NHWC memory, as xpcnn's layers pass activations."""
    return np.transpose(rng.standard_normal(shape_nhwc, dtype=np.float32), (0, 3, 1, 2))


def show(what, new, old, unit="ms", repeats=30, scale=1.0):
    t_new, t_old = ms2(new, old, repeats)
    t_new, t_old = t_new * scale, t_old * scale
    print(f"{what:<62}{t_new:>9.3f}{t_old:>9.3f} {unit}   ({t_old / t_new:.1f}x)")


def relu():
    z, g = nhwc_view((128, 14, 14, 32)), nhwc_view((128, 14, 14, 32))
    y = F.relu(z)
    show(
        "ReLU forward: maximum(x, 0) | clip(x, min=0)",
        lambda: F.relu(z),
        lambda: xp.clip(z, min=0.0),
    )
    show(
        "ReLU backward: g * astype(y > 0) | where(y > 0, g, 0)",
        lambda: F.relu_backward(g, y),
        lambda: xp.where(y > 0, g, 0.0),
    )


def im2col_order():
    x = rng.random((128, 16, 16, 32), dtype=np.float32)  # conv2's padded input
    w = rng.random((64, 32, 2, 2), dtype=np.float32)

    def cij():
        s = [x[:, i : i + 15 : 2, j : j + 15 : 2, :] for i in range(2) for j in range(2)]
        return np.stack(s, axis=-1).reshape(8192, 128) @ w.reshape(64, 128).T

    def ijc():
        col, _ = conv.im2col(x, (2, 2), (2, 2))
        return col @ conv.weight_matrix(w).T

    show("conv2 forward product: (i, j, c) columns | (c, i, j)", ijc, cij)


def strided_slices_im2col(x, k):
    """im2col before the permutation path: one strided slice per kernel offset, stacked."""
    n, h, w, c = x.shape
    oh, ow = (h - k) // k + 1, (w - k) // k + 1
    s = [
        x[:, i : i + k * (oh - 1) + 1 : k, j : j + k * (ow - 1) + 1 : k, :]
        for i in range(k)
        for j in range(k)
    ]
    return np.stack(s, axis=3).reshape(n * oh * ow, k * k * c)


def im2col():
    """im2col of SimpleCNN's 2x2 stride-2 layers: where the windows tile the input, one
    permutation copy (conv.im2col, for more than one channel) against strided slices."""
    for name, (h, c) in {"conv1": (28, 1), "conv2": (16, 32), "conv3": (8, 64)}.items():
        for n in (128, 1):
            x = rng.random((n, h, h, c), dtype=np.float32)
            assert np.array_equal(conv.im2col(x, (2, 2), (2, 2))[0], strided_slices_im2col(x, 2))
            show(
                f"{name} im2col, batch {n}: conv.im2col | strided slices + stack",
                lambda x=x: conv.im2col(x, (2, 2), (2, 2)),
                lambda x=x: strided_slices_im2col(x, 2),
                "us",
                repeats=30 if n > 1 else 300,
                scale=1e3,
            )


def two_stage_im2col(x, k):
    """The alternative tried for small channel counts (stride 1): the kw column slices
    first, then kh row slices of that, each copying runs of kw*C values instead of C."""
    n, h, w, c = x.shape
    oh, ow = h - k + 1, w - k + 1
    rows = np.stack([x[:, :, j : j + ow, :] for j in range(k)], axis=3).reshape(n, h, ow, k * c)
    col = np.stack([rows[:, i : i + oh] for i in range(k)], axis=3)
    return col.reshape(n * oh * ow, k * k * c)


def zoo_im2col():
    """im2col of LeNet-5's 5x5 and MiniVGG's 3x3 stride-1 layers at batch 128 (one thread):
    conv.im2col's strided slices against the two-stage alternative."""
    shapes = {
        "LeNet-5 conv1": (32, 1, 5),
        "LeNet-5 conv2": (14, 6, 5),
        "MiniVGG conv1": (30, 1, 3),
        "MiniVGG conv4": (9, 128, 3),
    }
    for name, (h, c, k) in shapes.items():
        x = rng.random((128, h, h, c), dtype=np.float32)
        assert np.array_equal(conv.im2col(x, (k, k), (1, 1))[0], two_stage_im2col(x, k))
        show(
            f"{name} im2col, batch 128: conv.im2col | two stages",
            lambda x=x, k=k: conv.im2col(x, (k, k), (1, 1)),
            lambda x=x, k=k: two_stage_im2col(x, k),
            repeats=20,
        )


def weight_order():
    """conv2d_forward at batch 1 with the weight stored as Conv2d keeps it (conv.matrix_order:
    the product's right factor is a C-ordered view) against a plain C-ordered weight (the
    factor is a copy, then a transposed view)."""
    for name, (h, c, o, p) in {"conv2": (14, 32, 64, 1), "conv3": (8, 64, 128, 0)}.items():
        x = nhwc_view((1, h, h, c))
        w = rng.random((o, c, 2, 2), dtype=np.float32)
        b = rng.random((o,), dtype=np.float32)
        arranged = conv.matrix_order(w)
        ours, theirs = {}, {}  # each its own reused padding buffer, as a layer keeps
        show(
            f"{name} forward, batch 1: weight in matrix order | C order",
            lambda x=x, w=arranged, b=b, p=p, d=ours: conv.conv2d_forward(x, w, b, 2, p, d),
            lambda x=x, w=w, b=b, p=p, d=theirs: conv.conv2d_forward(x, w, b, 2, p, d),
            "us",
            repeats=300,
            scale=1e3,
        )


def stride1_conv():
    shapes = {"conv2": (128, 15, 64, 32), "conv3": (128, 9, 128, 64)}
    for name, (n, hp, cin, cout) in shapes.items():
        d = np.zeros((n, hp, hp, cin), np.float32)
        d[:, ::2, ::2, :] = rng.random((n, (hp + 1) // 2, (hp + 1) // 2, cin), dtype=np.float32)
        w = rng.random((cout, cin, 2, 2), dtype=np.float32)
        stride1_alternatives(name, d, w)


def stride1_alternatives(name, d, w):
    n, hp, _, cin = d.shape
    cout, oh = w.shape[0], hp - 1

    def all_taps():
        wcat = np.transpose(w, (1, 2, 3, 0)).reshape(cin, 4 * cout)
        taps = (d.reshape(-1, cin) @ wcat).reshape(n, hp, hp, 2, 2, cout)
        out = taps[:, :oh, :oh, 0, 0, :].copy()
        out += taps[:, :oh, 1:, 0, 1, :]
        out += taps[:, 1:, :oh, 1, 0, :]
        out += taps[:, 1:, 1:, 1, 1, :]
        return out

    def im2col_then_product():
        col, _ = conv.im2col(d, (2, 2), (1, 1))
        return col @ conv.weight_matrix(w).T

    def per_tap():
        return conv.conv_stride1(d, w)

    show(f"{name} dilated-gradient convolution: per tap | im2col", per_tap, im2col_then_product)
    show(f"{name} dilated-gradient convolution: per tap | all taps at once", per_tap, all_taps)


def conv_backward_methods(repeats=40):
    """conv2d_backward of SimpleCNN's three conv layers at batch 128, per input-gradient method.

    The first line is the three layers as a training step runs them (conv3, conv2, then conv1
    without the input gradient, since nothing needs the images'), the others one layer each with
    its input gradient. The methods' calls alternate; each figure is the median of ``repeats``.
    """
    layers = [("conv1", 1, 28, 32, 0), ("conv2", 32, 14, 64, 1), ("conv3", 64, 8, 128, 0)]
    calls = {}
    for name, c, size, o, p in layers:
        x = nhwc_view((128, size, size, c))
        w = rng.standard_normal((o, c, 2, 2), dtype=np.float32)
        z, col = conv.conv2d_forward(x, w, None, 2, p)
        g = nhwc_view((128, z.shape[2], z.shape[3], o))
        for method in conv.INPUT_GRAD_METHODS:
            buffers = {}  # as a layer keeps them

            def call(dx=True, g=g, col=col, x=x, w=w, p=p, method=method, buffers=buffers):
                conv.conv2d_backward(
                    g,
                    col,
                    x.shape,
                    w,
                    2,
                    p,
                    input_grad=method,
                    need_input_grad=dx,
                    buffers=buffers,
                )

            calls[name, method] = call
    methods = conv.INPUT_GRAD_METHODS
    rows = {"conv3 + conv2 + conv1 (no dx), as in training": {}}
    for m in methods:
        rows["conv3 + conv2 + conv1 (no dx), as in training"][m] = lambda m=m: (
            calls["conv3", m](),
            calls["conv2", m](),
            calls["conv1", m](False),
        )
    for name, *_ in layers:
        rows[f"{name} with dx"] = {m: calls[name, m] for m in methods}
    print(f"{'conv2d_backward, batch 128, ms (median)':<62}" + "".join(f"{m:>16}" for m in methods))
    for what, fns in rows.items():
        for f in fns.values():
            f()
        times = {m: [] for m in methods}
        for _ in range(repeats):
            for m, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[m].append(time.perf_counter() - t0)
        print(f"{what:<62}" + "".join(f"{median(times[m]) * 1e3:>16.3f}" for m in methods))


def col2im():
    cols = rng.random((128, 8, 8, 2, 2, 32), dtype=np.float32)  # conv2's input gradient

    def strided_adds():
        out = np.zeros((128, 16, 16, 32), np.float32)
        for i in range(2):
            for j in range(2):
                out[:, i : i + 15 : 2, j : j + 15 : 2, :] += cols[:, :, :, i, j, :]
        return out

    show(
        "conv2 col2im: permutation | strided additions",
        lambda: conv.col2im(cols, (16, 16), (2, 2)),
        strided_adds,
    )


def adaptive_pool():
    """AdaptiveAvgPool2d 14x14 -> 7x7 at (128, 64): windows that tile the input run as
    AvgPool2d; before, one mean (forward) or one strided addition (backward) per output cell."""
    from xpcnn import pool

    x = rng.standard_normal((128, 64, 14, 14), dtype=np.float32)
    g = rng.standard_normal((128, 64, 7, 7), dtype=np.float32)
    cells = pool.adaptive_windows(14, 7)

    def per_cell_forward():
        rows = [np.stack([x[:, :, r0:r1, c0:c1].mean((2, 3)) for c0, c1 in cells], 2)
                for r0, r1 in cells]  # fmt: skip
        return np.stack(rows, 2)

    def per_cell_backward():
        dx = np.zeros(x.shape, np.float32)
        for y, (r0, r1) in enumerate(cells):
            for x_, (c0, c1) in enumerate(cells):
                dx[:, :, r0:r1, c0:c1] += g[:, :, y : y + 1, x_ : x_ + 1] / ((r1 - r0) * (c1 - c0))
        return dx

    np.testing.assert_allclose(pool.adaptive_avg_pool2d(x, (7, 7)), per_cell_forward(), 1e-6)
    np.testing.assert_allclose(
        pool.adaptive_avg_pool2d_backward(g, x.shape), per_cell_backward(), 1e-6
    )
    show(
        "adaptive avg pool 14->7 forward: as AvgPool2d | per cell",
        lambda: pool.adaptive_avg_pool2d(x, (7, 7)),
        per_cell_forward,
    )
    show(
        "adaptive avg pool 14->7 backward: as AvgPool2d | per cell",
        lambda: pool.adaptive_avg_pool2d_backward(g, x.shape),
        per_cell_backward,
    )


def namespace_lookup():
    a = np.ones(3, np.float32)
    show(
        "array_namespace: memo per type | array-api-compat (per call)",
        lambda: [array_namespace(a) for _ in range(1000)],
        lambda: [array_api_compat.array_namespace(a) for _ in range(1000)],
        "us",
        scale=1.0,
    )


def eval_chunks():
    chunked, whole = xpcnn.SimpleCNN().eval(), xpcnn.SimpleCNN().eval()
    whole.eval_chunk = 1000
    x = rng.random((1000, 1, 28, 28), dtype=np.float32)
    show(
        "inference, 1000 images: chunks of 128 | one batch",
        lambda: chunked(x),
        lambda: whole(x),
        repeats=10,
    )


def batch1_floor():
    """xpcnn's forward at batch 1 against the same arithmetic as bare NumPy calls."""
    model = xpcnn.SimpleCNN().eval()
    sd = model.state_dict()
    # the weights in the memory order Conv2d keeps them in (state_dict hands out C order)
    wm = {
        c: conv.weight_matrix(conv.matrix_order(sd[c + ".weight"]))
        for c in ("conv1", "conv2", "conv3")
    }
    x = rng.random((1, 1, 28, 28), dtype=np.float32)

    def layer(h, name, p):
        if p:
            h = np.pad(h, ((0, 0), (p, p), (p, p), (0, 0)))
        n, size, c = h.shape[0], (h.shape[1] - 2) // 2 + 1, h.shape[3]
        if c > 1:  # as conv.im2col: the windows tile the input
            t = h[:, : 2 * size, : 2 * size, :].reshape(n, size, 2, size, 2, c)
            col = t.transpose(0, 1, 3, 2, 4, 5).reshape(n * size * size, 4 * c)
        else:
            col = strided_slices_im2col(h, 2)
        z = col @ wm[name].T + sd[name + ".bias"]
        return np.maximum(z, 0).reshape(n, size, size, -1)

    def plain():
        h = layer(layer(layer(x.transpose(0, 2, 3, 1), "conv1", 0), "conv2", 1), "conv3", 0)
        h = h.transpose(0, 3, 1, 2).reshape(1, -1)
        h = np.maximum(h @ sd["fc1.weight"].T + sd["fc1.bias"], 0)
        return h @ sd["fc2.weight"].T + sd["fc2.bias"]

    assert np.allclose(plain(), model(x), atol=1e-5)
    show(
        "batch-1 forward: xpcnn | the same as bare NumPy calls",
        lambda: model(x),
        plain,
        "us",
        repeats=300,
        scale=1e3,
    )


def workers_scaling():
    """How far two worker threads get from halving a training step (xpcnn.workers)."""
    from xpcnn.step import TrainStep

    x = rng.random((128, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 128)

    def make(workers):
        model = xpcnn.SimpleCNN(seed=0)
        opt = xpcnn.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)  # lr 0: same weights
        return TrainStep(model, opt, workers=workers)

    one, two = make(1), make(2)
    backend = one.backend

    def half():  # what each worker computes: a 64-image forward and backward, BLAS at 1
        params, buffers, _ = one.state()
        with backend.single_threaded():
            one.gradients(params, buffers, x[:64], y[:64])

    def whole_one_thread():
        with backend.single_threaded():
            one(x, y, 0.0)

    show(
        "training step, batch 128: 2 workers | one thread, BLAS at 1",
        lambda: two(x, y, 0.0),
        whole_one_thread,
        repeats=100,
    )
    show(
        "2 workers' step (batch 128) | one worker's share alone (64)",
        lambda: two(x, y, 0.0),
        half,
        repeats=100,
    )


def page_faults():
    """Run first, in a fresh process: later measurements leave a grown heap behind."""
    x = rng.random((128, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 128)
    for method in conv.INPUT_GRAD_METHODS:
        model = xpcnn.SimpleCNN(input_grad=method)

        def step(model=model):
            loss, g = F.cross_entropy(model(x), y)
            model.backward(g, need_input_grad=False)

        for _ in range(5):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            step()
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
        print(f"{'page faults per training step (' + method + ')':<62}{faults:>9.0f}")


PARTS = (
    page_faults,
    relu,
    im2col_order,
    im2col,
    zoo_im2col,
    weight_order,
    stride1_conv,
    col2im,
    adaptive_pool,
    namespace_lookup,
    eval_chunks,
    batch1_floor,
    conv_backward_methods,
    workers_scaling,
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only", nargs="+", choices=[p.__name__ for p in PARTS], help="run these parts only"
    )
    args = parser.parse_args()
    print(f"machine: {machine()}  threads: {THREADS}")
    print(f"{'':<62}{'now':>9}{'before':>9}")
    for part in PARTS:
        if args.only is None or part.__name__ in args.only:
            part()
    return 0


if __name__ == "__main__":
    sys.exit(main())
