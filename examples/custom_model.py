"""A Sequential model of your own, trained by the same trainer as SimpleCNN.

    python examples/custom_model.py [--device torch]

Every layer's forward and backward is xpcnn's own Array API code; swap layers, kernel sizes,
strides and paddings freely. The trainer only needs (N, 1, 28, 28) in and (N, 10) logits out.
"""

import argparse

import xpcnn
from xpcnn import nn


def make_model(seed=0):
    return nn.Sequential(
        {
            "conv1": nn.Conv2d(1, 16, 3, stride=1, padding=1, seed=seed),  # 16x28x28
            "relu1": nn.ReLU(),
            "conv2": nn.Conv2d(16, 32, 3, stride=3, padding=0, seed=seed + 1),  # 32x9x9
            "relu2": nn.ReLU(),
            "flatten": nn.Flatten(),
            "fc": nn.Linear(32 * 9 * 9, 10, seed=seed + 2),
        }
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()

    model = make_model()
    print(model)
    result = xpcnn.train(model, device=args.device, epochs=args.epochs, optimizer="adam", lr=2e-3)
    final = xpcnn.evaluate(model)
    print(
        f"{sum(p.data.size for p in model.parameters())} parameters, "
        f"test accuracy {final.accuracy:.3f} after {len(result.history)} epochs"
    )


if __name__ == "__main__":
    main()
