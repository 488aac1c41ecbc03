"""Image datasets in the IDX format of MNIST, read with NumPy on the host.

``load()`` gives the 5000 MNIST digits shipped inside the package (``xpcnn/data/mnist-5k``, see
its README); ``load("fashion-mnist")`` and ``load("mnist")`` look for the full sets under
``$XPCNN_DATA`` and ``/usr/share/datasets``; ``load(path)`` reads any directory holding the four
MNIST-named files. Files are untrusted input: every header is checked against the file's real size
before anything is allocated for the data, so a corrupt or hostile header cannot make us allocate
terabytes, and every refusal is a ``DatasetError`` naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np

NAMES = ("mnist-5k", "fashion-mnist", "mnist")

#: Where Debian-style dataset packages put their files; tests monkeypatch this.
SYSTEM_DATA_DIR = pathlib.Path("/usr/share/datasets")

EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "data" / "mnist-5k"

DIGIT_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX dtype codes; only unsigned bytes (all the MNIST family uses) are supported.
IDX_TYPES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}

GZIP_MAGIC = b"\x1f\x8b"
# Deflate cannot expand data by more than about 1032:1, so a gzip file of c bytes never holds
# more than this many times c bytes uncompressed.
GZIP_MAX_RATIO = 1100

# The two spellings in use: LeCun's site has dashes, some mirrors a dot before "idx".
FILE_STEMS = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}

HOW_TO_GET = {
    "fashion-mnist": (
        "install it with `apt install dataset-fashion-mnist` (Debian/Ubuntu), or download the "
        "four files from https://github.com/zalandoresearch/fashion-mnist into a directory and "
        "set XPCNN_DATA to it (or to its parent, holding it as fashion-mnist/)"
    ),
    "mnist": (
        "download the four files from the MNIST page (https://yann.lecun.com/exdb/mnist/ or a "
        "mirror) into a directory and set XPCNN_DATA to it (or to its parent, holding it as "
        "mnist/)"
    ),
}


class DatasetError(ValueError):
    """A dataset file or directory was refused; the message names the file and the problem."""


class DatasetNotFound(DatasetError):
    """A dataset is missing; the message says where we looked and how to get it."""


@dataclass(frozen=True)
class Dataset:
    """A train/test split of uint8 images ``(N, H, W)`` with uint8 labels ``(N,)``."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    num_classes: int = 10
    class_names: tuple[str, ...] = DIGIT_CLASSES


def _fail(path, problem):
    return DatasetError(f"{path}: {problem}")


def _parse_header(path, head, ndim):
    """Check the 4-byte magic and return the number of dimensions it declares."""
    if len(head) < 4:
        raise _fail(path, f"truncated: {len(head)} bytes, too short for the 4-byte IDX magic")
    if head[0] != 0 or head[1] != 0:
        raise _fail(path, f"bad magic {head.hex()}: an IDX file starts with two zero bytes")
    code, nd = head[2], head[3]
    if code != 0x08:
        kind = IDX_TYPES.get(code, "unknown type")
        raise _fail(path, f"dtype code 0x{code:02X} ({kind}) unsupported; only 0x08 (uint8) is")
    if not 1 <= nd <= 4:
        raise _fail(path, f"ndim {nd} in the magic; expected 1 to 4")
    if ndim is not None and nd != ndim:
        raise _fail(path, f"has {nd} dimensions, expected {ndim}")
    return nd


def _parse_dims(path, raw, nd):
    if len(raw) < 4 * nd:
        raise _fail(path, f"truncated header: {nd} dimensions need {4 * nd} bytes after the magic")
    return struct.unpack(f">{nd}I", raw)


def _read_exact(stream, count):
    """Read up to ``count`` bytes into a new writable buffer; return it and how many arrived."""
    buf = bytearray(count)
    view = memoryview(buf)
    got = 0
    while got < count:
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return buf, got


def _describe(dims):
    return "x".join(str(d) for d in dims)


def _read_raw(path, f, size, ndim):
    nd = _parse_header(path, f.read(4), ndim)
    dims = _parse_dims(path, f.read(4 * nd), nd)
    expected = 4 + 4 * nd + math.prod(dims)
    if size != expected:
        what = "truncated" if size < expected else "trailing bytes"
        raise _fail(
            path,
            f"expected {expected} bytes from the header ({_describe(dims)}), "
            f"file has {size} ({what})",
        )
    buf, got = _read_exact(f, math.prod(dims))
    if got != len(buf):  # the file shrank under us
        raise _fail(path, f"expected {expected} bytes from the header, read {4 + 4 * nd + got}")
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)


def _read_gzip(path, f, size, ndim):
    if size < 18:
        raise _fail(path, f"truncated gzip file: {size} bytes, less than a gzip header and trailer")
    f.seek(size - 4)
    isize = int.from_bytes(f.read(4), "little")  # uncompressed size mod 2**32
    f.seek(0)
    with gzip.GzipFile(fileobj=f, mode="rb") as gz:
        nd = _parse_header(path, gz.read(4), ndim)
        dims = _parse_dims(path, gz.read(4 * nd), nd)
        expected = 4 + 4 * nd + math.prod(dims)
        if expected > GZIP_MAX_RATIO * size:
            raise _fail(
                path,
                f"header claims {expected} bytes ({_describe(dims)}), more than {size} compressed "
                f"bytes can hold (deflate expands at most about 1032:1)",
            )
        if isize != expected % 2**32:
            raise _fail(
                path,
                f"expected {expected} bytes from the header ({_describe(dims)}), but the gzip "
                f"trailer says {isize} (mod 2**32): truncated or corrupt",
            )
        buf, got = _read_exact(gz, math.prod(dims))
        if got != len(buf):
            raise _fail(
                path,
                f"expected {expected} bytes from the header ({_describe(dims)}), "
                f"decompressed {4 + 4 * nd + got} (truncated)",
            )
        if gz.read(1):  # also makes gzip check the CRC, which it does at the end of the stream
            raise _fail(path, f"trailing bytes after the {expected} bytes the header declares")
    return np.frombuffer(buf, dtype=np.uint8).reshape(dims)


def read_idx(path, *, ndim=None) -> np.ndarray:
    """Read one IDX file of uint8, raw or gzipped (told apart by content, not name).

    With ``ndim`` the file must have that many dimensions. Returns a writable, C-contiguous uint8
    array of the header's shape.
    """
    path = pathlib.Path(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise DatasetNotFound(f"{path}: no such file") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e}") from None
    try:
        with open(path, "rb") as f:
            is_gzip = f.read(2) == GZIP_MAGIC
            f.seek(0)
            if is_gzip:
                return _read_gzip(path, f, size, ndim)
            return _read_raw(path, f, size, ndim)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise _fail(path, f"corrupt or truncated gzip data: {e}") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e}") from None


def find_idx_files(directory) -> dict[str, pathlib.Path]:
    """Locate the four MNIST-named files in ``directory``, either spelling, raw preferred to .gz."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise DatasetNotFound(f"{directory}: no such directory")
    found, missing = {}, []
    for key, stems in FILE_STEMS.items():
        names = list(stems) + [stem + ".gz" for stem in stems]
        hits = [directory / n for n in names if (directory / n).is_file()]
        if hits:
            found[key] = hits[0]
        else:
            missing.append(" or ".join(names))
    if missing:
        raise DatasetNotFound(f"{directory}: missing {'; '.join(missing)}")
    return found


def load_directory(directory, name=None) -> Dataset:
    """Load and cross-check the four IDX files of ``directory`` (see ``find_idx_files``)."""
    files = find_idx_files(directory)
    images = {k: read_idx(files[k], ndim=3) for k in ("train_images", "test_images")}
    labels = {k: read_idx(files[k], ndim=1) for k in ("train_labels", "test_labels")}
    num_classes = 10
    for part in ("train", "test"):
        img_file, lab_file = files[f"{part}_images"], files[f"{part}_labels"]
        n_img, n_lab = len(images[f"{part}_images"]), len(labels[f"{part}_labels"])
        if n_img != n_lab:
            raise DatasetError(f"{img_file} has {n_img} images but {lab_file} has {n_lab} labels")
        lab = labels[f"{part}_labels"]
        bad = np.flatnonzero(lab >= num_classes)
        if bad.size:
            i = int(bad[0])
            raise _fail(lab_file, f"label {lab[i]} at index {i} is not below {num_classes}")
    train_hw = images["train_images"].shape[1:]
    test_hw = images["test_images"].shape[1:]
    if train_hw != test_hw:
        raise DatasetError(
            f"{files['train_images']} has {_describe(train_hw)} images but "
            f"{files['test_images']} has {_describe(test_hw)}"
        )
    return Dataset(
        name=str(directory) if name is None else name,
        source=str(directory),
        num_classes=num_classes,
        class_names=FASHION_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES,
        **images,
        **labels,
    )


def _search(name):
    """Load the first of ``$XPCNN_DATA/name``, ``$XPCNN_DATA``, ``SYSTEM_DATA_DIR/name`` that
    holds the four files."""
    places = []
    env = os.environ.get("XPCNN_DATA")
    if env:
        places += [pathlib.Path(env) / name, pathlib.Path(env)]
    places.append(pathlib.Path(SYSTEM_DATA_DIR) / name)
    tried = []
    for place in places:
        try:
            find_idx_files(place)
        except DatasetNotFound as e:
            tried.append(str(e))
            continue
        # Found: a broken file here is an error, not a reason to look further.
        return load_directory(place, name)
    looked = "; ".join(tried)
    raise DatasetNotFound(f"dataset {name!r} not found (looked in: {looked}); {HOW_TO_GET[name]}")


def load(name_or_path="mnist-5k") -> Dataset:
    """Load a dataset by name (one of ``NAMES``) or from a directory path.

    ``"mnist-5k"`` (the default) is the 4000/1000 split of real MNIST digits shipped with the
    package, so examples and tests run without downloads.
    """
    if isinstance(name_or_path, str) and name_or_path in NAMES:
        if name_or_path == "mnist-5k":
            return load_directory(EMBEDDED_DIR, "mnist-5k")
        return _search(name_or_path)
    path = pathlib.Path(name_or_path)
    if not path.is_dir():
        raise DatasetNotFound(
            f"{os.fspath(name_or_path)!r} is neither a known dataset name "
            f"({', '.join(NAMES)}) nor a directory"
        )
    return load_directory(path, os.fspath(name_or_path))
