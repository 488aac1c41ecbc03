"""Image datasets in the IDX format of MNIST, read with NumPy on the host.

``load()`` gives the 5000 MNIST digits shipped inside the package (``xpcnn/data/mnist-5k``, see
its README); ``load("fashion-mnist")`` and ``load("mnist")`` look for the full sets under
``$XPCNN_DATA`` and ``/usr/share/datasets``; ``load(path)`` reads any directory holding the four
MNIST-named files. Files are untrusted input: every header is checked against the file's real size
before anything is allocated for the data, the four headers of a directory are cross-checked before
any data is read or decompressed, gzip data is decompressed in bounded steps never past what the
header declares, so a corrupt or hostile file cannot make us allocate more than it holds; every
refusal is a ``DatasetError`` naming the file and what is wrong. A `Dataset` checks its arrays and
labels however it was made.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import pathlib
import stat
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


SPLITS = ("train", "test")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _describe_value(value) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array"
    return f"a {type(value).__module__}.{type(value).__qualname__}"


@dataclass(frozen=True)
class Dataset:
    """A train/test split of uint8 images ``(N, H, W)`` with uint8 labels ``(N,)``.

    Checked on construction, however it was made (`load`, or by hand in Python), so that no
    code downstream has to trust it: NumPy uint8 arrays of those shapes, as many labels as
    images in each split, the same image size in both splits (at least 1x1), ``num_classes`` a
    positive integer, ``class_names`` that many strings, and every label below
    ``num_classes``. Either split may be empty; `xpcnn.train` refuses an empty training split.
    Raises `DatasetError` naming the dataset, the split and the offending index and value.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    num_classes: int = 10
    class_names: tuple[str, ...] = DIGIT_CLASSES

    def __post_init__(self):
        where = f"dataset {self.name!r}"
        if not isinstance(self.name, str):
            raise DatasetError(f"dataset name must be a string, got {self.name!r}")
        for part in SPLITS:
            for kind in ("images", "labels"):
                array = getattr(self, f"{part}_{kind}")
                if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
                    raise DatasetError(
                        f"{where}: {part}_{kind} must be a NumPy uint8 array, "
                        f"got {_describe_value(array)}"
                    )
            images, labels = getattr(self, f"{part}_images"), getattr(self, f"{part}_labels")
            if images.ndim != 3:
                raise DatasetError(
                    f"{where}: {part}_images must have shape (N, H, W), got {images.shape}"
                )
            if labels.ndim != 1:
                raise DatasetError(
                    f"{where}: {part}_labels must have shape (N,), got {labels.shape}"
                )
            if len(images) != len(labels):
                raise DatasetError(
                    f"{where}: {part} split has {len(images)} images but {len(labels)} labels"
                )
        hw, test_hw = self.train_images.shape[1:], self.test_images.shape[1:]
        if hw != test_hw:
            raise DatasetError(
                f"{where}: training images are {_describe(hw)}, test images {_describe(test_hw)}"
            )
        if min(hw) < 1:
            raise DatasetError(f"{where}: images are {_describe(hw)}, need at least 1x1")
        if not _is_int(self.num_classes) or self.num_classes < 1:
            raise DatasetError(
                f"{where}: num_classes must be a positive integer, got {self.num_classes!r}"
            )
        names = self.class_names
        if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{where}: class_names must be a tuple of strings")
        if len(names) != self.num_classes:
            raise DatasetError(
                f"{where}: {len(names)} class_names for num_classes={self.num_classes}"
            )
        object.__setattr__(self, "class_names", tuple(names))
        for part in SPLITS:
            labels = getattr(self, f"{part}_labels")
            bad = np.flatnonzero(labels >= self.num_classes)
            if bad.size:
                i = int(bad[0])
                raise DatasetError(
                    f"{where}: {part} label {labels[i]} at index {i} is not below "
                    f"num_classes={self.num_classes}"
                )


def labels_digest(dataset: Dataset) -> str:
    """SHA-256 (hex) of a dataset's shapes and labels, both splits: what a checkpoint records
    to tell, on resume, whether it is the same data (same order, same sizes) without hashing
    every image. Depends only on the arrays, not on the name or where they were read from."""
    h = hashlib.sha256(b"xpcnn labels digest 1\n")
    for part in SPLITS:
        images, labels = getattr(dataset, f"{part}_images"), getattr(dataset, f"{part}_labels")
        h.update(f"{part} {images.shape} {labels.shape}\n".encode())
        h.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    return h.hexdigest()


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


# Compressed bytes read at a time, and the most decompressed in one step.
GZIP_IN_CHUNK = 2**20
GZIP_OUT_CHUNK = 4 * 2**20


class _NotGzip(Exception):
    """Bytes after a gzip member that are neither zero padding nor another member."""


class _Gunzip:
    """Decompress a gzip file of one or more members, as ``gzip.open`` reads it (members may be
    followed by zero padding), with every step bounded: ``read(n)`` returns at most ``n``
    bytes. zlib checks each member's CRC-32 and length trailer as the member ends."""

    def __init__(self, f):
        self.f = f
        self.members = 1
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""
        self._ended = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` (> 0) decompressed bytes; ``b""`` only at the end of the last member."""
        while not self._ended:
            if self._d.eof:
                self._next_member()
                continue
            if not self._pending:
                self._pending = self.f.read(GZIP_IN_CHUNK)
                if not self._pending:
                    raise EOFError("the file ends inside a gzip member")
            out = self._d.decompress(self._pending, n)
            self._pending = self._d.unused_data if self._d.eof else self._d.unconsumed_tail
            if out:
                return out
        return b""

    def read_up_to(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end of the data."""
        parts, got = [], 0
        while got < n:
            out = self.read(n - got)
            if not out:
                break
            parts.append(out)
            got += len(out)
        return b"".join(parts)

    def _next_member(self):
        rest = self._pending.lstrip(b"\0")
        while not rest:
            chunk = self.f.read(GZIP_IN_CHUNK)
            if not chunk:
                self._ended, self._pending = True, b""
                return
            rest = chunk.lstrip(b"\0")
        if len(rest) < 2:
            rest += self.f.read(1)
        if rest[:2] != GZIP_MAGIC:
            raise _NotGzip("bytes after the last gzip member are not gzip data")
        self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = rest
        self.members += 1


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _open_regular(path):
    """Open ``path`` for reading if it is a regular file (after symlinks), without blocking on
    a FIFO; returns ``(file, size)``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise _fail(path, f"broken symbolic link to {os.readlink(path)}") from None
        raise DatasetNotFound(f"{path}: no such file") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a plain file")
            raise _fail(path, f"not a regular file ({kind})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


class _IdxFile:
    """An open IDX file whose header has been read and checked against the file's size;
    `read` then reads the data. Use as a context manager."""

    def __init__(self, path, ndim=None):
        self.path = pathlib.Path(path)
        self.f, self.size = _open_regular(self.path)
        self.gz = None
        try:
            with self._errors():
                self._read_header(ndim)
        except BaseException:
            self.f.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    @property
    def count(self):
        """Data bytes the header declares."""
        return math.prod(self.dims)

    @property
    def expected(self):
        """Uncompressed file size the header declares."""
        return 4 + 4 * len(self.dims) + self.count

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except (EOFError, zlib.error, _NotGzip) as e:
            raise self._gzip_failure(f"corrupt or truncated gzip data: {e}") from None
        except MemoryError:
            raise _fail(self.path, f"not enough memory for {self.count} bytes of data") from None
        except OSError as e:
            raise _fail(self.path, f"cannot read: {e.strerror or e}") from None

    def _gzip_failure(self, problem):
        """The error for gzip data that ended early or broke; names the ISIZE trailer when it
        disagreed with the header, as it does for a single-member file cut or altered."""
        dims = getattr(self, "dims", None)
        gz = self.gz
        if (
            dims is not None
            and gz is not None
            and gz.members == 1
            and self.isize != self.expected % 2**32
        ):
            return _fail(
                self.path,
                f"expected {self.expected} bytes from the header ({_describe(dims)}), but the "
                f"gzip trailer says {self.isize} (mod 2**32): truncated or corrupt ({problem})",
            )
        return _fail(self.path, problem)

    def _read_header(self, ndim):
        path, f, size = self.path, self.f, self.size
        if f.read(2) != GZIP_MAGIC:
            f.seek(0)
            nd = _parse_header(path, f.read(4), ndim)
            self.dims = _parse_dims(path, f.read(4 * nd), nd)
            if size != self.expected:
                what = "truncated" if size < self.expected else "trailing bytes"
                raise _fail(
                    path,
                    f"expected {self.expected} bytes from the header ({_describe(self.dims)}), "
                    f"file has {size} ({what})",
                )
            return
        if size < 18:
            raise _fail(
                path, f"truncated gzip file: {size} bytes, less than a gzip header and trailer"
            )
        f.seek(size - 4)
        # Uncompressed size mod 2**32 of the *last* member only: a hint, not a check, since
        # a valid file may hold several members.
        self.isize = int.from_bytes(f.read(4), "little")
        f.seek(0)
        self.gz = _Gunzip(f)
        nd = _parse_header(path, self.gz.read_up_to(4), ndim)
        self.dims = _parse_dims(path, self.gz.read_up_to(4 * nd), nd)
        if self.expected > GZIP_MAX_RATIO * size:
            raise _fail(
                path,
                f"header claims {self.expected} bytes ({_describe(self.dims)}), more than {size} "
                f"compressed bytes can hold (deflate expands at most about 1032:1)",
            )

    def read(self) -> np.ndarray:
        """The data, as a writable C-contiguous uint8 array of the header's shape."""
        with self._errors():
            if self.gz is None:
                buf, got = _read_exact(self.f, self.count)
                if got != len(buf):  # the file shrank under us
                    raise _fail(
                        self.path,
                        f"expected {self.expected} bytes from the header, read "
                        f"{self.expected - self.count + got}",
                    )
            else:
                buf = self._gunzip_data()
        return np.frombuffer(buf, dtype=np.uint8).reshape(self.dims)

    def _gunzip_data(self):
        # Grow the buffer as data arrives, never past the header's claim: memory follows what
        # the file really holds, whatever it claims.
        buf, count = bytearray(), self.count
        while len(buf) < count:
            out = self.gz.read(min(GZIP_OUT_CHUNK, count - len(buf)))
            if not out:
                raise self._gzip_failure(
                    f"expected {self.expected} bytes from the header ({_describe(self.dims)}), "
                    f"decompressed {self.expected - count + len(buf)} (truncated)"
                )
            buf += out
        if self.gz.read(1):  # also runs zlib's CRC and length checks on the last member
            raise _fail(
                self.path, f"trailing bytes after the {self.expected} bytes the header declares"
            )
        return buf


def read_idx(path, *, ndim=None) -> np.ndarray:
    """Read one IDX file of uint8, raw or gzipped (told apart by content, not name).

    With ``ndim`` the file must have that many dimensions. Returns a writable, C-contiguous uint8
    array of the header's shape. The header is checked against the file's size before any
    memory is set aside for the data; gzip data is decompressed in bounded steps, never past
    what the header declares. Raises `DatasetError` naming the file.
    """
    with _IdxFile(path, ndim) as idx:
        return idx.read()


def idx_shape(path, *, ndim=None) -> tuple[int, ...]:
    """The shape an IDX file's header declares, checked as `read_idx` checks it, without
    reading the data (a gzip file's first bytes are decompressed, nothing more)."""
    with _IdxFile(path, ndim) as idx:
        return tuple(idx.dims)


def find_idx_files(directory) -> dict[str, pathlib.Path]:
    """Locate the four MNIST-named files in ``directory``, either spelling, raw preferred to .gz.

    A name that exists as anything (a directory, a FIFO, a broken link) counts as found, so that
    reading it gives a clear error rather than "missing".
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise DatasetNotFound(f"{directory}: no such directory")
    found, missing = {}, []
    for key, stems in FILE_STEMS.items():
        names = list(stems) + [stem + ".gz" for stem in stems]
        hits = [directory / n for n in names if os.path.lexists(directory / n)]
        if hits:
            found[key] = hits[0]
        else:
            missing.append(" or ".join(names))
    if missing:
        raise DatasetNotFound(f"{directory}: missing {'; '.join(missing)}")
    return found


def load_directory(directory, name=None) -> Dataset:
    """Load and cross-check the four IDX files of ``directory`` (see ``find_idx_files``).

    All four headers are read and cross-checked (images and labels per split, image sizes
    across splits) before any data is read or decompressed, so a file claiming more images
    than its labels file (or a gzip bomb with an honest header) is refused at once.
    """
    files = find_idx_files(directory)
    opened = {}
    try:
        for key, path in files.items():
            opened[key] = _IdxFile(path, ndim=3 if key.endswith("images") else 1)
        for part in SPLITS:
            img, lab = opened[f"{part}_images"], opened[f"{part}_labels"]
            if img.dims[0] != lab.dims[0]:
                raise DatasetError(
                    f"{img.path} has {img.dims[0]} images but {lab.path} has {lab.dims[0]} labels"
                )
        train_hw, test_hw = opened["train_images"].dims[1:], opened["test_images"].dims[1:]
        if train_hw != test_hw:
            raise DatasetError(
                f"{files['train_images']} has {_describe(train_hw)} images but "
                f"{files['test_images']} has {_describe(test_hw)}"
            )
        arrays = {key: idx.read() for key, idx in opened.items()}
    finally:
        for idx in opened.values():
            idx.f.close()
    num_classes = 10
    for part in SPLITS:
        lab = arrays[f"{part}_labels"]
        bad = np.flatnonzero(lab >= num_classes)
        if bad.size:
            i = int(bad[0])
            raise _fail(
                files[f"{part}_labels"], f"label {lab[i]} at index {i} is not below {num_classes}"
            )
    return Dataset(
        name=str(directory) if name is None else name,
        source=str(directory),
        num_classes=num_classes,
        class_names=FASHION_CLASSES if name == "fashion-mnist" else DIGIT_CLASSES,
        **arrays,
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
