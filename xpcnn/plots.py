"""Learning curves with matplotlib (an optional extra: ``pip install 'xpcnn[plot]'``)."""

from __future__ import annotations


def plot_history(history, path):
    """Save train/test loss and accuracy per epoch (``xpcnn.train``'s history) as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    for split, style in (("train", "-o"), ("test", "--s")):
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history], style, label=split)
        ax_acc.plot(epochs, [r[f"{split}_accuracy"] for r in history], style, label=split)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_scaling(rows, measured, path, *, weak_batch=64, global_batch=128):
    """Save the data-parallel scaling model of docs/distributed.md as an image: images/s and
    efficiency against the number of ranks, for weak scaling (``weak_batch`` images per rank)
    and strong scaling (``global_batch`` images per step in all), one line per network.

    ``rows`` are the model's rows (benchmarks/distributed.py: ``network``, ``ranks``,
    ``weak_images_per_second``, ``weak_efficiency``, ``strong_images_per_second``,
    ``strong_speedup``); ``measured`` maps ranks to the images/s measured on this machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_eff) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    networks = list(dict.fromkeys(r["network"] for r in rows))
    for net, colour in zip(networks, colours, strict=False):
        mine = [r for r in rows if r["network"] == net]
        ranks = [r["ranks"] for r in mine]
        strong = [r for r in mine if r["strong_images_per_second"]]
        ax_rate.plot(
            ranks,
            [r["weak_images_per_second"] for r in mine],
            "-o",
            ms=3,
            color=colour,
            label=f"{net}, weak ({weak_batch}/rank)",
        )
        ax_rate.plot(
            [r["ranks"] for r in strong],
            [r["strong_images_per_second"] for r in strong],
            "--s",
            ms=3,
            color=colour,
            label=f"{net}, strong ({global_batch} in all)",
        )
        ax_eff.plot(
            ranks,
            [r["weak_efficiency"] for r in mine],
            "-o",
            ms=3,
            color=colour,
            label=f"{net}, weak",
        )
        ax_eff.plot(
            [r["ranks"] for r in strong],
            [r["strong_speedup"] / r["ranks"] for r in strong],
            "--s",
            ms=3,
            color=colour,
            label=f"{net}, strong",
        )
    one = rows[0]["weak_images_per_second"]
    ideal = sorted({r["ranks"] for r in rows})
    ax_rate.plot(ideal, [one * p for p in ideal], ":", color="grey", label="ideal (weak)")
    ax_rate.plot(
        list(measured), list(measured.values()), "k*", ms=10, label="measured here (1 thread/rank)"
    )
    ax_rate.set(
        xscale="log",
        yscale="log",
        xlabel="MPI ranks",
        ylabel="images/s",
        title="SimpleCNN training throughput (model)",
    )
    ax_eff.set(
        xscale="log",
        xlabel="MPI ranks",
        ylabel="parallel efficiency",
        ylim=(0, 1.05),
        title="efficiency = speedup / ranks",
    )
    for ax in (ax_rate, ax_eff):
        ax.grid(alpha=0.3, which="both")
    ax_rate.legend(fontsize=7)
    ax_eff.legend(fontsize=7)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path
