"""The naive loop reference (`xpcnn.reference`) against PyTorch autograd, in float64."""

import ast
import pathlib

import numpy as np
import pytest

import xpcnn
from xpcnn import datasets
from xpcnn import reference as R

from torch_model import torch_simple_cnn

torch = pytest.importorskip("torch")

TIGHT = {"rtol": 1e-10, "atol": 1e-13}
#: SimpleCNN's layout, read from its config (the reference spells no architecture itself).
LAYOUT = xpcnn.nn.Sequential.config(xpcnn.SimpleCNN())


@pytest.fixture(scope="module")
def net_and_batch():
    """A float64 torch SimpleCNN with PyTorch's random init and 16 real digits with labels."""
    torch.manual_seed(7)
    net = torch_simple_cnn().double()
    d = datasets.load("mnist-5k")
    x = d.train_images[:16, None].astype(np.float64) / 255
    y = d.train_labels[:16].astype(np.int64)
    state = {k: v.numpy() for k, v in net.state_dict().items()}
    return net, state, x, y


def test_forward_matches_torch(net_and_batch):
    net, state, x, _ = net_and_batch
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    logits = R.forward(state, x, LAYOUT)
    assert logits.dtype == np.float64 and logits.shape == (16, 10)
    np.testing.assert_allclose(logits, expected, **TIGHT)


def test_loss_and_every_gradient_match_autograd(net_and_batch):
    net, state, x, y = net_and_batch
    net.zero_grad()
    loss_t = torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
    loss_t.backward()
    loss, grads = R.loss_and_grads(state, x, y, LAYOUT)
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    assert list(grads) == [k for k, _ in net.named_parameters()]
    for name, p in net.named_parameters():
        expected = p.grad.numpy()
        assert grads[name].shape == expected.shape, name
        assert np.abs(expected).max() > 0, f"{name}: a zero gradient would test nothing"
        np.testing.assert_allclose(grads[name], expected, err_msg=name, **TIGHT)


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 2), (2, 1), (3, 2)])
def test_conv_loops_match_torch_for_other_shapes(rng, stride, padding):
    """The loops are generic: odd sizes, 3x3 kernels, padding wider than the stride."""
    x = torch.from_numpy(rng.standard_normal((2, 3, 9, 7))).requires_grad_()
    w = torch.from_numpy(rng.standard_normal((4, 3, 3, 3))).requires_grad_()
    b = torch.from_numpy(rng.standard_normal(4)).requires_grad_()
    z = torch.nn.functional.conv2d(x, w, b, stride=stride, padding=padding)
    g = rng.standard_normal(tuple(z.shape))
    z.backward(torch.from_numpy(g))
    args = (x.detach().numpy(), w.detach().numpy())
    np.testing.assert_allclose(
        R.conv2d(*args, b.detach().numpy(), stride, padding), z.detach().numpy(), **TIGHT
    )
    dx, dw, db = R.conv2d_backward(g, *args, stride, padding)
    for got, ref in ((dx, x), (dw, w), (db, b)):
        np.testing.assert_allclose(got, ref.grad.numpy(), **TIGHT)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 2000.0, 0.0]])
    loss, grad = R.cross_entropy(logits, np.array([0, 0]))
    assert np.isfinite(loss) and loss == pytest.approx(1000.0)  # second row: -log p = 2000
    np.testing.assert_allclose(grad, [[0, 0, 0], [-0.5, 0.5, 0]], atol=1e-12)


def test_missing_parameters_are_named(net_and_batch):
    _, state, x, _ = net_and_batch
    partial = {k: v for k, v in state.items() if k != "conv2.bias"}
    with pytest.raises(ValueError, match="conv2.bias"):
        R.forward(partial, x, LAYOUT)


def test_reference_is_independent_of_xpcnn_math():
    """It must import nothing from xpcnn (least of all conv/functional), only NumPy and math."""
    tree = ast.parse(pathlib.Path(R.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {"numpy", "math", "__future__"}, imported
