"""Train the seed notebook's CNN on the embedded MNIST digits with the Python API, end to end.

python examples/train_mnist.py                  # NumPy on the CPU
python examples/train_mnist.py --device cuda    # CuPy on the first GPU
"""

import argparse

import numpy as np

import xpcnn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()

    data = xpcnn.datasets.load("mnist-5k")  # 4000 train / 1000 test real MNIST digits
    model = xpcnn.SimpleCNN(seed=0)  # conv 1->32->64->128, fc 2048->250->10
    result = xpcnn.train(
        model, device=args.device, dataset=data, epochs=args.epochs, checkpoint=args.checkpoint
    )
    print(
        f"trained on {result.backend.name}: test accuracy {result.history[-1]['test_accuracy']:.3f}"
    )

    # Inference by hand: the model's namespace, a batch moved to its device, logits back.
    backend = result.backend
    model.eval()
    images = backend.asarray(data.test_images[:8, None] / 255.0, model.dtype)
    logits = model(images)
    predicted = np.argmax(backend.to_host(logits), axis=1)
    print("first 8 test digits:", data.test_labels[:8].tolist(), "predicted:", predicted.tolist())


if __name__ == "__main__":
    main()
