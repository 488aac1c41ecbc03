"""The trainer: determinism, backends agreeing, exact resume, divergence, Ctrl-C, read-backs."""

import signal
import threading

import numpy as np
import pytest

import xpcnn
from xpcnn import checkpoint as ckpt
from xpcnn import datasets, nn
from xpcnn import step as S
from xpcnn import trainer as T


@pytest.fixture(scope="module")
def small():
    """600 train / 200 test images of the embedded digits: a few seconds per run."""
    d = datasets.load("mnist-5k")
    return datasets.Dataset(
        "small",
        d.train_images[:600],
        d.train_labels[:600],
        d.test_images[:200],
        d.test_labels[:200],
        d.source,
    )


def _weights(result):
    return result.model.state_dict()


def _run(small, **kw):
    kw = {"dataset": small, "epochs": 2, "batch_size": 64, "progress": False, **kw}
    return T.train(**kw)


def _on_main_thread():
    """True in the calling thread of a step: with worker threads, the loss of a step is
    computed once per worker, and once on the main thread (worker 0)."""
    return threading.current_thread() is threading.main_thread()


def test_same_seed_same_weights_bit_for_bit(small):
    a, b = _weights(_run(small, seed=5, epochs=1)), _weights(_run(small, seed=5, epochs=1))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = _weights(_run(small, seed=6, epochs=1))
    assert not np.array_equal(a["fc2.weight"], c["fc2.weight"])


def test_history_and_evaluate_agree(small):
    r = _run(small, epochs=3)
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    for h in r.history:
        assert 0 <= h["test_accuracy"] <= 1 and h["seconds"] > 0 and h["images_per_second"] > 0
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]
    e = xpcnn.evaluate(r.model, small)
    assert e.count == 200
    assert e.accuracy == pytest.approx(r.history[-1]["test_accuracy"])
    assert e.loss == pytest.approx(r.history[-1]["test_loss"], rel=1e-5)


def test_numpy_and_torch_follow_the_same_trajectory(small):
    pytest.importorskip("torch")
    a = _run(small, device="cpu", epochs=1)
    b = _run(small, device="torch:cpu", epochs=1)
    assert b.backend.name == "torch:cpu"
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-3, atol=1e-4, err_msg=k)
    assert a.history[0]["train_loss"] == pytest.approx(b.history[0]["train_loss"], rel=1e-4)


def test_trains_on_every_backend(backend, small):
    before = xpcnn.evaluate(nn.SimpleCNN(seed=0), small)
    r = _run(small, device=backend.name, epochs=1, batch_size=16, optimizer="adam", lr=3e-3)
    assert all(backend.owns(p.data) for p in r.model.parameters())
    assert r.history[-1]["test_loss"] < before.loss - 0.3
    assert r.history[-1]["test_accuracy"] > before.accuracy + 0.2


def test_resume_after_an_epoch_matches_uninterrupted(small, tmp_path):
    """Train 1 epoch, then ask for 3 in total: with a constant learning rate (a cosine schedule
    depends on the total) the weights equal those of 3 epochs in one go."""
    opts = {"optimizer": "adam", "schedule": "constant"}
    full = _weights(_run(small, epochs=3, **opts))
    path = tmp_path / "run.ckpt"
    _run(small, epochs=1, checkpoint=path, **opts)
    r = _run(small, epochs=3, checkpoint=path, resume=True, optimizer="adam")
    assert [h["epoch"] for h in r.history] == [1, 2, 3]
    for k, v in _weights(r).items():
        np.testing.assert_array_equal(v, full[k])


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_mid_epoch_saves_and_resume_is_exact(small, tmp_path, monkeypatch, workers):
    full = _weights(_run(small, epochs=2, workers=workers))
    calls = {"n": 0}
    real = S.cross_entropy

    def interrupting_cross_entropy(logits, labels):
        calls["n"] += _on_main_thread()
        # epoch 1: 10 steps; then epoch 2, step 3 (one signal, not one per worker)
        if calls["n"] == 13 and _on_main_thread():
            signal.raise_signal(signal.SIGINT)
        return real(logits, labels)

    monkeypatch.setattr(S, "cross_entropy", interrupting_cross_entropy)
    path = tmp_path / "run.ckpt"
    with pytest.raises(T.TrainingInterrupted, match="interrupted at epoch 2, step 3") as info:
        _run(small, checkpoint=path, workers=workers)
    assert info.value.checkpoint == path
    _, meta = ckpt.load(path)
    assert (meta["epoch"], meta["step"]) == (1, 3)
    monkeypatch.setattr(S, "cross_entropy", real)
    r = _run(small, checkpoint=path, resume=True)  # workers: the checkpoint's
    for k, v in _weights(r).items():
        np.testing.assert_array_equal(v, full[k])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("workers", [1, 2])
def test_non_finite_loss_stops_with_epoch_and_step(small, tmp_path, monkeypatch, workers):
    path = tmp_path / "run.ckpt"
    _run(small, epochs=1, checkpoint=path, workers=workers)
    saved = path.read_bytes()
    calls = {"n": 0}
    real = S.cross_entropy

    def poisoned(logits, labels):
        calls["n"] += _on_main_thread()
        loss, grad = real(logits, labels)
        poison = calls["n"] == 4 and _on_main_thread()
        return (loss * float("nan"), grad) if poison else (loss, grad)

    monkeypatch.setattr(S, "cross_entropy", poisoned)
    with pytest.raises(
        T.TrainingDiverged,
        match=r"non-finite at epoch 2, step 4 of 10.*"
        r"last good checkpoint is .*run.ckpt \(epoch 1\)",
    ):
        _run(small, checkpoint=path, resume=True)
    assert path.read_bytes() == saved


def test_one_read_back_per_refresh(small, monkeypatch):
    """With the display refreshing only at the end of an epoch, training reads the device twice
    per epoch: the epoch's sums, then the test evaluation."""
    monkeypatch.setattr(T, "REFRESH_SECONDS", 1e9)
    r = _run(small, epochs=2)
    assert r.host_syncs == 2 * 2


def test_resume_refuses_another_architecture(small, tmp_path):
    path = tmp_path / "run.ckpt"
    _run(small, epochs=1, checkpoint=path)
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(ckpt.CheckpointError, match="saved for SimpleCNN"):
        _run(small, model=other, checkpoint=path, resume=True)


def test_custom_model_trains(small):
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, seed=0),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 13 * 13, 10, seed=1),
    )
    r = _run(small, model=model, epochs=2, lr=0.05)
    assert r.model is model and r.history[-1]["test_accuracy"] > 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"batch_size": -1}, "batch_size must be a positive integer"),
        ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'"),
        ({"resume": True}, "resume=True needs checkpoint"),
        ({"optimizer": "adam", "momentum": 0.9}, "momentum applies to sgd"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_bad_arguments(small, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(small, **kwargs)


def test_model_that_does_not_fit_the_images(small):
    model = nn.Sequential(nn.Flatten(), nn.Linear(100, 10))
    with pytest.raises(ValueError, match=r"does not fit dataset 'small' \(28x28 images\)"):
        _run(small, model=model)


def test_load_checkpoint_rebuilds_the_model(small, tmp_path):
    path = tmp_path / "run.ckpt"
    r = _run(small, epochs=1, checkpoint=path)
    model, meta = T.load_checkpoint(path)
    assert meta["epoch"] == 1 and meta["model"]["type"] == "SimpleCNN"
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, _weights(r)[k])
