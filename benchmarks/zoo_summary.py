"""Summarise the zoo runs of benchmarks/zoo_fashion.sh: per model and seed the final test
accuracy, the training time and the command; per model the mean; for each run whose checkpoint
is still there, its confusion matrix on the test set (recomputed from the checkpoint, so it
checks the recorded accuracy too).

    python benchmarks/zoo_summary.py          # prints the Markdown table of docs/models.md

Writes benchmarks/results/zoo/summary.json and, per run with a checkpoint,
benchmarks/results/zoo/<run>.confusion.json (what docs/figures.py draws).
"""

from __future__ import annotations

import json
import pathlib
import re
import statistics
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "zoo"
ORDER = ("simplecnn", "lenet5", "minivgg")
sys.path.insert(0, str(ROOT))


def confusion(checkpoint, data):
    """The (true, predicted) count matrix of a checkpoint's model on the test set."""
    from xpcnn.trainer import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    model.eval()
    pred = []
    for start in range(0, len(data.test_images), 1000):
        x = data.test_images[start : start + 1000, None].astype(np.float32) / np.float32(255)
        pred.append(np.argmax(model.backend.to_host(model(model.backend.asarray(x, "float32"))), 1))
    pred = np.concatenate(pred)
    k = data.num_classes
    m = np.zeros((k, k), dtype=int)
    np.add.at(m, (data.test_labels.astype(int), pred), 1)
    return m


def runs():
    """Every finished run: model, seed, history, log facts."""
    out = []
    for history in sorted(RESULTS.glob("fashion-*-seed*.history.json")):
        tag = history.name.removesuffix(".history.json")
        model, seed = re.match(r"fashion-(.+)-seed(\d+)$", tag).groups()
        log = (RESULTS / f"{tag}.log").read_text()
        command = [line for line in log.splitlines() if line.startswith("$ ")][-1][2:]
        wall = re.search(r"wall seconds: (\d+) +\((.*)\)", log)
        rows = json.loads(history.read_text())
        out.append(
            {
                "run": tag,
                "model": model,
                "seed": int(seed),
                "epochs": len(rows),
                "test_accuracy": rows[-1]["test_accuracy"],
                "best_epoch_accuracy": max(r["test_accuracy"] for r in rows),
                "train_seconds": sum(r["seconds"] for r in rows),
                "wall_seconds": int(wall.group(1)) if wall else None,
                "machine": wall.group(2) if wall else None,
                "command": command,
            }
        )
    return out


def main():
    from xpcnn import datasets

    data = datasets.load("fashion-mnist")
    found = runs()
    for r in found:
        ckpt = RESULTS / "checkpoints" / f"{r['run']}.ckpt"
        if ckpt.exists():
            m = confusion(ckpt, data)
            accuracy = float(np.trace(m) / m.sum())
            assert abs(accuracy - r["test_accuracy"]) < 1e-9, (r["run"], accuracy)
            (RESULTS / f"{r['run']}.confusion.json").write_text(
                json.dumps({"classes": list(data.class_names), "matrix": m.tolist()}) + "\n"
            )
    summary = {}
    for model in sorted({r["model"] for r in found}, key=lambda m: ORDER.index(m)):
        mine = sorted((r for r in found if r["model"] == model), key=lambda r: r["seed"])
        accs = [r["test_accuracy"] for r in mine]
        summary[model] = {
            "runs": mine,
            "mean_test_accuracy": statistics.mean(accs),
            "std_test_accuracy": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "mean_train_minutes": statistics.mean(r["train_seconds"] / 60 for r in mine),
        }
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("| model | seeds | test accuracy per seed | mean | training time per run | command |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model, s in summary.items():
        seeds = ", ".join(str(r["seed"]) for r in s["runs"])
        accs = ", ".join(f"{r['test_accuracy']:.4f}" for r in s["runs"])
        times = ", ".join(f"{r['train_seconds'] / 60:.1f}" for r in s["runs"])
        command = re.sub(r" --seed \d+", " --seed S", s["runs"][0]["command"])
        command = re.sub(r" --(history|checkpoint) \S+| --resume", "", command)
        command = command.replace("python -m xpcnn.cli", "xpcnn")
        print(
            f"| {model} | {seeds} | {accs} | **{s['mean_test_accuracy']:.4f}** | {times} min "
            f"| `{command}` |"
        )


if __name__ == "__main__":
    main()
