"""The model zoo end to end: each model against an independently written torch.nn twin, its
recipe as train()'s defaults, exact resume with dropout and augmentation, checkpoints and
evaluate, interop files both ways, any torch nn.Sequential of supported layers both ways, the
naive reference and ``xpcnn compare``, and the command line's --model and --augment."""

import json
import signal
from collections import OrderedDict

import numpy as np
import pytest

import xpcnn
from xpcnn import cli, compare, interop, models, nn
from xpcnn import reference as R
from xpcnn import trainer as T
from xpcnn.backends import BackendUnavailable, get_backend
from xpcnn.step import TrainStep

from torch_model import torch_lenet5, torch_minivgg, torch_simple_cnn

torch = pytest.importorskip("torch")

TWINS = {"simplecnn": torch_simple_cnn, "lenet5": torch_lenet5, "minivgg": torch_minivgg}


def _no_dropout(net):
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


@pytest.mark.parametrize("name", models.names())
def test_zoo_model_matches_its_hand_written_torch_twin(name, rng):
    """State dict keys, order and shapes equal an independently written torch.nn model's; with
    its weights, logits (eval) and every gradient (training mode, dropout off) agree in
    float64; the torch twin built from the xpcnn layers (interop) has the same keys."""
    model = models.create(name, dtype="float64", seed=2)
    twin = TWINS[name]().double()
    ours, theirs = model.state_dict(), twin.state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert list(interop.torch_model(model).state_dict()) == list(ours)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in ours.items()})
    x, y = rng.random((6, 1, 28, 28)), rng.integers(0, 10, 6)
    twin.eval()
    with torch.no_grad():
        ref = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.eval()(x), ref, rtol=1e-10, atol=1e-12)
    twin.train()
    _no_dropout(twin)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.train()
    loss, g = xpcnn.functional.cross_entropy(model(x), y)
    model.backward(g)
    tloss = torch.nn.functional.cross_entropy(twin(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    assert float(loss) == pytest.approx(tloss.item(), rel=1e-12)
    for k, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, dict(twin.named_parameters())[k].grad.numpy(),
                                   rtol=1e-9, atol=1e-12, err_msg=k)  # fmt: skip


def test_zoo_configs_and_errors():
    assert models.names() == ["simplecnn", "lenet5", "minivgg"]
    for name in models.names():
        model = models.create(name, num_classes=7)
        assert nn.build(model.config()).config() == model.config()
        assert model(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 7)
    assert models.create("minivgg").config() == {
        "type": "MiniVGG", "num_classes": 10, "widths": [32, 64, 128], "convs": [1, 1, 2],
        "hidden": 256, "dropout": 0.5,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"unknown model 'vgg16'.*simplecnn"):
        models.create("vgg16")
    with pytest.raises(ValueError, match="activation must be one of"):
        models.LeNet5(activation="swish")
    assert models.recipe("minivgg").settings()["augment"] == "crop2+flip"


def test_train_by_name_uses_the_recipe(small):
    r = T.train(model="lenet5", dataset=small, epochs=1, progress=False)
    assert isinstance(r.model, models.LeNet5)
    assert r.optimizer.hyper["lr"] == models.recipe("lenet5").lr
    r = T.train(model="minivgg", dataset=small, epochs=1, lr=0.01, augment="flip", progress=False)
    assert r.optimizer.hyper["lr"] == 0.01 and r.optimizer.hyper["weight_decay"] == 5e-4
    with pytest.raises(ValueError, match="augment: unknown part 'spin'"):
        T.train(dataset=small, augment="spin", progress=False)


def test_a_zoo_name_is_the_zoo_model_even_beside_a_file_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lenet5").write_text("not a config")
    (tmp_path / "mine").write_text("{}")
    assert not models.is_config_path("lenet5") and not models.is_config_path("LeNet5")
    assert models.is_config_path("mine") and models.is_config_path("net.json")


def test_a_model_with_batch_norm_without_running_statistics_trains(small):
    """Its eval output uses the batch's statistics; the trainer's one-sample shape probe and a
    last evaluation batch of one image must not stop it."""
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16, track_running_stats=False),
        nn.ReLU(), nn.Linear(16, 10),
    )  # fmt: skip
    r = T.train(model, dataset=small, epochs=1, eval_batch_size=63, progress=False)
    assert np.isfinite(r.history[-1]["test_loss"])


def test_a_checkpoint_from_before_the_pooling_arguments_resumes_into_a_model(small, tmp_path):
    """Configs saved before MaxPool2d/AvgPool2d took PyTorch's full signatures lack the new
    arguments: resuming into a model object compares the rebuilt configs, so they match."""
    from xpcnn import checkpoint as ckpt

    def make():
        return nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(4 * 6 * 6, 10),
        )  # fmt: skip

    path = tmp_path / "old.ckpt"
    T.train(make(), dataset=small, epochs=1, checkpoint=path, progress=False)
    arrays, meta = ckpt.load(path)
    new = ("dilation", "return_indices", "ceil_mode", "divisor_override")
    for layer in meta["model"]["layers"]:
        for key in new:
            layer.pop(key, None)
    ckpt.save(path, arrays, meta)
    assert not any(k in layer for layer in ckpt.load(path)[1]["model"]["layers"] for k in new)
    r = T.train(make(), dataset=small, epochs=2, checkpoint=path, resume=True, progress=False)
    assert len(r.history) == 2


def test_a_zoo_model_object_trains_with_its_recipe_too(small):
    """``train(models.create("lenet5"))`` and ``xpcnn.compare(..., train_epochs=)``, which
    passes the model object, get the same recipe as the name; other models the defaults."""
    r = T.train(models.create("lenet5"), dataset=small, epochs=1, progress=False)
    assert r.optimizer.hyper["lr"] == models.recipe("lenet5").lr != T.DEFAULTS["sgd"]["lr"]
    assert models.recipe_of(r.model) is models.recipe("lenet5")
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    assert models.recipe_of(other) is None
    simple = models.recipe("simplecnn")  # what "the defaults" means for any other model
    assert (simple.epochs, simple.lr, simple.momentum) == (
        T.DEFAULT_EPOCHS,
        T.DEFAULTS["sgd"]["lr"],
        T.DEFAULTS["sgd"]["momentum"],
    )
    assert (simple.batch_size, simple.optimizer, simple.weight_decay) == (128, "sgd", 0.0)
    assert (simple.schedule, simple.augment) == ("cosine", "none")
    r = T.train(other, dataset=small, epochs=1, progress=False)
    assert r.optimizer.hyper["lr"] == T.DEFAULTS["sgd"]["lr"]


def test_another_optimizer_than_the_recipes_takes_its_own_defaults(small):
    """The recipe's lr and momentum belong to its optimizer: asking for Adam on a zoo model (the
    command line's default model is one) gives Adam's defaults, not SGD's lr 0.1 and a momentum
    Adam refuses."""
    r = T.train(model="simplecnn", dataset=small, epochs=1, optimizer="adam", progress=False)
    assert r.optimizer.hyper["lr"] == T.DEFAULTS["adam"]["lr"]
    r = T.train(model="lenet5", dataset=small, epochs=1, optimizer="adam", lr=0.002, progress=False)
    assert r.optimizer.hyper["lr"] == 0.002
    with pytest.raises(ValueError, match="momentum applies to sgd"):
        T.train(model="lenet5", dataset=small, epochs=1, optimizer="adam", momentum=0.5)


def test_train_from_a_json_config(small, tmp_path):
    config = nn.Sequential(
        {"conv": nn.Conv2d(1, 2, 3, stride=3), "act": nn.ELU(), "pool": nn.AdaptiveAvgPool2d(2),
         "flat": nn.Flatten(), "fc": nn.Linear(8, 10)}
    ).config()  # fmt: skip
    path = tmp_path / "net.json"
    path.write_text(json.dumps(config))
    r = T.train(model=str(path), dataset=small, epochs=1, progress=False)
    assert r.model.config() == config


def _tiny(seed=0):
    """28x28 in, batch norm and dropout inside: small enough for a resume test."""
    return nn.Sequential(
        {
            "conv": nn.Conv2d(1, 4, 3, stride=2, padding=1, seed=seed),
            "bn": nn.BatchNorm2d(4),
            "relu": nn.ReLU(),
            "pool": nn.MaxPool2d(2),
            "flatten": nn.Flatten(),
            "drop": nn.Dropout(0.3),
            "fc": nn.Linear(4 * 7 * 7, 10, seed=seed + 1),
        }
    )


@pytest.mark.parametrize("device", ["cpu", "jax:cpu"])
def test_resume_with_dropout_and_augmentation_is_exact(small, tmp_path, monkeypatch, device):
    """Ctrl-C in the middle of epoch 2 and resume: weights, batch-norm statistics and the
    device generator end exactly (bit for bit) where an uninterrupted run ends."""
    try:
        get_backend(device)
    except BackendUnavailable as exc:
        pytest.skip(str(exc))
    kw = {"dataset": small, "epochs": 2, "batch_size": 64, "progress": False, "device": device,
          "augment": "crop2+flip", "seed": 4}  # fmt: skip
    full = T.train(_tiny(), **kw)
    calls = {"n": 0}
    real = TrainStep.__call__

    def interrupting(self, x, y, lr):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, step 2
            signal.raise_signal(signal.SIGINT)
        return real(self, x, y, lr)

    monkeypatch.setattr(TrainStep, "__call__", interrupting)
    path = tmp_path / "run.ckpt"
    with pytest.raises(T.TrainingInterrupted, match="epoch 2, step 2"):
        T.train(_tiny(), checkpoint=path, **kw)
    monkeypatch.setattr(TrainStep, "__call__", real)
    resumed = T.train(checkpoint=path, resume=True, **{**kw, "augment": None})
    assert resumed.model.config() == full.model.config()
    for k, v in full.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[k], v, err_msg=k)
    assert resumed.step.generator.state() == full.step.generator.state()
    assert [r["train_loss"] for r in resumed.history] == pytest.approx(
        [r["train_loss"] for r in full.history], rel=1e-6
    )  # the interrupted epoch's mean is summed in two parts
    if device == "cpu":  # augmentation did something: the test is not vacuous
        plain = T.train(_tiny(), **{**kw, "augment": "none"})
        assert not np.array_equal(
            plain.model.state_dict()["fc.weight"], full.model.state_dict()["fc.weight"]
        )


def test_checkpoint_evaluate_and_load_for_every_zoo_model(small, tmp_path):
    for name in models.names():
        path = tmp_path / f"{name}.ckpt"
        r = T.train(model=name, dataset=small, epochs=1, progress=False, checkpoint=path)
        model, meta = T.load_checkpoint(path)
        assert type(model) is type(r.model)
        assert meta["augment"] == models.recipe(name).augment
        for k, v in r.model.state_dict().items():
            np.testing.assert_array_equal(model.state_dict()[k], v, err_msg=k)
        result = T.evaluate(model, small)
        assert result.accuracy == pytest.approx(r.history[-1]["test_accuracy"])


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_interop_files_both_ways_for_every_zoo_model(name, suffix, tmp_path, rng):
    """xpcnn -> file -> torch twin, and torch -> file -> xpcnn (the zoo model recognised from the
    names and shapes): the same logits, batch-norm buffers included."""
    model = models.create(name, seed=3)
    if name == "minivgg":  # non-trivial running statistics and counter
        model.train()(rng.random((8, 1, 28, 28)).astype(np.float32))
    path = tmp_path / f"w{suffix}"
    (interop.save_pth if suffix == ".pth" else interop.save_safetensors)(model, path)
    twin = TWINS[name]()
    twin.load_state_dict(
        {k: torch.from_numpy(v) for k, v in interop.load_state_dict_file(path).items()}
    )
    x = rng.random((5, 1, 28, 28)).astype(np.float32)
    with torch.no_grad():
        ref = twin.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.eval()(x), ref, rtol=1e-5, atol=1e-5)
    back = interop.from_torch(path)
    assert type(back) is type(model) and back.config() == model.config()
    np.testing.assert_array_equal(back.eval()(x), model(x))


def _all_layers_torch():
    T_ = torch.nn
    return T_.Sequential(OrderedDict(
        conv=T_.Conv2d(1, 4, 3, padding=1), bn=T_.BatchNorm2d(4), act=T_.GELU(approximate="tanh"),
        pool=T_.MaxPool2d(2), block=T_.Sequential(T_.Conv2d(4, 6, (3, 2), stride=(1, 2)),
        T_.LeakyReLU(0.1), T_.AvgPool2d(2, count_include_pad=False)), gap=T_.AdaptiveAvgPool2d(1),
        flatten=T_.Flatten(), fc=T_.Linear(6, 5), bn1=T_.BatchNorm1d(5), elu=T_.ELU(0.7),
        drop=T_.Dropout(0.2), fc2=T_.Linear(5, 4, bias=False), gelu=T_.GELU(), tanh=T_.Tanh(),
        head=T_.Linear(4, 3), sig=T_.Sigmoid(),
    ))  # fmt: skip


def test_a_torch_sequential_of_every_supported_layer_converts_both_ways(rng):
    """from_torch builds the same layers under the same names; logits (eval) and gradients
    (train, dropout off) agree with torch; to_torch gives back an equivalent torch model."""
    net = _all_layers_torch().double()
    net.train()
    net(torch.from_numpy(rng.random((6, 1, 10, 12))))  # non-trivial running statistics
    model = interop.from_torch(net)
    assert model.dtype == "float64" and list(model.state_dict()) == list(net.state_dict())
    x = rng.random((5, 1, 10, 12))
    net.eval()
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model.eval()(x), ref, rtol=1e-10, atol=1e-12)
    back = interop.to_torch(model)
    assert repr(back) == repr(net.eval())
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(x)).numpy(), ref, rtol=1e-12)
    _no_dropout(net)
    model.drop.p = 0.0
    net.train()
    model.train()
    y = rng.integers(0, 3, 5)
    _, g = xpcnn.functional.cross_entropy(model(x), y)
    model.backward(g)
    torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    for k, p in net.named_parameters():
        np.testing.assert_allclose(dict(model.named_parameters())[k].grad, p.grad.numpy(),
                                   rtol=1e-9, atol=1e-12, err_msg=k)  # fmt: skip


def test_from_torch_refuses_layers_without_a_twin():
    with pytest.raises(TypeError, match="no xpcnn layer for torch.nn.Softplus"):
        interop.from_torch(torch.nn.Sequential(torch.nn.Softplus()))
    with pytest.raises(TypeError, match="MaxPool2d with ceil_mode"):
        interop.from_torch(torch.nn.Sequential(torch.nn.MaxPool2d(2, ceil_mode=True)))


@pytest.mark.parametrize("name", models.names())
def test_reference_matches_torch_for_every_zoo_model(name, rng):
    """The naive loops read the layout from the model's config and agree with torch autograd
    to float64 rounding: eval logits, and the loss and gradients in training mode."""
    model = models.create(name, dtype="float64", seed=5)
    layout = nn.Sequential.config(model)
    net = TWINS[name]().double()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    x, y = rng.random((3, 1, 28, 28)), rng.integers(0, 10, 3)
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        R.forward(model.state_dict(), x, layout), ref, rtol=1e-10, atol=1e-13
    )
    net.train()
    _no_dropout(net)
    tloss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    tloss.backward()
    loss, grads = R.loss_and_grads(model.state_dict(), x, y, layout)
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    assert list(grads) == [k for k, _ in net.named_parameters()]
    for k, p in net.named_parameters():
        np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)


def test_reference_covers_every_supported_layer(rng):
    net = _all_layers_torch().double()
    model = interop.from_torch(net)
    layout = nn.Sequential.config(model)
    x, y = rng.random((4, 1, 10, 12)), rng.integers(0, 3, 4)
    with torch.no_grad():
        ref = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(R.forward(model.state_dict(), x, layout), ref, rtol=1e-10)
    net.train()
    _no_dropout(net)
    torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    _, grads = R.loss_and_grads(model.state_dict(), x, y, layout)
    for k, p in net.named_parameters():
        np.testing.assert_allclose(grads[k], p.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=k)


def test_compare_runs_for_zoo_models(tmp_path, capsys):
    """MiniVGG (batch norm, max pooling, dropout) through compare(), LeNet-5 (tanh, average
    pooling) through ``xpcnn compare --weights``."""
    r = compare.compare(model="minivgg", limit=20, latency_images=2, naive_images=1, repeats=1,
                        grad_batch=4, batch_size=10)  # fmt: skip
    assert r["agreement_percent"]["torch-xpcnn"] == 100.0
    for name, diffs in r["train_step"]["max_abs_grad_diff"].items():
        scale = r["train_step"]["max_abs_grad"][name]
        assert diffs["torch-naive"] < 1e-5 * scale and diffs["xpcnn-naive"] < 1e-4 * scale, name
    assert r["config"]["model"]["type"] == "MiniVGG"
    path = tmp_path / "lenet5.safetensors"
    interop.save_safetensors(models.create("lenet5", seed=1), path)
    code = cli.main(["compare", "--weights", str(path), "--limit", "10", "--latency-images", "1",
                     "--naive-images", "1", "--repeats", "1", "--grad-batch", "2"])  # fmt: skip
    assert code == 0 and "dropout off" in capsys.readouterr().out


def _write_idx(path, array):
    import gzip
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    with gzip.open(path, "wb") as f:
        f.write(header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def test_cli_model_and_augment(tmp_path, capsys, small):
    d = tmp_path / "data"
    d.mkdir()
    _write_idx(d / "train-images-idx3-ubyte.gz", small.train_images)
    _write_idx(d / "train-labels-idx1-ubyte.gz", small.train_labels)
    _write_idx(d / "t10k-images-idx3-ubyte.gz", small.test_images)
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", small.test_labels)
    ckpt = tmp_path / "m.ckpt"
    code = cli.main(["train", "--model", "lenet5", "--dataset", str(d), "--epochs", "1",
                     "--augment", "flip", "--checkpoint", str(ckpt), "--no-progress"])  # fmt: skip
    assert code == 0
    _, meta = T.load_checkpoint(ckpt)
    assert meta["model"]["type"] == "LeNet5" and meta["augment"] == "flip"
    assert meta["optimizer"]["hyper"]["lr"] == models.recipe("lenet5").lr
    assert cli.main(["train", "--model", "resnet", "--dataset", str(d)]) == 2
    assert "unknown model 'resnet'" in capsys.readouterr().err
    assert cli.main(["train", "--augment", "spin", "--dataset", str(d)]) == 2
    assert "augment: unknown part" in capsys.readouterr().err
