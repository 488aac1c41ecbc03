"""Draw every figure of the documentation with xpcnn's own functions.

    python docs/figures.py

Writes the PNG files under docs/img/ (overwriting them) and prints the numbers the pages quote.
Needs matplotlib (``pip install '.[plot]'``). Everything is seeded, so a rerun draws the same
pictures; training runs on NumPy on the CPU and takes well under a minute. The learning curves
and the confusion matrix are drawn from the zoo's best model's recorded run (MiniVGG on
Fashion-MNIST, seed 0: its history and the confusion matrix benchmarks/zoo_summary.py computed
from its checkpoint, both under benchmarks/results/zoo/), not retrained here.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import xpcnn  # noqa: E402
from xpcnn import conv  # noqa: E402
from xpcnn.plots import plot_history  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parent
IMG = DOCS / "img"
sys.path.insert(0, str(DOCS))
import worked_example as ex  # noqa: E402

DPI = 100
TRAIN_EPOCHS = 8  # quoted in docs/how-it-works.md together with the accuracy it gives
TRAIN_SEED = 0
#: The run the learning curves and the confusion matrix are drawn from (docs/models.md).
BEST_RUN = DOCS.parent / "benchmarks" / "results" / "zoo" / "fashion-minivgg-seed0"
METADATA = {"Software": None}  # no version string in the PNG: reruns give the same bytes

# colours
PAD = "#d9d9d9"
UNUSED = "#f4f4f4"
ZERO = "#cfe3f7"
VALUE = "#ffd28a"
REMAINDER = "#f7c6d0"
WINDOWS = ["#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5"]

plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "figure.dpi": DPI})


def save(fig, name):
    path = IMG / name
    fig.savefig(path, dpi=DPI, metadata=METADATA)
    plt.close(fig)
    print(f"wrote {path.relative_to(DOCS.parent)} ({path.stat().st_size // 1024} KiB)")


def draw_matrix(ax, a, x0, y0, colors=None, title=None, fmt="{:g}", fontsize=8):
    """Draw 2-D array ``a`` as a grid of numbered cells, top-left corner at (x0, y0)."""
    rows, cols = a.shape
    for r in range(rows):
        for c in range(cols):
            face = "white" if colors is None else colors[r][c]
            ax.add_patch(Rectangle((x0 + c, y0 + r), 1, 1, facecolor=face, edgecolor="#888888"))
            ax.text(
                x0 + c + 0.5,
                y0 + r + 0.5,
                fmt.format(a[r, c]),
                ha="center",
                va="center",
                fontsize=fontsize,
            )
    if title:
        ax.text(x0 + cols / 2, y0 - 0.4, title, ha="center", va="bottom", fontsize=9)


def outline(ax, x0, y0, w, h, color="black", lw=2.0):
    ax.add_patch(Rectangle((x0, y0), w, h, fill=False, edgecolor=color, linewidth=lw))


def canvas(width, height, size):
    """An axes with y pointing down, equal aspect, no ticks: a sheet to draw matrices on."""
    fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    ax.set_xlim(-0.5, width + 0.5)
    ax.set_ylim(height + 0.5, -1.5)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def arrow(ax, x0, x1, y, text):
    ax.annotate("", xy=(x1, y), xytext=(x0, y), arrowprops={"arrowstyle": "->", "lw": 1.5})
    ax.text((x0 + x1) / 2, y - 0.3, text, ha="center", va="bottom", fontsize=8)


# --- the convolution math ---------------------------------------------------------------------


def fig_im2col():
    """A 5x5 input padded by 1, its nine 2x2 windows (stride 2) and the im2col matrix."""
    x, w = ex.X, ex.W
    padding, stride = (1, 1), (2, 2)
    xpad = conv.to_nchw(conv.pad_hw(conv.to_nhwc(x), padding))[0, 0]
    _, col = conv.conv2d_forward(x, w, None, stride, padding)
    n_pad = xpad.shape[0]
    oh = conv.output_size(x.shape[2], 2, 2, 1)
    colors = [[PAD] * n_pad for _ in range(n_pad)]
    for r in range(1, n_pad - 1):
        for c in range(1, n_pad - 1):
            colors[r][c] = "white"
    row_colors = []
    for y in range(oh):
        for xx in range(oh):
            color = WINDOWS[(y * oh + xx) % len(WINDOWS)]
            row_colors.append([color] * col.shape[1])
            for i in range(2):
                for j in range(2):
                    colors[2 * y + i][2 * xx + j] = color
    fig, ax = canvas(n_pad + 3 + col.shape[1], max(n_pad, col.shape[0]), (7.2, 4.4))
    draw_matrix(ax, xpad, 0, 0, colors, "input padded by 1 (grey: padding)")
    for y in range(oh):
        for xx in range(oh):
            outline(ax, 2 * xx, 2 * y, 2, 2)
    ax.text(n_pad / 2, n_pad + 0.6, "last row and column: no window reaches them", ha="center")
    x0 = n_pad + 3
    arrow(ax, n_pad + 0.4, x0 - 0.4, 3.5, "im2col")
    draw_matrix(ax, col, x0, 0, row_colors, "col: 9 rows x 4 columns")
    for r in range(col.shape[0]):
        ax.text(x0 + col.shape[1] + 0.2, r + 0.5, f"(y={r // oh}, x={r % oh})", va="center")
    for j, (di, dj) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        ax.text(x0 + j + 0.5, col.shape[0] + 0.5, f"({di},{dj})", ha="center", fontsize=7)
    ax.text(x0 + 2, col.shape[0] + 1.2, "kernel offset (i, j)", ha="center", fontsize=8)
    save(fig, "im2col.png")


def fig_dilation(r):
    """G, G with s-1 zeros inserted, and D: padded by k-1-p plus the remainder row/column."""
    g = r["G"][0, 0]
    dilated = conv.to_nchw(conv.dilate_pad(conv.to_nhwc(r["G"]), ex.STRIDE, (0, 0), (3, 3)))
    dilated = dilated[0, 0]
    d = r["D"][0, 0]
    colors_dil = [
        [VALUE if (i % 2 == 0 and j % 2 == 0) else ZERO for j in range(3)] for i in range(3)
    ]
    colors_d = []
    for i in range(6):
        row = []
        for j in range(6):
            if i in (1, 2, 3) and j in (1, 2, 3):
                row.append(colors_dil[i - 1][j - 1])
            elif i == 5 or j == 5:
                row.append(REMAINDER)
            else:
                row.append(PAD)
        colors_d.append(row)
    fig, ax = canvas(2 + 2.5 + 3 + 2.5 + 6 + 4.5, 6.2, (8.8, 3.6))
    draw_matrix(ax, g, 0, 2, [[VALUE] * 2] * 2, "G = dL/dZ")
    arrow(ax, 2.2, 4.3, 3.0, "insert s-1 zeros")
    draw_matrix(ax, dilated, 4.5, 1.5, colors_dil, "dilated")
    arrow(ax, 7.7, 9.8, 3.0, "pad")
    draw_matrix(ax, d, 10, 0, colors_d, "D (6x6)")
    legend = [
        (VALUE, "values of G"),
        (ZERO, "inserted zeros (stride 2)"),
        (PAD, "padding k-1-p = 1"),
        (REMAINDER, "remainder: (H+2p-k) mod s = 1"),
    ]
    for i, (color, text) in enumerate(legend):
        ax.add_patch(Rectangle((16.6, 0.5 + 1.2 * i), 0.8, 0.8, facecolor=color, edgecolor="#888"))
        ax.text(17.6, 0.9 + 1.2 * i, text, va="center", fontsize=8)
    save(fig, "dilation.png")


def fig_rotated_kernel():
    """rotate_kernel on a (O=2, C=3, 2, 2) weight: each 2x2 kernel turned 180 degrees, and the
    grid of kernels transposed, so the backward convolution maps O channels back to C."""
    w = np.arange(1.0, 25.0).reshape(2, 3, 2, 2)
    w_rot = conv.rotate_kernel(w)
    fig, ax = canvas(3 * 3 + 4 + 2 * 3, 3 * 3 + 0.5, (7.0, 4.6))
    for o in range(2):
        for c in range(3):
            color = WINDOWS[(o * 3 + c) % len(WINDOWS)]
            draw_matrix(ax, w[o, c], 3 * c, 1 + 3 * o, [[color] * 2] * 2, f"W[{o},{c}]")
    ax.text(4, -1.2, "W: (O=2, C=3, 2, 2)", ha="center", fontsize=10)
    arrow(ax, 9.2, 12.3, 4.5, "rotate_kernel")
    for c in range(3):
        for o in range(2):
            color = WINDOWS[(o * 3 + c) % len(WINDOWS)]
            draw_matrix(
                ax, w_rot[c, o], 13 + 3 * o, 1 + 3 * c, [[color] * 2] * 2, f"W_rot[{c},{o}]"
            )
    ax.text(15.5, -1.2, "W_rot: (C=3, O=2, 2, 2)", ha="center", fontsize=10)
    save(fig, "rotated_kernel.png")


def fig_input_grad(r):
    """dX as a stride-1 convolution of D with W_rot: two windows followed to their outputs."""
    d, w_rot, dx = r["D"][0, 0], r["W_rot"][0, 0], r["dX"][0, 0]
    picks = [((1, 1), WINDOWS[0]), ((2, 3), WINDOWS[3])]
    colors_d = [["white"] * 6 for _ in range(6)]
    colors_x = [["white"] * 5 for _ in range(5)]
    for j in range(5):
        colors_x[4][j] = colors_x[j][4] = REMAINDER
    for (y, x), color in picks:
        for i in range(2):
            for j in range(2):
                colors_d[y + i][x + j] = color
        colors_x[y][x] = color
    fig, ax = canvas(6 + 2.5 + 2 + 2.5 + 5 + 0.5, 6.5, (8.0, 3.6))
    draw_matrix(ax, d, 0, 0, colors_d, "D", fontsize=7)
    for (y, x), _ in picks:
        outline(ax, x, y, 2, 2)
    ax.text(7.25, 2.6, "*", ha="center", fontsize=16)
    draw_matrix(ax, w_rot, 8.5, 2, None, "W_rot")
    arrow(ax, 10.8, 12.7, 3.0, "stride 1")
    draw_matrix(ax, dx, 13, 0.5, colors_x, "dX (5x5)", fontsize=7)
    ax.text(
        15.5, 6.0, "pink: no forward window saw these pixels: gradient 0", ha="center", fontsize=8
    )
    save(fig, "input_grad.png")


# --- a model trained briefly on the embedded digits ---------------------------------------------


def train_model():
    t0 = time.perf_counter()
    result = xpcnn.train(
        dataset="mnist-5k", epochs=TRAIN_EPOCHS, seed=TRAIN_SEED, device="cpu", progress=False
    )
    seconds = time.perf_counter() - t0
    last = result.history[-1]
    print(
        f"xpcnn.train(dataset='mnist-5k', epochs={TRAIN_EPOCHS}, seed={TRAIN_SEED}): "
        f"test accuracy {last['test_accuracy']:.4f}, test loss {last['test_loss']:.4f} "
        f"({seconds:.0f} s)"
    )
    return result


def fig_filters(model):
    w = model.conv1.weight.data  # (32, 1, 2, 2)
    lim = float(np.abs(w).max())
    fig, axes = plt.subplots(4, 8, figsize=(6.4, 3.4), constrained_layout=True)
    for k, ax in enumerate(axes.flat):
        ax.imshow(w[k, 0], cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(str(k), fontsize=7, pad=2)
    fig.suptitle("conv1: the 32 learned 2x2 kernels (red > 0, blue < 0)")
    save(fig, "conv1_filters.png")


def fig_feature_maps(model, data):
    image = data.test_images[0]
    model.eval()
    x = model.backend.asarray(image[None, None] / 255.0, model.dtype)
    maps = model.relu1(model.conv1(x))[0]  # (32, 14, 14)
    fig, axes = plt.subplots(4, 9, figsize=(7.2, 3.6), constrained_layout=True)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].imshow(image, cmap="gray_r")
    axes[0, 0].set_title(f"input (label {data.test_labels[0]})", fontsize=7, pad=2)
    for k in range(1, 4):
        axes[k, 0].axis("off")
    for k in range(32):
        ax = axes[k // 8, 1 + k % 8]
        ax.imshow(maps[k], cmap="viridis")
        ax.set_title(str(k), fontsize=7, pad=2)
    fig.suptitle("ReLU(conv1(x)): 32 feature maps of 14x14 for one test digit")
    save(fig, "feature_maps.png")


def fig_confusion(m, classes, title):
    """A confusion matrix (rows: true class, columns: prediction) with its counts."""
    m = np.asarray(m)
    k = len(classes)
    fig, ax = plt.subplots(figsize=(6.0, 5.2), constrained_layout=True)
    ax.imshow(m, cmap="Blues")
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                color = "white" if m[i, j] > m.max() / 2 else "black"
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true class")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    accuracy = np.trace(m) / m.sum()
    ax.set_title(f"{title}: {m.sum()} test images, accuracy {accuracy:.4f}")
    save(fig, "confusion.png")
    return accuracy


def fig_best_run():
    """Learning curves and confusion matrix of the zoo's best model from its recorded run
    (benchmarks/zoo_fashion.sh, then benchmarks/zoo_summary.py for the confusion matrix)."""
    history_path = BEST_RUN.with_name(BEST_RUN.name + ".history.json")
    confusion_path = BEST_RUN.with_name(BEST_RUN.name + ".confusion.json")
    if not (history_path.exists() and confusion_path.exists()):
        raise SystemExit(
            f"{history_path} or {confusion_path} is missing: run benchmarks/zoo_fashion.sh "
            "minivgg, then python benchmarks/zoo_summary.py"
        )
    history = json.loads(history_path.read_text())
    plot_history(history, IMG / "learning_curves.png")
    print(f"wrote docs/img/learning_curves.png from {history_path.relative_to(DOCS.parent)}")
    confusion = json.loads(confusion_path.read_text())
    accuracy = fig_confusion(
        confusion["matrix"], confusion["classes"], "MiniVGG on Fashion-MNIST, seed 0"
    )
    print(f"MiniVGG seed 0: final test accuracy {history[-1]['test_accuracy']:.4f} "
          f"(confusion matrix: {accuracy:.4f})")  # fmt: skip


def main():
    IMG.mkdir(exist_ok=True)
    r = ex.compute()
    print("worked example verified against: " + ", ".join(ex.verify(r)))
    fig_im2col()
    fig_dilation(r)
    fig_rotated_kernel()
    fig_input_grad(r)
    result = train_model()
    data = xpcnn.datasets.load("mnist-5k")
    fig_filters(result.model)
    fig_feature_maps(result.model, data)
    fig_best_run()
    total = sum(p.stat().st_size for p in IMG.glob("*.png"))
    print(f"docs/img: {len(list(IMG.glob('*.png')))} PNG files, {total // 1024} KiB")


if __name__ == "__main__":
    main()
