"""The same weights in PyTorch, in the naive loop reference and in xpcnn: do they agree, and
how fast is each? What ``xpcnn compare`` and ``examples/compare_pytorch.py`` run, for any zoo
model (`xpcnn.models`) or a checkpoint of one.

All three see identical inputs: the test images scaled to [0, 1] in float32. PyTorch and xpcnn
compute in float32; the naive reference (`xpcnn.reference`) computes in float64 from the same
float32 weights, so it is the "exact" answer both are measured against. Timings go from a host
(NumPy) float32 batch to host logits, so a GPU backend pays its transfers.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import numpy as np

from . import interop
from . import reference as R
from .backends import get_backend
from .datasets import Dataset
from .datasets import load as load_dataset
from .functional import cross_entropy
from .nn import Dropout, Sequential

__all__ = ["compare", "format_report", "load_weights"]

IMPLS = ("torch", "xpcnn", "naive")
PAIRS = (("torch", "xpcnn"), ("torch", "naive"), ("xpcnn", "naive"))
WARM_UP_SECONDS = 0.3


def load_weights(path):
    """A float32 model from a ``.pth``/``.pt``/``.safetensors`` state dict (matched against the
    zoo by its names and shapes, `xpcnn.interop.from_torch`) or an xpcnn checkpoint (any other
    extension is read as a checkpoint)."""
    from .checkpoint import CheckpointError
    from .trainer import load_checkpoint

    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix in (*interop.TORCH_SUFFIXES, interop.SAFETENSORS_SUFFIX):
        return interop.from_torch(path, dtype="float32")
    try:
        model, _ = load_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc} (weights must be .pth, .pt, .safetensors or an xpcnn checkpoint)"
        ) from None
    if not isinstance(model, Sequential):
        raise ValueError(f"{path}: holds a {model.config()['type']}, not a Sequential network")
    try:
        R.layer_list(Sequential.config(model))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return model.to(dtype="float32")


def _warm_up(fn, calls=3):
    """Call ``fn`` at least ``calls`` times and for at least ``WARM_UP_SECONDS``: the first calls
    pay for allocations and kernel choices, and the other library's thread pool (NumPy's BLAS,
    torch's OpenMP) needs a moment to go idle before this one is timed."""
    end = time.perf_counter() + WARM_UP_SECONDS
    for _ in range(calls):
        fn()
    while time.perf_counter() < end:
        fn()


def _median_seconds(fn, repeats):
    """Median wall time of ``fn()`` over ``repeats`` calls, after a warm-up."""
    _warm_up(fn)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _latency_ms(predict, images, count):
    """Median milliseconds of ``predict`` on ``count`` single images, after a warm-up."""
    _warm_up(lambda: predict(images[:1]))
    times = []
    for i in range(count):
        one = images[i : i + 1]
        t0 = time.perf_counter()
        predict(one)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _in_batches(predict, images, batch_size):
    return np.concatenate(
        [predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def _blas_limit(threads):
    """A context limiting NumPy's BLAS to ``threads`` (needs threadpoolctl), and a description."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext(), "library default (install threadpoolctl to set it)"
    return threadpool_limits(limits=threads, user_api="blas"), str(threads)


def compare(
    weights=None,
    *,
    model="simplecnn",
    dataset="mnist-5k",
    device="cpu",
    train_epochs=None,
    seed=0,
    limit=None,
    threads=None,
    latency_images=200,
    naive_images=20,
    batch_size=1000,
    repeats=5,
    grad_batch=64,
):
    """Run the three-way comparison and return its numbers as a JSON-able dict.

    ``weights`` is a file for `load_weights`; without it a fresh zoo ``model`` (a name, default
    ``"simplecnn"``) drawn from ``seed`` is used. With ``train_epochs`` xpcnn first trains the
    model (from ``weights`` if given) with its zoo recipe's optimizer settings.
    ``limit`` caps the number of test images; ``threads`` sets ``torch.set_num_threads`` (and
    NumPy's BLAS threads when threadpoolctl is installed) for the whole run.
    """
    torch = interop._torch()
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    backend = get_backend(device)
    from . import models

    name = str(model)
    if weights is not None:
        model, source = load_weights(weights), os.fspath(weights)
    else:
        model = models.create(name, data.num_classes, seed=seed)
        source = f"fresh {type(model).__name__}(seed={seed})"
    if train_epochs:
        from .trainer import train

        train(model, device=backend, dataset=data, epochs=train_epochs, seed=seed, progress=False)
        source += f", trained {train_epochs} epoch(s) by xpcnn"
    model.to(backend, "float32").eval()
    net = interop.to_torch(model)
    state64 = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    layout = Sequential.config(model)

    n = len(data.test_images) if limit is None else min(limit, len(data.test_images))
    images = data.test_images[:n, None].astype(np.float32) / np.float32(255)
    labels = data.test_labels[:n].astype(np.int64)
    counts = {"torch": min(latency_images, n), "xpcnn": min(latency_images, n)}
    counts["naive"] = min(naive_images, n)
    batch_size = min(batch_size, n)

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    blas_limit, blas_threads = _blas_limit(threads)
    try:
        with blas_limit:
            predict = _predictors(torch, net, model, backend, state64, layout)
            result = _inference(predict, images, labels, counts, batch_size, repeats)
            result["train_step"] = _train_step(
                torch, net, model, backend, data, state64, layout, grad_batch, repeats
            )
    finally:
        torch.set_num_threads(previous_threads)
    result["config"] = {
        "weights": source,
        "model": model.config(),
        "dataset": data.name,
        "device": backend.name,
        "test_images": n,
        "latency_images": counts,
        "batch_size": batch_size,
        "repeats": repeats,
        "dtype": "float32",
        "naive_dtype": "float64",
    }
    result["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": threads,
        "blas_threads": blas_threads,
    }
    return result


def _predictors(torch, net, model, backend, state64, layout):
    """Host float32 images (N, 1, H, W) -> host logits, for each implementation."""

    def torch_predict(x):
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    def xpcnn_predict(x):
        return backend.to_host(model(backend.asarray(x, "float32")))

    def naive_predict(x):
        return R.forward(state64, x.astype(np.float64), layout)

    return {"torch": torch_predict, "xpcnn": xpcnn_predict, "naive": naive_predict}


def _inference(predict, images, labels, counts, batch_size, repeats):
    """Accuracy, pairwise agreement and logit differences over ``images``; latency; throughput."""
    logits, seconds = {}, {}
    for name in IMPLS:
        t0 = time.perf_counter()
        logits[name] = _in_batches(predict[name], images, batch_size)
        seconds[name] = time.perf_counter() - t0
    preds = {k: np.argmax(v, axis=1) for k, v in logits.items()}
    batch = images[:batch_size]
    throughput = {
        name: batch_size / _median_seconds(lambda p=predict[name]: p(batch), repeats)
        for name in ("torch", "xpcnn")
    }
    throughput["naive"] = len(images) / seconds["naive"]  # its one pass above: it is slow
    return {
        "accuracy": {k: float(np.mean(p == labels)) for k, p in preds.items()},
        "agreement_percent": {
            f"{a}-{b}": 100.0 * float(np.mean(preds[a] == preds[b])) for a, b in PAIRS
        },
        "max_abs_logit_diff": {
            f"{a}-{b}": float(np.max(np.abs(logits[a] - logits[b]))) for a, b in PAIRS
        },
        "latency_ms_batch1": {k: _latency_ms(predict[k], images, counts[k]) for k in IMPLS},
        "throughput_images_per_s": throughput,
    }


def _dropout_off(torch, net, model):
    """Set every dropout probability to 0 (in place); returns a function that restores them.
    The three implementations would draw different masks, so gradients are compared without."""
    layers = [m for m in model.modules() if isinstance(m, Dropout)]
    torch_layers = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    saved = [m.p for m in layers], [m.p for m in torch_layers]
    for m in layers + torch_layers:
        m.p = 0.0

    def restore():
        for m, p in zip(layers + torch_layers, saved[0] + saved[1], strict=True):
            m.p = p

    return restore


def _train_step(torch, net, model, backend, data, state64, layout, batch, repeats):
    """Loss, every parameter's gradient and the time of one training step, for all three
    (training mode: batch norm uses the batch's statistics; dropout is off, `_dropout_off`)."""
    batch = min(batch, len(data.train_images))
    x = data.train_images[:batch, None].astype(np.float32) / np.float32(255)
    y = data.train_labels[:batch].astype(np.int64)

    net.train()
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)

    def torch_step():
        net.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(x_t), y_t)
        loss.backward()
        return loss.item()

    model.train()
    x_b, y_b = backend.asarray(x, "float32"), backend.asarray(y, "int64")

    def xpcnn_step():
        loss, grad = cross_entropy(model(x_b), y_b)
        model.backward(grad, need_input_grad=False)
        return float(loss)

    restore = _dropout_off(torch, net, model)
    loss = {"torch": torch_step(), "xpcnn": xpcnn_step()}
    grads = {
        "torch": {k: p.grad.numpy().copy() for k, p in net.named_parameters()},
        "xpcnn": {k: backend.to_host(p.grad) for k, p in model.named_parameters()},
    }
    seconds = {
        "torch": _median_seconds(torch_step, repeats),
        "xpcnn": _median_seconds(xpcnn_step, repeats),
    }
    t0 = time.perf_counter()
    loss["naive"], grads["naive"] = R.loss_and_grads(state64, x.astype(np.float64), y, layout)
    seconds["naive"] = time.perf_counter() - t0
    restore()
    net.eval()
    model.eval()
    return {
        "batch": batch,
        "loss": loss,
        "time_ms": {k: 1e3 * s for k, s in seconds.items()},
        "max_abs_grad": {k: float(np.max(np.abs(g))) for k, g in grads["naive"].items()},
        "max_abs_grad_diff": {
            name: {
                f"{a}-{b}": float(np.max(np.abs(grads[a][name] - grads[b][name]))) for a, b in PAIRS
            }
            for name in grads["naive"]
        },
    }


def format_report(r):
    """The numbers of `compare` as a plain-text table."""
    c, m, s = r["config"], r["machine"], r["train_step"]
    lat = c["latency_images"]
    lines = [
        f"weights: {c['weights']}",
        f"model: {c.get('model', {}).get('type', '?')}",
        f"data: {c['test_images']} test images of {c['dataset']}",
        f"machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs; python "
        f"{m['python']}, numpy {m['numpy']}, torch {m['torch']}",
        f"threads: torch {m['torch_threads']}, NumPy BLAS {m['blas_threads']}; "
        f"xpcnn on {c['device']}; torch on cpu",
        "precision: torch and xpcnn float32, naive reference float64 (same float32 weights)",
        "",
        f"{'inference':<32}{'torch':>12}{'xpcnn':>12}{'naive':>12}",
        _row("accuracy (%)", {k: 100 * v for k, v in r["accuracy"].items()}, "{:.2f}"),
        _row("latency, batch 1 (ms, median)", r["latency_ms_batch1"], "{:.3f}"),
        _row("  over this many images", lat, "{}"),
        _row(
            f"throughput, batch {c['batch_size']} (img/s)", r["throughput_images_per_s"], "{:.0f}"
        ),
        f"  (torch, xpcnn: median of {c['repeats']} runs; naive: its one pass over the test set)",
        "",
        f"{'agreement':<32}{'classes (%)':>14}{'max |logit diff|':>18}",
    ]
    for pair, agree in r["agreement_percent"].items():
        diff = r["max_abs_logit_diff"][pair]
        lines.append(f"{pair.replace('-', ' vs '):<32}{agree:>14.2f}{diff:>18.3g}")
    lines += [
        "",
        f"{'training step, ' + str(s['batch']) + ' images':<32}{'torch':>12}{'xpcnn':>12}"
        f"{'naive':>12}",
        _row("loss", s["loss"], "{:.6f}"),
        _row("time (ms)", s["time_ms"], "{:.2f}"),
        f"  (torch, xpcnn: median of {c['repeats']} steps; naive: one step; training mode, "
        "dropout off in all three)",
        "",
        f"{'gradient max |diff|':<32}{'max |grad|':>12}"
        + "".join(f"{a + ' vs ' + b:>18}" for a, b in PAIRS),
    ]
    for name, diffs in s["max_abs_grad_diff"].items():
        lines.append(
            f"{name:<32}{s['max_abs_grad'][name]:>12.3g}"
            + "".join(f"{diffs[f'{a}-{b}']:>18.3g}" for a, b in PAIRS)
        )
    return "\n".join(lines)


def _row(label, values, fmt):
    return f"{label:<32}" + "".join(f"{fmt.format(values[k]):>12}" for k in IMPLS)
