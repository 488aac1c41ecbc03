"""IDX reading, directory loading and dataset lookup, on small files written into tmp_path.

The reader must refuse every malformed file with a DatasetError naming the file, and must refuse
a header that claims more data than the file can hold before allocating anything for it.
"""

import gzip
import hashlib
import os
import pathlib
import random
import re
import struct
import sys

import numpy as np
import pytest

from xpcnn import datasets
from xpcnn.datasets import (
    DatasetError,
    DatasetNotFound,
    find_idx_files,
    load,
    load_directory,
    read_idx,
)

STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DOT_STEMS = {k: v.replace("-idx", ".idx") for k, v in STEMS.items()}


def idx_header(dims, code=0x08):
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def idx_bytes(array):
    array = np.asarray(array, dtype=np.uint8)
    return idx_header(array.shape) + array.tobytes()


def gz(data):
    return gzip.compress(data, mtime=0)


def write(path, data):
    path.write_bytes(data)
    return path


def random_images(n, h=4, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def random_labels(n, seed=0):
    return np.random.default_rng(seed).integers(0, 10, size=n, dtype=np.uint8)


def make_dir(directory, stems=STEMS, gzipped=False, arrays=None):
    """Write a small dataset (6 train, 3 test images of 4x5) and return the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    if arrays is None:
        arrays = {
            "train_images": random_images(6, seed=1),
            "train_labels": random_labels(6, seed=2),
            "test_images": random_images(3, seed=3),
            "test_labels": random_labels(3, seed=4),
        }
    for key, array in arrays.items():
        data = idx_bytes(array)
        name = stems[key] + (".gz" if gzipped else "")
        write(directory / name, gz(data) if gzipped else data)
    return arrays


def assert_refused(path, *fragments, ndim=None):
    with pytest.raises(DatasetError) as info:
        read_idx(path, ndim=ndim)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


# --- read_idx --------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_round_trip(tmp_path, compress):
    images = random_images(7, 3, 2)
    data = idx_bytes(images)
    # A misleading name: gzip must be told by content.
    path = write(tmp_path / "images.bin", gz(data) if compress else data)
    out = read_idx(path, ndim=3)
    assert out.dtype == np.uint8
    assert out.shape == (7, 3, 2)
    np.testing.assert_array_equal(out, images)


def test_bad_magic(tmp_path):
    path = write(tmp_path / "x", b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab")
    assert_refused(path, "bad magic")
    path = write(tmp_path / "y.gz", gz(b"\x00\x07\x08\x01" + struct.pack(">I", 2) + b"ab"))
    assert_refused(path, "bad magic")


@pytest.mark.parametrize(
    "code, kind",
    [(0x09, "int8"), (0x0B, "int16"), (0x0C, "int32"), (0x0D, "float32"), (0x0E, "float64")],
)
def test_unsupported_dtype(tmp_path, code, kind):
    path = write(tmp_path / "x", idx_header((2,), code=code) + b"\x00" * 64)
    assert_refused(path, f"dtype code 0x{code:02X} ({kind}) unsupported")


def test_unknown_dtype(tmp_path):
    path = write(tmp_path / "x", idx_header((2,), code=0x42) + b"ab")
    assert_refused(path, "0x42", "unknown")


def test_wrong_ndim(tmp_path):
    path = write(tmp_path / "x", idx_bytes(np.zeros((2, 3), np.uint8)))
    assert_refused(path, "2 dimensions, expected 3", ndim=3)
    assert read_idx(path, ndim=2).shape == (2, 3)
    zero = write(tmp_path / "zero", bytes([0, 0, 8, 0]))
    assert_refused(zero, "ndim 0")
    five = write(tmp_path / "five", idx_header((1,) * 5) + b"a")
    assert_refused(five, "ndim 5")


def test_truncated_raw(tmp_path):
    data = idx_bytes(random_images(3))
    path = write(tmp_path / "x", data[:-1])
    message = assert_refused(path, "truncated")
    assert f"expected {len(data)} bytes from the header" in message
    assert f"file has {len(data) - 1}" in message
    short = write(tmp_path / "short", data[:6])
    assert_refused(short, "truncated")


def test_trailing_bytes_raw(tmp_path):
    data = idx_bytes(random_images(3))
    path = write(tmp_path / "x", data + b"\x00")
    assert_refused(path, "trailing bytes", f"file has {len(data) + 1}")


def test_trailing_bytes_gzip(tmp_path):
    data = idx_bytes(random_images(3))
    # One byte too many, in the same member or in a second one.
    path = write(tmp_path / "x.gz", gz(data + b"\x00"))
    assert_refused(path, "trailing bytes")
    path = write(tmp_path / "y.gz", gz(data) + gz(b"\x00"))
    assert_refused(path, "trailing bytes")
    # ISIZE forged to the header's size: zlib's length check refuses the member.
    compressed = bytearray(gz(data + b"\x00"))
    compressed[-4:] = struct.pack("<I", len(data))
    path = write(tmp_path / "z.gz", bytes(compressed))
    assert_refused(path, "corrupt", "incorrect length check")


def test_truncated_gzip(tmp_path):
    data = idx_bytes(random_images(50))
    compressed = gz(data)
    for cut in (10, len(compressed) // 2, len(compressed) - 1):
        path = write(tmp_path / f"cut{cut}.gz", compressed[:cut])
        assert_refused(path, "truncated")
    # Cut, but ending in the right ISIZE, so that decompression itself runs out of data.
    path = write(
        tmp_path / "cut.gz", compressed[: len(compressed) // 2] + struct.pack("<I", len(data))
    )
    assert_refused(path, "truncated")


def test_truncated_gzip_data_with_matching_isize(tmp_path):
    # A well-formed gzip stream that holds less data than its IDX header says.
    data = idx_bytes(random_images(5))
    compressed = bytearray(gz(data[:-7]))
    compressed[-4:] = struct.pack("<I", len(data))
    path = write(tmp_path / "x.gz", bytes(compressed))
    assert_refused(path, "truncated")


def test_gzip_corrupted_middle(tmp_path):
    rng = np.random.default_rng(5)
    compressed = bytearray(gz(idx_bytes(random_images(50))))
    middle = len(compressed) // 2
    compressed[middle : middle + 16] = rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
    path = write(tmp_path / "x.gz", bytes(compressed))
    assert_refused(path, "corrupt")


def test_gzip_isize_mismatch(tmp_path):
    data = idx_bytes(random_images(5))
    compressed = bytearray(gz(data))
    compressed[-4:] = struct.pack("<I", len(data) + 1)
    path = write(tmp_path / "x.gz", bytes(compressed))
    assert_refused(path, "trailer", str(len(data) + 1))


def test_missing_file(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(DatasetNotFound, match=re.escape(str(path))):
        read_idx(path)


def _virtual_memory_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return None


@pytest.fixture
def no_big_allocation(monkeypatch):
    """Make any big allocation fail, so a refusal must come before allocating for the data.

    NumPy's allocating entry points raise; on Linux the address space is also capped at 1 GiB
    above its current size, so a big ``bytearray`` or ``bytes`` raises MemoryError (which is not
    a DatasetError) instead of exhausting the machine.
    """

    def forbidden(*args, **kwargs):
        raise AssertionError("allocated data for a header that should have been refused")

    for name in ("frombuffer", "empty", "zeros", "fromfile"):
        monkeypatch.setattr(np, name, forbidden)
    size = _virtual_memory_size() if sys.platform == "linux" else None
    if size is None:
        yield
        return
    import resource

    old = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + 2**30
    if old[1] != resource.RLIM_INFINITY:
        cap = min(cap, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


# 10**12 images cannot be written in a uint32 dimension, so claim the most a header can hold
# (2**32 - 1 images of 28x28, about 3.4 TB), and 10**12 bytes as 10**6 images of 1000x1000.
HUGE = [(2**32 - 1, 28, 28), (10**6, 1000, 1000)]


@pytest.mark.parametrize("dims", HUGE, ids=["4e9-images", "1e12-bytes"])
def test_huge_header_raw(tmp_path, dims, no_big_allocation):
    path = write(tmp_path / "x", idx_header(dims) + b"\x00" * 100)
    assert_refused(path, "truncated", f"file has {len(idx_header(dims)) + 100}")


@pytest.mark.parametrize("dims", HUGE, ids=["4e9-images", "1e12-bytes"])
def test_huge_header_gzip(tmp_path, dims, no_big_allocation):
    path = write(tmp_path / "x.gz", gz(idx_header(dims) + b"\x00" * 100))
    assert_refused(path, "header claims", "compressed")


def test_huge_header_gzip_within_ratio(tmp_path, no_big_allocation):
    # Incompressible data: the claim is plausible for the compressed size, so only the ISIZE
    # trailer gives it away.
    dims = (1000, 10, 10)
    path = write(tmp_path / "x.gz", gz(idx_header(dims) + random.Random(0).randbytes(5000)))
    assert_refused(path, "trailer")


# --- multi-member gzip, bounded decompression ------------------------------------------------


@pytest.mark.parametrize("cut", [2, 16, 17, 50, 60])
def test_multi_member_gzip(tmp_path, cut):
    """Two (or more) gzip members concatenated, as gzip.open reads them: the ISIZE trailer then
    describes only the last member, so it cannot be a reason to refuse."""
    images = random_images(3)
    data = idx_bytes(images)
    path = write(tmp_path / "x.gz", gz(data[:cut]) + gz(data[cut:]))
    assert gzip.open(path).read() == data
    np.testing.assert_array_equal(read_idx(path, ndim=3), images)
    # With zero padding after the members, and an empty member, as gzip.open also accepts.
    path = write(tmp_path / "y.gz", gz(data[:cut]) + gz(b"") + gz(data[cut:]) + b"\0" * 7)
    assert gzip.open(path).read() == data
    np.testing.assert_array_equal(read_idx(path, ndim=3), images)


def test_multi_member_gzip_directory(tmp_path):
    arrays = make_dir(tmp_path)
    data = idx_bytes(arrays["train_images"])
    write(tmp_path / (STEMS["train_images"] + ".gz"), gz(data[:10]) + gz(data[10:]))
    (tmp_path / STEMS["train_images"]).unlink()
    np.testing.assert_array_equal(load_directory(tmp_path).train_images, arrays["train_images"])


def test_multi_member_gzip_errors(tmp_path):
    data = idx_bytes(random_images(3))
    path = write(tmp_path / "garbage.gz", gz(data[:20]) + gz(data[20:]) + b"junk")
    assert_refused(path, "corrupt", "not gzip data")
    second = bytearray(gz(data[20:]))
    second[-8] ^= 1  # the second member's CRC
    path = write(tmp_path / "crc.gz", gz(data[:20]) + bytes(second))
    assert_refused(path, "corrupt", "incorrect data check")
    path = write(tmp_path / "short.gz", gz(data[:20]) + gz(data[20:-1]))
    assert_refused(path, "truncated")


def test_idx_shape_reads_only_the_header(tmp_path, no_big_allocation):
    # The header claims 100016 bytes, the data holds 5016: only reading the data shows it.
    dims = (1000, 10, 10)
    path = write(tmp_path / "x.gz", gz(idx_header(dims) + random.Random(0).randbytes(5000)))
    assert datasets.idx_shape(path, ndim=3) == dims
    assert_refused(path, "trailer", "decompressed 5016 (truncated)")
    with pytest.raises(DatasetError, match="has 3 dimensions, expected 1"):
        datasets.idx_shape(path, ndim=1)


def test_headers_are_cross_checked_before_any_data(tmp_path, monkeypatch):
    """A count mismatch is found from the four headers alone: no data is read."""
    make_dir(tmp_path, gzipped=True)
    write(tmp_path / (STEMS["train_labels"] + ".gz"), gz(idx_bytes(random_labels(5))))
    reads = []
    real = datasets._IdxFile.read
    monkeypatch.setattr(datasets._IdxFile, "read", lambda self: reads.append(self) or real(self))
    with pytest.raises(DatasetError, match="6 images but .* 5 labels"):
        load_directory(tmp_path)
    assert reads == []


# --- what is not a regular file --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
def test_not_a_regular_file(tmp_path, kind):
    make_dir(tmp_path)
    path = tmp_path / STEMS["train_images"]
    path.unlink()
    expected = {"dev-zero": "a character device", "fifo": "a FIFO", "directory": "a directory"}
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(DatasetError) as info:
        load_directory(tmp_path)  # found, not "missing"; and a FIFO does not block
    assert not isinstance(info.value, DatasetNotFound)
    assert str(info.value) == f"{path}: not a regular file ({expected[kind]})"
    with pytest.raises(DatasetError, match="not a regular file"):
        read_idx(path)


def test_broken_symlink(tmp_path):
    make_dir(tmp_path)
    path = tmp_path / STEMS["test_labels"]
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DatasetError, match=f"{path}: broken symbolic link"):
        load_directory(tmp_path)


# --- directories -----------------------------------------------------------------------------


@pytest.mark.parametrize("stems", [STEMS, DOT_STEMS], ids=["dash", "dot"])
@pytest.mark.parametrize("gzipped", [False, True], ids=["raw", "gzip"])
def test_load_directory(tmp_path, stems, gzipped):
    arrays = make_dir(tmp_path / "d", stems, gzipped)
    ds = load_directory(tmp_path / "d")
    for key, array in arrays.items():
        np.testing.assert_array_equal(getattr(ds, key), array)
        assert getattr(ds, key).dtype == np.uint8
    assert ds.train_images.flags.c_contiguous
    assert ds.source == str(tmp_path / "d")
    assert ds.name == str(tmp_path / "d")
    assert ds.class_names == tuple(str(i) for i in range(10))


def test_raw_preferred_over_gzip(tmp_path):
    raw = make_dir(tmp_path, gzipped=False)
    other = {k: v[::-1].copy() for k, v in raw.items()}
    make_dir(tmp_path, gzipped=True, arrays=other)
    files = find_idx_files(tmp_path)
    assert all(p.suffix != ".gz" for p in files.values())
    ds = load_directory(tmp_path)
    np.testing.assert_array_equal(ds.train_images, raw["train_images"])


def test_missing_files(tmp_path):
    make_dir(tmp_path)
    (tmp_path / STEMS["test_labels"]).unlink()
    with pytest.raises(DatasetNotFound) as info:
        find_idx_files(tmp_path)
    message = str(info.value)
    for name in ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte", "t10k-labels-idx1-ubyte.gz"):
        assert name in message
    assert "train-images" not in message
    with pytest.raises(DatasetNotFound):
        load_directory(tmp_path)


def test_count_mismatch(tmp_path):
    arrays = make_dir(tmp_path)
    write(tmp_path / STEMS["train_labels"], idx_bytes(arrays["train_labels"][:5]))
    with pytest.raises(DatasetError) as info:
        load_directory(tmp_path)
    message = str(info.value)
    assert str(tmp_path / STEMS["train_images"]) in message
    assert str(tmp_path / STEMS["train_labels"]) in message
    assert "6 images" in message and "5 labels" in message


@pytest.mark.parametrize("bad", [10, 255])
def test_label_out_of_range(tmp_path, bad):
    arrays = make_dir(tmp_path)
    labels = arrays["test_labels"].copy()
    labels[2] = bad
    write(tmp_path / STEMS["test_labels"], idx_bytes(labels))
    with pytest.raises(DatasetError) as info:
        load_directory(tmp_path)
    message = str(info.value)
    assert str(tmp_path / STEMS["test_labels"]) in message
    assert f"label {bad} at index 2" in message


def test_image_size_mismatch(tmp_path):
    make_dir(tmp_path)
    write(tmp_path / STEMS["test_images"], idx_bytes(random_images(3, 5, 4)))
    with pytest.raises(DatasetError, match="4x5.*5x4"):
        load_directory(tmp_path)


def test_images_must_be_3d(tmp_path):
    make_dir(tmp_path)
    path = write(tmp_path / STEMS["train_images"], idx_bytes(np.zeros((6, 20), np.uint8)))
    with pytest.raises(DatasetError, match=re.escape(str(path))):
        load_directory(tmp_path)


# --- load by name or path --------------------------------------------------------------------


def test_load_path(tmp_path):
    arrays = make_dir(tmp_path / "mine")
    ds = load(tmp_path / "mine")
    np.testing.assert_array_equal(ds.test_labels, arrays["test_labels"])
    assert load(str(tmp_path / "mine")).name == str(tmp_path / "mine")


def test_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFound) as info:
        load("mnist-50k")
    message = str(info.value)
    assert "mnist-50k" in message
    for name in datasets.NAMES:
        assert name in message


@pytest.fixture
def empty_places(tmp_path, monkeypatch):
    system = tmp_path / "system"
    env = tmp_path / "env"
    system.mkdir()
    env.mkdir()
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", system)
    monkeypatch.setenv("XPCNN_DATA", str(env))
    return env, system


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_not_found(empty_places, name):
    env, system = empty_places
    with pytest.raises(DatasetNotFound) as info:
        load(name)
    message = str(info.value)
    for place in (env / name, env, system / name):
        assert str(place) in message
    if name == "fashion-mnist":
        assert "apt install dataset-fashion-mnist" in message
        assert "https://github.com/zalandoresearch/fashion-mnist" in message
    else:
        assert "yann.lecun.com/exdb/mnist" in message
    assert "XPCNN_DATA" in message


def test_not_found_without_env(empty_places, monkeypatch):
    env, system = empty_places
    monkeypatch.delenv("XPCNN_DATA")
    with pytest.raises(DatasetNotFound) as info:
        load("fashion-mnist")
    message = str(info.value)
    assert str(system / "fashion-mnist") in message
    assert str(env) not in message


def variant(arrays, step):
    """A different but valid dataset of the same shapes, to tell which directory was loaded."""
    return {
        k: (v + step) % 10 if k.endswith("labels") else (v + step).astype(np.uint8)
        for k, v in arrays.items()
    }


def test_search_order(empty_places):
    env, system = empty_places
    in_system = make_dir(system / "fashion-mnist")
    ds = load("fashion-mnist")
    assert ds.source == str(system / "fashion-mnist")
    np.testing.assert_array_equal(ds.train_images, in_system["train_images"])
    assert ds.name == "fashion-mnist"
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"

    in_env_root = make_dir(env, arrays=variant(in_system, 1))
    ds = load("fashion-mnist")
    assert ds.source == str(env)
    np.testing.assert_array_equal(ds.train_images, in_env_root["train_images"])

    in_env_sub = make_dir(env / "fashion-mnist", gzipped=True, arrays=variant(in_system, 2))
    ds = load("fashion-mnist")
    assert ds.source == str(env / "fashion-mnist")
    np.testing.assert_array_equal(ds.train_images, in_env_sub["train_images"])


def test_broken_file_found_first_is_an_error(empty_places):
    env, system = empty_places
    make_dir(system / "mnist")
    make_dir(env / "mnist")
    write(env / "mnist" / STEMS["test_images"], b"garbage")
    with pytest.raises(DatasetError, match=re.escape(str(env / "mnist"))):
        load("mnist")


# --- the embedded mnist-5k -------------------------------------------------------------------


def test_mnist_5k():
    ds = load()
    assert ds.name == "mnist-5k"
    assert ds.train_images.shape == (4000, 28, 28)
    assert ds.test_images.shape == (1000, 28, 28)
    assert ds.train_labels.shape == (4000,) and ds.test_labels.shape == (1000,)
    for array in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels):
        assert array.dtype == np.uint8
    assert np.bincount(ds.train_labels, minlength=10).tolist() == [400] * 10
    assert np.bincount(ds.test_labels, minlength=10).tolist() == [100] * 10
    assert ds.train_images.max() == 255 and ds.test_images.max() == 255
    train_rows = {row.tobytes() for row in ds.train_images}
    test_rows = {row.tobytes() for row in ds.test_images}
    assert len(train_rows) == 4000 and len(test_rows) == 1000
    assert not train_rows & test_rows
    # Shuffled: the classes are mixed, not in blocks.
    assert (np.diff(ds.train_labels.astype(int)) != 0).sum() > 1000


def test_mnist_5k_checksums():
    directory = pathlib.Path(datasets.EMBEDDED_DIR)
    readme = (directory / "README.md").read_text(encoding="utf-8")
    listed = dict((name, digest) for digest, name in re.findall(r"([0-9a-f]{64})  (\S+)", readme))
    files = sorted(p.name for p in directory.glob("*.gz"))
    assert sorted(listed) == files and len(files) == 4
    for name, digest in listed.items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest


SYSTEM_FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason=f"{SYSTEM_FASHION} is absent")
def test_system_fashion_mnist(monkeypatch):
    monkeypatch.delenv("XPCNN_DATA", raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_DATA_DIR", SYSTEM_FASHION.parent)
    ds = load("fashion-mnist")
    assert ds.train_images.shape == (60000, 28, 28)
    assert ds.test_images.shape == (10000, 28, 28)
    assert np.bincount(ds.test_labels, minlength=10).tolist() == [1000] * 10
    assert ds.class_names[0] == "T-shirt/top"


# --- Dataset construction ---------------------------------------------------------------------


def small_dataset(**changes):
    fields = dict(
        name="toy",
        train_images=random_images(6),
        train_labels=random_labels(6),
        test_images=random_images(3, seed=1),
        test_labels=random_labels(3, seed=1),
        source="memory",
    )
    fields.update(changes)
    return datasets.Dataset(**fields)


def test_dataset_accepts_valid_data():
    ds = small_dataset(num_classes=10, class_names=list("abcdefghij"))
    assert ds.class_names == tuple("abcdefghij")  # normalized to a tuple
    # Empty splits are allowed to exist (the trainer refuses an empty training split).
    empty = small_dataset(
        train_images=np.zeros((0, 4, 5), np.uint8), train_labels=np.zeros(0, np.uint8)
    )
    assert len(empty.train_labels) == 0
    small_dataset(test_images=np.zeros((0, 4, 5), np.uint8), test_labels=np.zeros(0, np.uint8))


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"train_labels": np.array([0, 1, 2, 3, 4, 200], np.uint8)},
            "train label 200 at index 5 is not below num_classes=10",
        ),
        (
            {
                "train_labels": np.array([0, 1, 2, 3, 4, 4], np.uint8),
                "test_labels": np.array([0, 5, 9], np.uint8),
                "num_classes": 5,
                "class_names": tuple("abcde"),
            },
            "test label 5 at index 1 is not below num_classes=5",
        ),
        (
            {"train_labels": random_labels(6).astype(np.int64)},
            "train_labels must be a NumPy uint8 array, got a int64 array",
        ),
        ({"test_images": [[[0]]]}, "test_images must be a NumPy uint8 array, got a builtins.list"),
        (
            {"train_images": random_images(6)[:, :, :, None]},
            "train_images must have shape (N, H, W)",
        ),
        ({"test_labels": random_labels(3)[:, None]}, "test_labels must have shape (N,)"),
        ({"train_labels": random_labels(5)}, "train split has 6 images but 5 labels"),
        ({"test_images": random_images(3, 5, 4)}, "training images are 4x5, test images 5x4"),
        (
            {
                "train_images": np.zeros((6, 0, 5), np.uint8),
                "test_images": np.zeros((3, 0, 5), np.uint8),
            },
            "images are 0x5, need at least 1x1",
        ),
        ({"num_classes": 0, "class_names": ()}, "num_classes must be a positive integer, got 0"),
        ({"num_classes": True}, "num_classes must be a positive integer, got True"),
        ({"num_classes": 10.0}, "num_classes must be a positive integer"),
        ({"class_names": ("a", "b")}, "2 class_names for num_classes=10"),
        ({"class_names": "0123456789"}, "class_names must be a tuple of strings"),
        ({"class_names": tuple(range(10))}, "class_names must be a tuple of strings"),
    ],
)
def test_dataset_refuses_invalid_data(changes, message):
    with pytest.raises(DatasetError) as info:
        small_dataset(**changes)
    assert str(info.value).startswith("dataset 'toy': ")
    assert message in str(info.value)


def test_labels_digest():
    ds = small_dataset()
    digest = datasets.labels_digest(ds)
    assert len(digest) == 64 and int(digest, 16) >= 0
    # The same data gives the same digest, whatever the name or source.
    same = small_dataset(name="other", source="elsewhere", train_images=random_images(6, seed=9))
    assert datasets.labels_digest(same) == digest
    changed = [
        small_dataset(train_labels=np.roll(random_labels(6), 1)),  # another order
        small_dataset(test_labels=np.array([1, 2, 3], np.uint8)),
        small_dataset(train_images=random_images(6, 5, 4), test_images=random_images(3, 5, 4)),
        small_dataset(  # the same labels, split differently
            train_images=random_images(5),
            train_labels=random_labels(6)[:5],
            test_images=random_images(4),
            test_labels=np.concatenate([random_labels(6)[5:], random_labels(3, seed=1)]),
        ),
    ]
    digests = {datasets.labels_digest(d) for d in changed}
    assert digest not in digests and len(digests) == len(changed)
    assert datasets.labels_digest(load()) == datasets.labels_digest(load())
