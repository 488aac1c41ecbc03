"""The xpcnn command: exit codes, one-line errors, and the train -> evaluate round trip."""

import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest

from xpcnn import cli, datasets


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A directory of MNIST-named IDX files: 512 train and 128 test embedded digits."""
    d = datasets.load("mnist-5k")
    root = tmp_path_factory.mktemp("small")
    _write_idx(root / "train-images-idx3-ubyte.gz", d.train_images[:512])
    _write_idx(root / "train-labels-idx1-ubyte.gz", d.train_labels[:512])
    _write_idx(root / "t10k-images.idx3-ubyte.gz", d.test_images[:128])
    _write_idx(root / "t10k-labels.idx1-ubyte.gz", d.test_labels[:128])
    return root


def _one_line_error(capsys, code, expected_code, match):
    err = capsys.readouterr().err
    assert code == expected_code
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
        (["train", "--lr", "abc"], "--lr: expected a number"),
        (["train", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["train", "--device", "tpu"], "unknown device 'tpu'"),
        (["train", "--dataset", "/nonexistent/dir"], "neither a known dataset name"),
        (["train", "--resume"], "--resume needs --checkpoint"),
        (["evaluate", "/nonexistent.ckpt"], "no such checkpoint file"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv, match):
    _one_line_error(capsys, cli.main(argv), 2, match)


def test_corrupt_dataset_exits_2(capsys, tmp_path, small_dir):
    for f in small_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    target = tmp_path / "train-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:1000])
    _one_line_error(
        capsys, cli.main(["train", "--dataset", str(tmp_path)]), 2, "train-images-idx3-ubyte.gz"
    )


def test_backends_lists_every_backend(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("cpu") and " yes" in out.splitlines()[0]
    assert "cuda:0" in out and "strict:device1" in out


def test_train_then_evaluate(capsys, tmp_path, small_dir):
    ckpt = tmp_path / "run.ckpt"
    hist = tmp_path / "h.json"
    code = cli.main(
        [
            "train",
            "--dataset",
            str(small_dir),
            "--epochs",
            "2",
            "--no-progress",
            "--checkpoint",
            str(ckpt),
            "--history",
            str(hist),
            "--batch-size",
            "64",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "epoch 2/2" in out and "final test accuracy" in out
    assert ckpt.exists() and hist.exists()
    assert cli.main(["evaluate", str(ckpt), "--dataset", str(small_dir)]) == 0
    out = capsys.readouterr().out
    assert "epoch 2, 128 test images" in out and "accuracy" in out
    # resuming a finished run to more epochs continues it
    assert (
        cli.main(
            [
                "train",
                "--resume",
                "--checkpoint",
                str(ckpt),
                "--epochs",
                "3",
                "--dataset",
                str(small_dir),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "epoch 3/3" in capsys.readouterr().out


@pytest.mark.parametrize("option", [["--optimizer", "adam"], ["--schedule", "constant"]])
def test_documented_variations_of_the_main_job_run(capsys, small_dir, option):
    """The commands of docs/training.md's table (there on the embedded digits)."""
    argv = ["train", "--dataset", str(small_dir), "--epochs", "1", "--no-progress", *option]
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "final test accuracy" in captured.out


def test_corrupt_checkpoint_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    _one_line_error(capsys, cli.main(["evaluate", str(bad)]), 2, "unreadable checkpoint")


def test_plot(capsys, tmp_path, small_dir, monkeypatch):
    argv = [
        "train",
        "--dataset",
        str(small_dir),
        "--epochs",
        "1",
        "--no-progress",
        "--plot",
        str(tmp_path / "c.png"),
    ]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _one_line_error(capsys, cli.main(argv), 2, "pip install 'xpcnn[plot]'")
        return
    assert cli.main(argv) == 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _one_line_error(capsys, cli.main(argv), 2, "pip install 'xpcnn[plot]'")


def test_console_entry_point_runs_as_a_program():
    """The real process: exit status and stderr as a shell sees them."""
    r = subprocess.run(
        [sys.executable, "-m", "xpcnn.cli", "train", "--batch-size", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
