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
