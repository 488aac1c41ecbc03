"""PyTorch and xpcnn, interchangeably: one set of weights in both, then the three-way comparison.

python examples/compare_pytorch.py                      # fresh weights, NumPy on the CPU
python examples/compare_pytorch.py --train-epochs 2     # train with xpcnn first
python examples/compare_pytorch.py --device torch:cpu   # xpcnn's layers on torch tensors

The comparison is the one ``xpcnn compare`` prints (see ``xpcnn compare --help`` for every option).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

import xpcnn
from xpcnn import compare, interop


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-epochs", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()

    # 1. A PyTorch model's weights into xpcnn and back: same names, same layouts, same bits.
    torch.manual_seed(0)
    net = interop.torch_simple_cnn()
    model = interop.from_torch(net, device=args.device)
    back = interop.to_torch(model)
    same = all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())
    print(f"torch -> xpcnn ({model.backend.name}) -> torch, bit for bit: {same}")

    # 2. Through files: a .safetensors written by xpcnn, read by PyTorch (and xpcnn).
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "simple_cnn.safetensors"
        interop.save_safetensors(model, path)
        net.load_state_dict(
            {k: torch.from_numpy(v) for k, v in interop.load_state_dict_file(path).items()}
        )
        images = xpcnn.datasets.load().test_images[:8, None].astype(np.float32) / 255
        with torch.no_grad():
            expected = net(torch.from_numpy(images)).numpy()
        model.eval()
        got = model.backend.to_host(model(model.backend.asarray(images, "float32")))
        print(f"logits of 8 test digits, max |xpcnn - torch|: {np.abs(got - expected).max():.2e}")

    # 3. The full comparison: agreement, latency, throughput and gradients of all three.
    result = compare.compare(
        device=args.device,
        train_epochs=args.train_epochs or None,
        limit=args.limit,
        threads=args.threads,
    )
    print()
    print(compare.format_report(result))


if __name__ == "__main__":
    main()
