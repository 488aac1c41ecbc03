"""Fuzz and hostile-input tests of the checkpoint and IDX readers, bounded for CI.

Every outcome must be the documented error (`CheckpointError` / `DatasetError`, one line, starting
with the path) or the identical data (for raw IDX files, which carry no checksum: exactly the data
the altered bytes spell); never another exception, never silently different data. The generators
are in tests/hostile.py, which also reruns them at any scale from the command line. Seeds are
fixed; each test takes a few seconds at most.
"""

import collections
import gzip
import pathlib
import struct
import sys
import tracemalloc
import zlib

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import hostile  # noqa: E402

from xpcnn import checkpoint as ckpt  # noqa: E402
from xpcnn import datasets  # noqa: E402


def assert_all_allowed(tally, allowed):
    bad = {key: n for key, n in tally.items() if key[1] not in allowed}
    assert not bad, f"outcomes not allowed: {bad}"


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "simplecnn.ckpt"
    reference = hostile.realistic_checkpoint(path)
    return path, reference


def test_realistic_checkpoint_is_realistic(real_checkpoint):
    path, (arrays, meta) = real_checkpoint
    assert 2e6 < path.stat().st_size < 5e6
    assert {"model/conv1.weight", "model/fc1.weight", "optim/6.momentum_buffer"} <= set(arrays)
    assert meta["version"] == ckpt.VERSION and meta["epoch"] == 3


def test_checkpoint_byte_flips(real_checkpoint):
    """About 600 single-byte flips, equally many in each region of the file: local headers,
    .npy headers, metadata JSON, array data, central directory, end records."""
    path, reference = real_checkpoint
    regions = hostile.zip_regions(path.read_bytes())
    assert set(regions) == {
        "local header",
        "npy header",
        "metadata JSON",
        "array data",
        "central directory",
        "end records",
    }

    def outcome():
        return hostile.checkpoint_outcome(path, reference)

    tally = hostile.run_flips(path, regions, 600, seed=0, outcome=outcome)
    assert_all_allowed(tally, {hostile.ERROR, hostile.IDENTICAL})
    # Not a vacuous pass: every region was hit, and changed data was always refused.
    assert {region for region, _ in tally} == set(regions)
    for region in ("npy header", "metadata JSON", "array data"):
        assert tally[region, hostile.IDENTICAL] == 0
        assert tally[region, hostile.ERROR] >= 90
    assert hostile.checkpoint_outcome(path, reference) == hostile.IDENTICAL  # restored


def test_checkpoint_truncations(real_checkpoint):
    path, reference = real_checkpoint
    size = path.stat().st_size

    def outcome():
        return hostile.checkpoint_outcome(path, reference)

    tally = hostile.run_truncations(path, 300, seed=1, outcome=outcome)
    assert tally == {("truncated", hostile.ERROR): 300}
    for cut in (0, 1, 21, 22, size - 22, size - 1):  # the edges, around the end record
        with hostile.truncated(path, cut):
            assert outcome() == hostile.ERROR


def test_checkpoint_hand_made_variants(tmp_path):
    """Metadata (missing fields, lists for dicts, bad shapes/dtypes/digests, deep nesting, huge
    declared shapes), zip structure (compression methods, flags, duplicates, sizes) and .npy
    headers (the TokenError case, code, object dtypes, Fortran order): each gives its own
    CheckpointError, and the valid ones load."""
    results = collections.Counter()
    for i, (label, data, expected) in enumerate(hostile.variants()):
        path = tmp_path / f"v{i}.ckpt"
        path.write_bytes(data)
        got = hostile.variant_outcome(path, expected)
        assert got == ("ok" if expected == "ok" else "error"), f"{label}: {got}"
        results[got] += 1
    assert results["ok"] >= 8 and results["error"] >= 100


@pytest.mark.parametrize(
    "label", ["Linear(20000, 20000) declared in 1 KB", "2**40 elements declared, table agrees"]
)
def test_huge_declared_shape_is_refused_before_allocating(tmp_path, label):
    data = next(d for name, d, _ in hostile.variants() if name == label)
    path = tmp_path / "big.ckpt"
    path.write_bytes(data)
    assert len(data) < 2000
    tracemalloc.start()
    try:
        with pytest.raises(ckpt.CheckpointError, match="but its zip member holds 48"):
            ckpt.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1e6


def test_total_bytes_bound(tmp_path):
    path = tmp_path / "a.ckpt"
    ckpt.save(path, {"w": np.zeros((1000, 250), np.float32), "b": np.zeros(10)}, {})
    ckpt.load(path, max_bytes=1_000_080)
    with pytest.raises(ckpt.CheckpointError, match="arrays total 1000080 bytes, more than the"):
        ckpt.load(path, max_bytes=1_000_079)
    with pytest.raises(ValueError, match="max_bytes"):
        ckpt.load(path, max_bytes=-1)


@pytest.fixture(scope="module")
def idx_files(tmp_path_factory):
    return hostile.mnist_idx_files(tmp_path_factory.mktemp("idx"), count=300)


@pytest.mark.parametrize("name", ["raw images", "raw labels", "gzip images", "gzip labels"])
def test_idx_byte_flips_and_truncations(idx_files, name):
    path, reference = idx_files[name]
    regions = hostile.idx_regions(path.read_bytes())

    def outcome():
        return hostile.idx_outcome(path, reference)

    tally = hostile.run_flips(path, regions, 1000, seed=2, outcome=outcome)
    tally += hostile.run_truncations(path, 300, seed=3, outcome=outcome)
    if name.startswith("raw"):
        # No checksum: a flipped pixel is a valid file; a flipped header byte never is.
        assert_all_allowed(tally, {hostile.ERROR, hostile.AS_WRITTEN})
        assert tally["idx data", hostile.AS_WRITTEN] > 0
        assert tally["idx header", hostile.ERROR] == len(regions["idx header"][0])
    else:
        assert_all_allowed(tally, {hostile.ERROR, hostile.IDENTICAL})
        # (A flip in the unused padding bits of the last deflate byte changes nothing.)
        flips = tally["deflate data", hostile.ERROR] + tally["deflate data", hostile.IDENTICAL]
        assert tally["deflate data", hostile.ERROR] >= 0.95 * flips > 0
        assert tally["gzip trailer", hostile.ERROR] == 8
    assert tally["truncated", hostile.ERROR] == min(300, path.stat().st_size)


def test_directory_label_flips(tmp_path):
    """Flipped label bytes: either refused (a label of 10 or more, naming the file) or loaded
    as written."""
    ds = datasets.load("mnist-5k")
    arrays = {
        "train_images": ds.train_images[:50],
        "train_labels": ds.train_labels[:50],
        "test_images": ds.test_images[:20],
        "test_labels": ds.test_labels[:20],
    }
    stems = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    for key, array in arrays.items():
        (tmp_path / stems[key]).write_bytes(hostile.idx_bytes(array))
    labels = tmp_path / stems["train_labels"]
    rng = np.random.default_rng(4)
    tally = collections.Counter()
    for position in range(len(labels.read_bytes())):
        # Small masks, so that some flipped labels stay below 10.
        with hostile.flipped(labels, position, int(rng.integers(1, 8))):
            spelled = hostile.reference_idx(labels.read_bytes())
            try:
                got = datasets.load_directory(tmp_path)
            except datasets.DatasetError as exc:
                assert str(exc).startswith(str(labels)) and "\n" not in str(exc)
                tally["error"] += 1
                continue
            assert spelled is not None and np.array_equal(got.train_labels, spelled)
            assert got.train_labels.max() < 10
            tally["as-written"] += 1
    assert tally["error"] > 0 and tally["as-written"] > 0


def test_gzip_zeros_is_a_valid_gzip():
    """The bomb generator writes real gzip: honest CRC and length (checked at a small size)."""
    prefix = b"\0\0\x08\x03" + struct.pack(">3I", 5, 28, 28)
    data = hostile.gzip_zeros(prefix, 3 * 2**20 + 123)
    assert gzip.decompress(data) == prefix + bytes(3 * 2**20 + 123)
    assert len(data) < 3 * 2**20 // 1000 + 200


def test_gzip_bomb_is_refused_fast_and_small(tmp_path):
    """Issue 9's bomb: a 4.2 MB gzip with an honest header for 5.5 M images (4.3 GB) and a
    60000-label file. Refused from the headers alone, in a fresh process: under 1 s and under
    100 MB (tracemalloc's peak, and the growth of the process's peak RSS)."""
    directory = hostile.gzip_bomb(tmp_path / "bomb")
    compressed = (directory / "train-images-idx3-ubyte.gz").stat().st_size
    assert 4e6 < compressed < 4.4e6
    with open(directory / "train-images-idx3-ubyte.gz", "rb") as f:
        f.seek(-4, 2)
        assert int.from_bytes(f.read(), "little") == (16 + 5_500_000 * 784) % 2**32
    m = hostile.measure_load(directory)
    assert m["outcome"].startswith("DatasetError")
    assert "has 5500000 images but" in m["outcome"] and "has 60000 labels" in m["outcome"]
    assert m["seconds"] < 1.0
    assert m["tracemalloc_peak"] < 100e6
    assert m["maxrss_after"] - m["maxrss_before"] < 100e6


def test_gzip_decompression_is_bounded_by_the_header(tmp_path):
    """A gzip whose data runs far past its header's claim: decompression stops right after the
    claim, it does not inflate the rest."""
    header = b"\0\0\x08\x01" + struct.pack(">I", 1000)
    path = tmp_path / "x.gz"
    path.write_bytes(hostile.gzip_zeros(header, 200 * 2**20))  # 200 MB of zeros, ~200 KB
    tracemalloc.start()
    try:
        with pytest.raises(datasets.DatasetError, match="trailing bytes after the 1008 bytes"):
            datasets.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5e6


def test_decompress_step_is_bounded(monkeypatch, tmp_path):
    """No single zlib call returns more than asked: the claim is a hard bound."""
    asked = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self, *args):
            self._d = real(*args)

        def decompress(self, data, max_length=0):
            assert max_length > 0
            asked.append(max_length)
            out = self._d.decompress(data, max_length)
            assert len(out) <= max_length
            return out

        def __getattr__(self, name):
            return getattr(self._d, name)

    monkeypatch.setattr(zlib, "decompressobj", Spy)
    path = tmp_path / "x.gz"
    images = np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28)
    path.write_bytes(gzip.compress(hostile.idx_bytes(images)))
    np.testing.assert_array_equal(datasets.read_idx(path), images)
    assert asked and max(asked) <= 5 * 28 * 28
