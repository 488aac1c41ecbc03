"""SimpleCNN and the layer objects: agreement with torch.nn, state dicts, devices, errors."""

import ast
import pathlib

import numpy as np
import pytest

import xpcnn
from xpcnn import conv, nn
from xpcnn import functional as F
from xpcnn.backends import to_numpy

from conftest import assert_close
from torch_model import torch_simple_cnn


def _torch_twin(model, dtype):
    torch = pytest.importorskip("torch")
    net = torch_simple_cnn(model.num_classes).to(getattr(torch, dtype))
    net.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    return net


@pytest.mark.parametrize("method", conv.INPUT_GRAD_METHODS)
def test_simple_cnn_matches_torch(backend_dtype, rng, method):
    """The whole network, forward and backward, with the same weights as the torch.nn model."""
    torch = pytest.importorskip("torch")
    backend, dtype = backend_dtype
    model = xpcnn.SimpleCNN(seed=3, dtype=dtype, device=backend.name, input_grad=method)
    net = _torch_twin(model, dtype)
    x = rng.random((5, 1, 28, 28))
    t = rng.integers(0, 10, 5)

    tx = torch.tensor(x, dtype=net.conv1.weight.dtype, requires_grad=True)
    tloss = torch.nn.functional.cross_entropy(net(tx), torch.tensor(t))
    tloss.backward()

    logits = model(backend.asarray(x, dtype))
    loss, g = F.cross_entropy(logits, backend.asarray(t, "int64"))
    dx = model.backward(g)
    assert backend.owns(logits) and backend.owns(dx)
    assert_close(logits, net(tx).detach().numpy(), dtype, "logits", backend=backend)
    assert_close(loss, tloss.item(), dtype, "loss", backend=backend)
    assert_close(dx, tx.grad.numpy(), dtype, "input grad", backend=backend)
    for (name, p), (tname, tp) in zip(
        model.named_parameters(), net.named_parameters(), strict=True
    ):
        assert name == tname
        assert backend.owns(p.grad)
        assert_close(p.grad, tp.grad.numpy(), dtype, name, backend=backend)


def test_training_backward_skips_data_gradient(backend, rng):
    model = xpcnn.SimpleCNN(device=backend.name)
    logits = model(backend.asarray(rng.random((2, 1, 28, 28)), "float32"))
    _, g = F.cross_entropy(logits, backend.asarray([1, 2], "int64"))
    assert model.backward(g, need_input_grad=False) is None
    assert all(p.grad is not None for p in model.parameters())


def test_same_seed_same_weights_on_every_backend(backend):
    ref = xpcnn.SimpleCNN(seed=7).state_dict()
    got = xpcnn.SimpleCNN(seed=7, device=backend.name).state_dict()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    other = xpcnn.SimpleCNN(seed=8).state_dict()
    assert not np.array_equal(other["fc1.weight"], ref["fc1.weight"])


def test_init_matches_pytorch_default_bounds():
    sd = xpcnn.SimpleCNN(seed=0, dtype="float64").state_dict()
    for name, fan_in in [("conv1", 4), ("conv2", 128), ("conv3", 256), ("fc1", 2048), ("fc2", 250)]:
        for suffix in ("weight", "bias"):
            v = sd[f"{name}.{suffix}"]
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(v).max() <= bound
            if v.size > 100:  # uniform: the extremes come close to the bound, the mean to 0
                assert np.abs(v).max() > 0.95 * bound and abs(v.mean()) < 0.1 * bound


def test_state_dict_names_and_layouts():
    sd = xpcnn.SimpleCNN().state_dict()
    assert {k: v.shape for k, v in sd.items()} == {
        "conv1.weight": (32, 1, 2, 2),
        "conv1.bias": (32,),
        "conv2.weight": (64, 32, 2, 2),
        "conv2.bias": (64,),
        "conv3.weight": (128, 64, 2, 2),
        "conv3.bias": (128,),
        "fc1.weight": (250, 2048),
        "fc1.bias": (250,),
        "fc2.weight": (10, 250),
        "fc2.bias": (10,),
    }
    assert all(v.dtype == np.float32 for v in sd.values())


def test_load_state_dict_from_torch_tensors_keeps_dtype(backend):
    pytest.importorskip("torch")
    net = torch_simple_cnn()
    model = xpcnn.SimpleCNN(device=backend.name)
    model.load_state_dict(net.double().state_dict())  # float64 tensors into a float32 model
    sd = model.state_dict()
    assert sd["fc1.weight"].dtype == np.float32
    np.testing.assert_allclose(sd["conv2.weight"], net.conv2.weight.detach().numpy(), rtol=1e-6)
    assert backend.owns(model.fc2.weight.data)


def test_load_state_dict_refuses_bad_mappings():
    model = xpcnn.SimpleCNN()
    before = model.state_dict()
    sd = dict(before)
    del sd["conv1.bias"]
    sd["conv9.weight"] = np.zeros(3)
    with pytest.raises(
        ValueError,
        match=r"missing keys \['conv1.bias'\].*unexpected keys "
        r"\['conv9.weight'\]",
    ):
        model.load_state_dict(sd)
    bad = dict(
        before,
        **{"fc1.weight": np.zeros((250, 2047), np.float32), "fc2.bias": np.ones(10, np.float32)},
    )
    with pytest.raises(ValueError, match=r"'fc1.weight' has shape \(250, 2047\).*\(250, 2048\)"):
        model.load_state_dict(bad)
    # nothing was changed by the refused calls
    np.testing.assert_array_equal(model.state_dict()["fc2.bias"], before["fc2.bias"])
    with pytest.raises(TypeError, match="mapping"):
        model.load_state_dict([("fc1.weight", 1)])


def test_to_moves_and_casts(backend):
    model = xpcnn.SimpleCNN(seed=1)
    ref = model.state_dict()
    model.to(backend.name)
    assert all(backend.owns(p.data) for p in model.parameters())
    assert model.backend is backend and model.conv2.backend is backend
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, ref[k])
    if backend.name != "strict:no_float64":
        model.to(dtype="float64")
        assert model.state_dict()["fc1.weight"].dtype == np.float64
    model.to("cpu")
    assert isinstance(model.fc1.weight.data, np.ndarray)


def test_eval_mode_keeps_no_cache(rng):
    model = xpcnn.SimpleCNN().eval()
    model(rng.random((2, 1, 28, 28), dtype=np.float32))
    assert all(m._cache is None for m in model.modules())
    with pytest.raises(RuntimeError, match="needs a forward"):
        model.backward(np.zeros((2, 10), np.float32))


def test_sequential_custom_model_and_build(backend, rng):
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, seed=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=3, seed=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 10, seed=3),
    ).to(backend.name)
    x = backend.asarray(rng.random((2, 1, 9, 9)), "float32")
    y = model(x)
    assert y.shape == (2, 10) and backend.owns(y)
    assert [n for n, _ in model.named_parameters()][:2] == ["0.weight", "0.bias"]
    twin = nn.build(model.config(), device=backend.name)
    twin.load_state_dict(model.state_dict())
    assert_close(twin(x), to_numpy(y), "float32", backend=backend)
    assert isinstance(model[0], nn.Conv2d) and len(model) == 6


# --- errors name the layer, the expected and the actual shapes ---------------------------------


def test_wrong_channel_count_is_named():
    with pytest.raises(
        ValueError, match=r"Conv2d 'conv1'.*expected 1 input channels.*\(4, 3, 28, 28\)"
    ):
        xpcnn.SimpleCNN()(np.zeros((4, 3, 28, 28), np.float32))


def test_non_4d_input_is_named():
    with pytest.raises(ValueError, match=r"Conv2d 'conv1'.*4-D input.*got shape \(28, 28\)"):
        xpcnn.SimpleCNN()(np.zeros((28, 28), np.float32))


def test_input_smaller_than_kernel():
    layer = nn.Conv2d(1, 2, 5)
    with pytest.raises(ValueError, match=r"input 3x3 .*smaller than the 5x5 kernel"):
        layer(np.zeros((1, 1, 3, 3), np.float32))


def test_wrong_image_size_is_caught_at_the_linear_layer():
    with pytest.raises(ValueError, match=r"Linear 'fc1'.*2048 input features.*\(1, 3200\)"):
        xpcnn.SimpleCNN()(np.zeros((1, 1, 40, 40), np.float32))


def test_mismatched_gradient_shape():
    model = xpcnn.SimpleCNN()
    model(np.zeros((3, 1, 28, 28), np.float32))
    with pytest.raises(
        ValueError, match=r"Linear 'fc2'.*grad_out of shape \(3, 10\), got \(3, 9\)"
    ):
        model.backward(np.zeros((3, 9), np.float32))
    layer = nn.Conv2d(2, 3, 2, stride=2)
    layer(np.zeros((1, 2, 6, 6), np.float32))
    with pytest.raises(ValueError, match=r"Conv2d.*\(1, 3, 3, 3\), got \(1, 3, 4, 4\)"):
        layer.backward(np.zeros((1, 3, 4, 4), np.float32))


def test_dtype_and_device_mismatch():
    model = xpcnn.SimpleCNN()
    with pytest.raises(TypeError, match="input dtype float64 does not match the layer's float32"):
        model(np.zeros((1, 1, 28, 28)))
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="backend 'cpu'"):
        model(torch.zeros((1, 1, 28, 28)))
    with pytest.raises(TypeError, match="expected an array, got list"):
        model([[0.0]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"kernel_size": 0}, "kernel_size and stride must be >= 1"),
        ({"stride": 0}, "kernel_size and stride must be >= 1"),
        ({"padding": -1}, "padding must be non-negative"),
        ({"input_grad": "magic"}, "input_grad must be one of"),
    ],
)
def test_conv_constructor_errors(kwargs, match):
    args = {"in_channels": 1, "out_channels": 2, "kernel_size": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        nn.Conv2d(**args)


def test_layer_modules_do_not_import_numpy():
    """The math and the layers are pure Array API: no NumPy import anywhere in them."""
    root = pathlib.Path(xpcnn.__file__).parent
    for name in ("conv.py", "functional.py", "nn.py", "pool.py", "layers.py", "augment.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "numpy" for a in node.names), name
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "numpy", name


@pytest.mark.gpu
def test_tf32_stays_within_the_gpu_tolerance(rng):
    """With TF32 matrix products switched on, the float32 network on torch CUDA still meets the
    GPU tolerance against a float64 reference: the tests hold with and without TF32."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    from xpcnn.backends import get_backend

    backend = get_backend("torch:cuda:0")
    ref = xpcnn.SimpleCNN(seed=4, dtype="float64")
    model = xpcnn.SimpleCNN(seed=4, device=backend.name)
    x = rng.random((16, 1, 28, 28))
    t = rng.integers(0, 10, 16)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        logits = model(backend.asarray(x, "float32"))
        _, g = F.cross_entropy(logits, backend.asarray(t, "int64"))
        model.backward(g)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    ref_logits = ref(x)
    _, ref_g = F.cross_entropy(ref_logits, t)
    ref.backward(ref_g)
    assert_close(logits, ref_logits, "float32", "logits, TF32", backend=backend)
    for (name, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert_close(p.grad, rp.grad, "float32", f"{name} grad, TF32", backend=backend)
