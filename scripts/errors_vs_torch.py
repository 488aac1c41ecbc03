"""Max relative errors of SimpleCNN's forward and backward against PyTorch autograd, per backend
and dtype: the figures the core-engine issue asks for.

    python scripts/errors_vs_torch.py                 # every backend available here

For each backend and dtype, one batch of 16 embedded digits goes through xpcnn's SimpleCNN
(forward, softmax cross-entropy, backward) and through the same network in torch.nn with the same
weights, autograd in float64 on the CPU. Each figure is max |xpcnn - torch| / max |torch| over
the logits, the loss, dL/dx and every parameter gradient; the table gives the largest of them,
and which quantity it was. The dilation and col2im input gradients are both checked.
"""

import sys

import numpy as np
import torch

import xpcnn
from xpcnn import functional as F
from xpcnn.backends import BackendUnavailable, get_backend, to_numpy
from xpcnn.conv import INPUT_GRAD_METHODS
from xpcnn.interop import to_torch

SPECS = [
    "cpu",
    "strict:cpu",
    "strict:device1",
    "strict:no_float64",
    "torch:cpu",
    "cuda:0",
    "torch:cuda:0",
]


def torch_reference(model, x, t):
    net = to_torch(model).double()
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    logits = net(tx)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(t))
    loss.backward()
    ref = {
        "logits": logits.detach().numpy(),
        "loss": loss.detach().numpy(),
        "dL/dx": tx.grad.numpy(),
    }
    ref.update({f"grad {k}": p.grad.numpy() for k, p in net.named_parameters()})
    return ref


def ours(model, backend, dtype, x, t):
    logits = model(backend.asarray(x, dtype))
    loss, g = F.cross_entropy(logits, backend.asarray(t, "int64"))
    dx = model.backward(g)
    got = {"logits": logits, "loss": loss, "dL/dx": dx}
    got.update({f"grad {k}": p.grad for k, p in model.named_parameters()})
    return {k: to_numpy(v).astype(np.float64) for k, v in got.items()}


def main():
    data = xpcnn.datasets.load("mnist-5k")
    x = data.test_images[:16, None] / 255.0
    t = data.test_labels[:16].astype(np.int64)
    print(f"{'backend':<20}{'dtype':<9}{'method':<10}{'max rel err':>12}  worst quantity")
    for spec in SPECS:
        try:
            backend = get_backend(spec)
        except BackendUnavailable as exc:
            print(f"{spec:<20}unavailable: {exc}")
            continue
        for dtype in ("float32", "float64"):
            if dtype == "float64" and spec == "strict:no_float64":
                continue
            for method in INPUT_GRAD_METHODS:
                model = xpcnn.SimpleCNN(seed=1, dtype=dtype, device=spec, input_grad=method)
                ref = torch_reference(xpcnn.SimpleCNN(seed=1, dtype="float64"), x, t)
                got = ours(model, backend, dtype, x, t)
                errs = {k: float(np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()) for k in ref}
                worst = max(errs, key=errs.get)
                print(f"{spec:<20}{dtype:<9}{method:<10}{errs[worst]:>12.2e}  {worst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
