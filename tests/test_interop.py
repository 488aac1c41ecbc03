"""PyTorch <-> xpcnn: weights both ways bit for bit (objects, .pth, .safetensors), the same logits
on the whole embedded test set, clear errors, and ``xpcnn compare`` end to end."""

import functools
import json
import os
import pathlib
import re
import runpy
import sys

import numpy as np
import pytest

import xpcnn
from xpcnn import cli, compare, interop
from xpcnn.backends import to_numpy

from conftest import assert_close

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")


def _torch_net(dtype, seed=3, num_classes=10):
    torch.manual_seed(seed)
    net = interop.torch_simple_cnn(num_classes)
    return net.double() if dtype == "float64" else net


def _assert_identical(a, b):
    """Two torch state dicts with the same keys, dtypes and bits."""
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@functools.cache
def _trained():
    return xpcnn.train(epochs=1, batch_size=32, progress=False).model


@pytest.fixture
def trained():
    """A briefly trained SimpleCNN (about 90% test accuracy), so logits are not near-ties;
    trained once per session (a module-scoped fixture was rebuilt as pytest regrouped the
    backend parameters)."""
    return _trained()


@pytest.fixture(scope="module")
def test_set():
    d = xpcnn.datasets.load("mnist-5k")
    return d.test_images[:, None].astype(np.float32) / np.float32(255), d.test_labels


def test_torch_simple_cnn_has_xpcnn_names_and_shapes():
    net = interop.torch_simple_cnn()
    ours = xpcnn.SimpleCNN().state_dict()
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in ours.items()
    }
    assert list(net.state_dict()) == list(ours)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


# --- round trips ----------------------------------------------------------------------------------


def test_round_trip_through_objects(backend_dtype):
    backend, dtype = backend_dtype
    net = _torch_net(dtype)
    model = interop.from_torch(net, device=backend)
    assert model.dtype == dtype and model.backend == backend
    _assert_identical(interop.to_torch_state_dict(model), net.state_dict())
    _assert_identical(interop.to_torch(model).state_dict(), net.state_dict())


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_through_files(backend_dtype, tmp_path, suffix):
    backend, dtype = backend_dtype
    net = _torch_net(dtype)
    first = tmp_path / f"torch{suffix}"
    if suffix == ".pth":
        torch.save(net.state_dict(), first)
    else:
        import safetensors.torch

        safetensors.torch.save_file(net.state_dict(), first)
    model = interop.from_torch(first, device=backend)
    assert model.dtype == dtype
    second = tmp_path / f"xpcnn{suffix}"
    (interop.save_pth if suffix == ".pth" else interop.save_safetensors)(model, second)
    back = interop.torch_simple_cnn().to(net.fc1.weight.dtype)
    if suffix == ".pth":
        back.load_state_dict(torch.load(second, weights_only=True))
    else:
        back.load_state_dict(safetensors.torch.load_file(second))
    _assert_identical(back.state_dict(), net.state_dict())
    assert sorted(os.listdir(tmp_path)) == sorted([first.name, second.name])  # no temp files


def test_state_dict_conversion_copies(backend):
    """The torch tensors must not alias the model's parameters (NumPy's state_dict does)."""
    model = xpcnn.SimpleCNN(device=backend)
    state = interop.to_torch_state_dict(model)
    before = to_numpy(model.fc2.bias.data).copy()
    state["fc2.bias"] += 1.0
    np.testing.assert_array_equal(to_numpy(model.fc2.bias.data), before)


def test_checkpoint_dicts_and_num_classes_are_understood(tmp_path):
    net = _torch_net("float32", num_classes=7)
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model_state_dict": net.state_dict(), "lr": 0.1}, path)
    model = interop.from_torch(path)
    assert model.num_classes == 7 and model.dtype == "float32"
    _assert_identical(interop.to_torch(model).state_dict(), net.state_dict())


def test_to_torch_of_a_custom_sequential(rng):
    nn = xpcnn.nn
    model = nn.Sequential(
        {
            "conv": nn.Conv2d(1, 3, 3, stride=1, padding=1, seed=1),
            "relu": nn.ReLU(),
            "flat": nn.Flatten(),
            "head": nn.Linear(3 * 5 * 5, 4, seed=2),
        }
    ).eval()
    x = rng.random((2, 1, 5, 5)).astype(np.float32)
    net = interop.to_torch(model)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    assert_close(model(x), expected, "float32", backend=xpcnn.get_backend("cpu"))


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failed save leaves the previous file intact and no temporary file behind."""
    path = tmp_path / "m.safetensors"
    model = xpcnn.SimpleCNN(seed=1)
    interop.save_safetensors(model, path)
    old = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        interop.save_safetensors(xpcnn.SimpleCNN(seed=2), path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["m.safetensors"]


# --- same predictions -----------------------------------------------------------------------------


def test_logits_agree_with_torch_on_the_whole_test_set(backend_dtype, trained, test_set):
    backend, dtype = backend_dtype
    images, labels = test_set
    model = interop.from_torch(interop.to_torch_state_dict(trained), device=backend, dtype=dtype)
    model.eval()
    net = interop.to_torch(model)
    x = images.astype(dtype)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    out = model(backend.asarray(x, dtype))
    assert_close(out, expected, dtype, "logits", backend=backend)
    got = to_numpy(out)
    assert got.shape == (1000, 10)
    assert np.array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    assert np.mean(expected.argmax(axis=1) == labels) > 0.8  # trained: no near-ties everywhere


# --- errors ---------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        interop.load_state_dict_file(path)


def test_unknown_extension_is_named(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights.npz: unknown weights file type '\.npz'"):
        interop.load_state_dict_file(path)


@pytest.mark.parametrize(
    "content, match",
    [
        ([1, 2, 3], "holds a list, not a mapping"),
        ({"conv1.weight": torch.zeros(2), "epoch": 3}, "entry 'epoch' is a int, not a tensor"),
    ],
)
def test_pth_that_is_not_a_state_dict(tmp_path, content, match):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=match) as info:
        interop.load_state_dict_file(path)
    assert "odd.pth" in str(info.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_file_is_named(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00not really a weights file" * 10)
    with pytest.raises(ValueError, match=f"broken{suffix}: not a readable"):
        interop.load_state_dict_file(path)


def test_wrong_keys_and_shapes_are_named():
    state = _torch_net("float32").state_dict()
    renamed = {k.replace("fc1", "dense1"): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"missing keys \['fc1.weight', 'fc1.bias'\]"):
        interop.from_torch(renamed)
    wrong = dict(state, **{"conv2.weight": torch.zeros(64, 32, 3, 3)})
    with pytest.raises(ValueError, match=r"'conv2.weight' has shape \(64, 32, 3, 3\)"):
        interop.from_torch(wrong)


def test_missing_torch_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'xpcnn\[torch\]'"):
        interop.torch_simple_cnn()


# --- xpcnn compare --------------------------------------------------------------------------------

QUICK = ["--limit", "40", "--latency-images", "3", "--naive-images", "1", "--repeats", "1"]
QUICK += ["--grad-batch", "8", "--threads", "1"]  # one thread: robust on a busy machine


@pytest.fixture(autouse=True)
def _no_warm_up(monkeypatch):
    """The timings of these quick runs mean nothing; skip the warm-up that makes real ones fair."""
    monkeypatch.setattr(compare, "WARM_UP_SECONDS", 0.0)


def test_compare_end_to_end(capsys, tmp_path, trained):
    weights = tmp_path / "trained.safetensors"
    interop.save_safetensors(trained, weights)
    report = tmp_path / "c.json"
    code = cli.main(["compare", "--weights", str(weights), "--json", str(report), *QUICK])
    out = capsys.readouterr().out
    assert code == 0
    assert "torch vs xpcnn" in out and "xpcnn vs naive" in out and "conv1.weight" in out
    r = json.loads(report.read_text())
    assert r["config"]["test_images"] == 40 and r["config"]["weights"] == str(weights)
    assert r["agreement_percent"] == {
        "torch-xpcnn": 100.0,
        "torch-naive": 100.0,
        "xpcnn-naive": 100.0,
    }
    assert max(r["max_abs_logit_diff"].values()) < 1e-4
    assert r["accuracy"]["torch"] > 0.8
    losses = r["train_step"]["loss"]
    assert losses["torch"] == pytest.approx(losses["naive"], rel=1e-5)
    assert losses["xpcnn"] == pytest.approx(losses["naive"], rel=1e-5)
    for name, diffs in r["train_step"]["max_abs_grad_diff"].items():
        scale = r["train_step"]["max_abs_grad"][name]
        assert max(diffs.values()) < 1e-4 * scale, name
    assert all(v > 0 for v in r["throughput_images_per_s"].values())


def test_compare_on_torch_tensors(capsys):
    assert cli.main(["compare", "--device", "torch:cpu", *QUICK]) == 0
    out = capsys.readouterr().out
    assert "xpcnn on torch:cpu" in out
    assert re.search(r"torch vs xpcnn\s+100\.00", out), out


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda d: d / "none.pth", "none.pth: no such weights file"),
        (lambda d: _write(d / "w.bin", b"junk"), "w.bin"),
        (lambda d: _save_renamed(d / "renamed.pth"), "missing keys"),
    ],
)
def test_compare_bad_weights_exit_2_with_one_line(capsys, tmp_path, make, match):
    path = make(tmp_path)
    code = cli.main(["compare", "--weights", str(path), *QUICK])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


def _write(path, data):
    path.write_bytes(data)
    return path


def _save_renamed(path):
    state = _torch_net("float32").state_dict()
    torch.save({k.replace("conv", "c"): v for k, v in state.items()}, path)
    return path


def test_compare_without_torch_exits_2_with_the_install_hint(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    code = cli.main(["compare", *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "pip install 'xpcnn[torch]'" in err


def test_example_script_runs(capsys, monkeypatch):
    path = pathlib.Path(__file__).parents[1] / "examples" / "compare_pytorch.py"
    monkeypatch.setattr(sys, "argv", [str(path), "--limit", "20", "--threads", "1"])
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert "bit for bit: True" in out
    assert re.search(r"torch vs xpcnn\s+100\.00", out), out
