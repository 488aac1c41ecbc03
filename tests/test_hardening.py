"""Issue 9 on the trainer's and the command's side: divergence never leaves a bad checkpoint or
exit 0, resume checks what it depends on, arguments are named, checkpoints are refused before
they cost memory, and a pipe gets plain lines."""

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

import xpcnn
from xpcnn import checkpoint as ckpt
from xpcnn import cli, datasets, nn
from xpcnn import step as S
from xpcnn import trainer as T


def _subset(name, n_train, n_test, offset=0):
    d = datasets.load("mnist-5k")
    return datasets.Dataset(
        name,
        d.train_images[offset : offset + n_train],
        d.train_labels[offset : offset + n_train],
        d.test_images[:n_test],
        d.test_labels[:n_test],
        d.source,
    )


@pytest.fixture(scope="module")
def small():
    return _subset("small", 256, 64)


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, small):
    root = tmp_path_factory.mktemp("idx")
    _write_idx(root / "train-images-idx3-ubyte.gz", small.train_images)
    _write_idx(root / "train-labels-idx1-ubyte.gz", small.train_labels)
    _write_idx(root / "t10k-images-idx3-ubyte.gz", small.test_images)
    _write_idx(root / "t10k-labels-idx1-ubyte.gz", small.test_labels)
    return root


def _one_line(capsys, code, expected, *needles):
    err = capsys.readouterr().err
    assert code == expected, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# --- 1. non-finite values -----------------------------------------------------------------------


@pytest.mark.parametrize("lr", ["1e3", "1e6"])
def test_divergence_exits_1_and_writes_no_bad_checkpoint(capsys, tmp_path, small_dir, lr):
    path = tmp_path / "run.ckpt"
    argv = ["train", "--dataset", str(small_dir), "--epochs", "2", "--lr", lr]
    code = cli.main([*argv, "--checkpoint", str(path), "--no-progress"])
    err = _one_line(capsys, code, 1, "training diverged", "non-finite")
    assert "intact" not in err
    if path.exists():  # written only if the first epoch was still finite
        arrays, _ = ckpt.load(path)
        assert all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")
        assert "last good checkpoint is" in err
    else:
        assert "no checkpoint was written" in err


def test_divergence_without_checkpoint_says_so(small):
    with pytest.raises(T.TrainingDiverged, match="no checkpoint was written"):
        T.train(dataset=small, epochs=1, lr=1e6, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"momentum": float("nan")}, "momentum must be a finite number"),
        ({"lr": float("inf")}, "lr must be a finite number"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"eval_batch_size": 0}, "eval_batch_size must be a positive integer"),
        ({"input_grad": "fft"}, "input_grad must be one of"),
    ],
)
def test_bad_numbers_are_named(small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.train(dataset=small, epochs=1, progress=False, **kwargs)


def test_weights_that_go_non_finite_in_the_last_step_are_caught(small, monkeypatch):
    """A step whose loss was finite but whose update made the weights NaN (the last step of the
    run): the run must not return normally."""
    real = S.TrainStep.__call__
    calls = {"n": 0}

    def poison_last(self, x, y, lr):
        calls["n"] += 1
        loss, correct = real(self, x, y, lr)
        if calls["n"] == 4:  # 256 images / 64 = 4 steps: the last one
            self.params[0].data = self.params[0].data * float("nan")
        return loss, correct

    monkeypatch.setattr(S.TrainStep, "__call__", poison_last)
    with pytest.raises(T.TrainingDiverged, match="end of epoch 1"):
        T.train(dataset=small, epochs=1, batch_size=64, progress=False)


# --- 2. resume checks what it depends on ----------------------------------------------------------


@pytest.fixture
def interrupted(small, tmp_path, monkeypatch):
    """A run at batch size 16 interrupted mid-epoch 1 (after step 5)."""
    path = tmp_path / "run.ckpt"
    real = S.TrainStep.__call__
    calls = {"n": 0}

    def interrupting(self, x, y, lr):
        calls["n"] += 1
        if calls["n"] == 5:
            signal.raise_signal(signal.SIGINT)
        return real(self, x, y, lr)

    monkeypatch.setattr(S.TrainStep, "__call__", interrupting)
    with pytest.raises(T.TrainingInterrupted, match="epoch 1, step 5"):
        T.train(dataset=small, epochs=2, batch_size=16, checkpoint=path, progress=False)
    monkeypatch.setattr(S.TrainStep, "__call__", real)
    return path


@pytest.mark.parametrize("batch", ["1000", "32"])
def test_mid_epoch_resume_with_another_batch_size_is_refused(capsys, interrupted, small, batch):
    argv = ["train", "--resume", "--checkpoint", str(interrupted), "--batch-size", batch]
    # the CLI needs the dataset by path; the library call is the same check
    with pytest.raises(ckpt.CheckpointError, match="at batch size 16; resume with batch size 16"):
        T.train(dataset=small, epochs=2, batch_size=int(batch), checkpoint=interrupted, resume=True)
    assert cli.main(argv) == 2  # mnist-5k is another dataset: refused as well, one line
    capsys.readouterr()


def test_mid_epoch_resume_takes_the_saved_batch_size(interrupted, small):
    full = T.train(dataset=small, epochs=2, batch_size=16, progress=False)
    r = T.train(dataset=small, epochs=2, checkpoint=interrupted, resume=True, progress=False)
    for k, v in full.model.state_dict().items():
        np.testing.assert_array_equal(r.model.state_dict()[k], v)


def test_epoch_boundary_resume_with_a_new_batch_size_is_noted(small, tmp_path):
    path = tmp_path / "run.ckpt"
    T.train(dataset=small, epochs=1, batch_size=16, checkpoint=path, progress=False)
    r = T.train(
        dataset=small, epochs=2, batch_size=32, checkpoint=path, resume=True, progress=False
    )
    assert any("batch size 16 -> 32 at an epoch boundary" in n for n in r.notes)
    assert [h["epoch"] for h in r.history] == [1, 2]


def test_resume_on_another_dataset_is_refused(small, tmp_path):
    path = tmp_path / "run.ckpt"
    T.train(dataset=small, epochs=1, checkpoint=path, progress=False)
    other = _subset("small", 256, 64, offset=256)  # same name, size and image shape
    with pytest.raises(ckpt.CheckpointError, match="cannot resume on"):
        T.train(dataset=other, epochs=2, checkpoint=path, resume=True, progress=False)


def test_checkpoint_records_what_resume_depends_on(small, tmp_path):
    path = tmp_path / "run.ckpt"
    T.train(dataset=small, epochs=1, checkpoint=path, progress=False)
    _, meta = ckpt.load(path)
    run = meta["run"]
    assert run["batch_size"] == 128 and run["input_grad"] == ["dilation"]
    assert run["dataset"]["name"] == "small" and run["dataset"]["train"] == 256
    assert len(run["dataset"]["labels_sha256"]) == 64
    assert meta["xpcnn"] == xpcnn.__version__ and meta["dtype"] == "float32"
    assert meta["model"] == {"type": "SimpleCNN", "num_classes": 10}


def test_empty_training_split_is_refused():
    d = _subset("empty", 0, 64)
    with pytest.raises(ValueError, match="has no training images"):
        T.train(dataset=d, epochs=1, progress=False)


# --- 3. checkpoints that lie about their model ----------------------------------------------------


def _write_fake(path, config, arrays):
    meta = {"model": config, "dtype": "float32", "epoch": 1}
    ckpt.save(path, {f"model/{k}": v for k, v in arrays.items()}, meta)


def test_huge_declared_model_is_refused_before_allocating(tmp_path):
    """A 1 KB file declaring Linear(20000, 20000) must not make the loader draw 400M weights."""
    path = tmp_path / "liar.ckpt"
    config = {"type": "Sequential", "layers": [{"type": "Linear", "name": "fc",
              "in_features": 20000, "out_features": 20000}]}  # fmt: skip
    _write_fake(path, config, {"fc.weight": np.zeros((2, 2), np.float32),
                               "fc.bias": np.zeros(2, np.float32)})  # fmt: skip
    tracemalloc.start()
    try:
        with pytest.raises(ckpt.CheckpointError, match=r"fc.weight.*\(2, 2\).*\(20000, 20000\)"):
            T.load_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, peak


@pytest.mark.parametrize(
    "config",
    [
        [1, 2, 3],
        {"type": "Nope"},
        {"type": "Linear", "in_features": "many", "out_features": 2},
        {"type": "Linear", "in_features": 2, "out_features": 2, "dtype": "float64"},
        {"type": "Sequential", "layers": "x"},
        {"type": "Sequential", "layers": [{"type": "Flatten", "name": "a"}] * 2},
        {"type": "Module"},
    ],
    ids=["list", "unknown-type", "string-size", "forbidden-key", "layers-not-list",
         "duplicate-names", "abstract"],
)  # fmt: skip
def test_malformed_model_configs_are_checkpoint_errors(tmp_path, config):
    path = tmp_path / "bad.ckpt"
    _write_fake(path, config, {})
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        T.load_checkpoint(path)


def test_deeply_nested_config_is_refused():
    """The checkpoint loader bounds JSON depth (tests/test_fuzz.py); nn.build bounds nesting
    on its own too, for configs that come from elsewhere."""
    config = {"type": "Flatten"}
    for _ in range(nn.MAX_CONFIG_DEPTH + 5):
        config = {"type": "Sequential", "layers": [config]}
    with pytest.raises(ValueError, match="nested deeper than"):
        nn.build(config)


def test_evaluate_of_a_checkpoint_without_epoch(capsys, tmp_path, small):
    r = T.train(dataset=small, epochs=1, progress=False)
    path = tmp_path / "w.ckpt"
    _write_fake(path, r.model.config(), r.model.state_dict())  # no 'epoch' key needed
    arrays, meta = ckpt.load(path)
    meta.pop("epoch")
    ckpt.save(path, arrays, {k: v for k, v in meta.items() if k not in ("arrays", "format")})
    assert cli.main(["evaluate", str(path)]) == 0
    assert "epoch ?" in capsys.readouterr().out


# --- 5, 7. arguments and datasets entering --------------------------------------------------------


def test_model_with_too_few_outputs_is_refused_by_evaluate_and_train(small):
    with pytest.raises(ValueError, match="needs one output per class"):
        T.evaluate(nn.SimpleCNN(num_classes=5), small)
    with pytest.raises(ValueError, match="needs one output per class"):
        T.train(nn.SimpleCNN(num_classes=5), dataset=small, epochs=1, progress=False)


@pytest.mark.parametrize("batch", [0, -3, 2.5, True])
def test_evaluate_batch_size_is_named(small, batch):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        T.evaluate(nn.SimpleCNN(), small, batch_size=batch)


def test_a_torch_module_is_named_with_the_fix():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="model must be an xpcnn Module.*from_torch"):
        T.train(torch.nn.Linear(2, 2), epochs=1)
    with pytest.raises(TypeError, match="model must be an xpcnn Module"):
        T.evaluate(object())


def test_seed_option_is_named(capsys):
    _one_line(capsys, cli.main(["train", "--seed", "-1"]), 2, "--seed", "non-negative integer")


def test_unwritable_checkpoint_destination_is_found_before_training(small, tmp_path, monkeypatch):
    calls = {"n": 0}
    monkeypatch.setattr(S.TrainStep, "__call__", lambda *a: calls.__setitem__("n", 1))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in (tmp_path, blocker / "sub" / "run.ckpt"):
        with pytest.raises((ckpt.CheckpointError, OSError), match=str(target)):
            T.train(dataset=small, epochs=1, checkpoint=target, progress=False)
    assert calls["n"] == 0


def test_pipes_get_plain_lines_not_bar_frames(small_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "xpcnn.cli", "train", "--dataset", str(small_dir), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    assert "epoch 1/1" in proc.stdout and "final test accuracy" in proc.stdout


def test_history_is_json(tmp_path, small_dir):
    hist = tmp_path / "h.json"
    argv = ["train", "--dataset", str(small_dir), "--epochs", "1", "--history", str(hist)]
    assert cli.main([*argv, "--no-progress"]) == 0
    assert json.loads(hist.read_text())[0]["epoch"] == 1
