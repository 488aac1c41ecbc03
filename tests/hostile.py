"""Hostile-input generators for xpcnn's checkpoint and IDX readers, and a CLI to run them at scale.

The fuzz tests (tests/test_fuzz.py) run these with fixed seeds and small samples; anyone can rerun
them larger:

    python tests/hostile.py --checkpoint FILE --flips 10000 --truncations 2000
    python tests/hostile.py --idx FILE --flips 10000 --truncations 2000
    python tests/hostile.py --variants              # hand-made metadata, zip and .npy variants
    python tests/hostile.py --gzip-bomb DIR         # write the gzip bomb of issue 9, time its load
    python tests/hostile.py --kill-saves 100        # kill -9 during back-to-back saves

Without --checkpoint, a realistic checkpoint (SimpleCNN weights and momentum buffers) is made.
Each run prints a tally of outcomes per region of the file and exits 1 if any outcome is not the
documented one: for a checkpoint `CheckpointError` or identical arrays and metadata; for an IDX
file `DatasetError`, the identical array, or (raw files only, which have no checksum) exactly the
array the altered bytes spell.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import io
import json
import os
import pathlib
import struct
import sys
import tempfile
import time
import zipfile
import zlib

import numpy as np

if __package__ in (None, ""):  # run as a script: import the xpcnn next to this file
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from xpcnn import checkpoint as ckpt  # noqa: E402
from xpcnn import datasets  # noqa: E402

# --- outcomes --------------------------------------------------------------------------------

ERROR, IDENTICAL, AS_WRITTEN = "error", "identical", "as-written"
GOOD = {ERROR, IDENTICAL, AS_WRITTEN}


def same_arrays(a: dict, b: dict) -> bool:
    """Same names, dtypes, shapes and bytes."""
    return set(a) == set(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


def checkpoint_outcome(path, reference: tuple[dict, dict], **load_args) -> str:
    """``"error"`` (CheckpointError), ``"identical"``, or a description of what went wrong."""
    try:
        arrays, meta = ckpt.load(path, **load_args)
    except ckpt.CheckpointError as exc:
        if not str(exc).startswith(f"{os.fspath(path)}: ") or "\n" in str(exc):
            return f"BAD MESSAGE {str(exc)[:80]!r}"
        return ERROR
    except Exception as exc:  # noqa: BLE001 - the point is to catch what should not happen
        return f"CRASH {type(exc).__name__}: {str(exc)[:80]}"
    if same_arrays(arrays, reference[0]) and meta == reference[1]:
        return IDENTICAL
    return "DIFFERENT (loaded altered data)"


def reference_idx(data: bytes) -> np.ndarray | None:
    """An independent, minimal raw-IDX parser: the array ``data`` spells, or None if invalid."""
    if len(data) < 4 or data[:3] != b"\0\0\x08" or not 1 <= data[3] <= 4:
        return None
    nd = data[3]
    if len(data) < 4 + 4 * nd:
        return None
    dims = struct.unpack(f">{nd}I", data[4 : 4 + 4 * nd])
    body = data[4 + 4 * nd :]
    if len(body) != int(np.prod(dims, dtype=object)):
        return None
    return np.frombuffer(body, np.uint8).reshape(dims)


def idx_outcome(path, reference: np.ndarray, ndim: int | None = None) -> str:
    """``"error"``, ``"identical"``, ``"as-written"`` (raw file whose altered bytes are a valid
    IDX file, read exactly as written), or a description of what went wrong."""
    try:
        got = datasets.read_idx(path, ndim=ndim)
    except datasets.DatasetError as exc:
        if not str(exc).startswith(f"{path}: ") or "\n" in str(exc):
            return f"BAD MESSAGE {str(exc)[:80]!r}"
        return ERROR
    except Exception as exc:  # noqa: BLE001
        return f"CRASH {type(exc).__name__}: {str(exc)[:80]}"
    if got.dtype != np.uint8 or not got.flags.c_contiguous or not got.flags.writeable:
        return "DIFFERENT (not a writable C-contiguous uint8 array)"
    if got.shape == reference.shape and np.array_equal(got, reference):
        return IDENTICAL
    data = pathlib.Path(path).read_bytes()
    if data[:2] != datasets.GZIP_MAGIC:
        spelled = reference_idx(data)
        if spelled is not None and spelled.shape == got.shape and np.array_equal(spelled, got):
            return AS_WRITTEN
    return "DIFFERENT (loaded data the file does not hold)"


# --- regions of a file -----------------------------------------------------------------------


def zip_regions(data: bytes) -> dict[str, list[range]]:
    """Byte ranges of a checkpoint by role: local headers, .npy headers, metadata JSON, array
    data, central directory, end records."""
    regions = collections.defaultdict(list)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    for info in infos:
        at = info.header_offset
        name_len, extra_len = struct.unpack_from("<2H", data, at + 26)
        start = at + 30 + name_len + extra_len
        regions["local header"].append(range(at, start))
        major = data[start + 6]
        width = 2 if major == 1 else 4
        hlen = int.from_bytes(data[start + 8 : start + 8 + width], "little")
        body = start + 8 + width + hlen
        regions["npy header"].append(range(start, body))
        end = start + info.compress_size
        kind = "metadata JSON" if info.filename == "__meta__.npy" else "array data"
        regions[kind].append(range(body, end))
    eocd = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<2L", data, eocd + 12)
    regions["central directory"].append(range(cd_offset, cd_offset + cd_size))
    regions["end records"].append(range(cd_offset + cd_size, len(data)))
    return dict(regions)


def idx_regions(data: bytes) -> dict[str, list[range]]:
    """Byte ranges of an IDX file by role (raw: header, data; gzip: gzip header, deflate data,
    trailer)."""
    if data[:2] == datasets.GZIP_MAGIC:
        return {
            "gzip header": [range(0, 10)],
            "deflate data": [range(10, len(data) - 8)],
            "gzip trailer": [range(len(data) - 8, len(data))],
        }
    nd = data[3]
    return {"idx header": [range(0, 4 + 4 * nd)], "idx data": [range(4 + 4 * nd, len(data))]}


def stratified(regions: dict[str, list[range]], n: int, rng) -> list[tuple[str, int]]:
    """About ``n`` positions, shared equally among the regions (all of a region's bytes when
    it has fewer than its share), so that small headers are hit as often as large data."""
    out = []
    share = max(1, n // len(regions))
    for name, ranges in regions.items():
        positions = np.concatenate([np.arange(r.start, r.stop) for r in ranges])
        if len(positions) > share:
            positions = rng.choice(positions, share, replace=False)
        out += [(name, int(p)) for p in np.sort(positions)]
    return out


# --- mutation drivers ------------------------------------------------------------------------


@contextlib.contextmanager
def flipped(path, position: int, mask: int):
    """The file at ``path`` with one byte XOR-ed with ``mask``, restored afterwards."""
    with open(path, "r+b") as f:
        f.seek(position)
        old = f.read(1)
        f.seek(position)
        f.write(bytes([old[0] ^ mask]))
    try:
        yield
    finally:
        with open(path, "r+b") as f:
            f.seek(position)
            f.write(old)


@contextlib.contextmanager
def truncated(path, size: int):
    """The file at ``path`` cut to ``size`` bytes, restored afterwards."""
    with open(path, "rb") as f:
        f.seek(size)
        tail = f.read()
    os.truncate(path, size)
    try:
        yield
    finally:
        with open(path, "r+b") as f:  # append the tail back (no truncation to 0: no flush)
            f.seek(size)
            f.write(tail)


def run_flips(path, regions, n, seed, outcome) -> collections.Counter:
    """Flip one byte at a time (random non-zero XOR mask) at ``n`` stratified positions; tally
    ``(region, outcome())``."""
    rng = np.random.default_rng(seed)
    tally = collections.Counter()
    for region, position in stratified(regions, n, rng):
        with flipped(path, position, int(rng.integers(1, 256))):
            tally[region, outcome()] += 1
    return tally


def run_truncations(path, n, seed, outcome) -> collections.Counter:
    """Cut the file at ``n`` lengths (every length from 0 when the file is shorter); tally."""
    size = os.path.getsize(path)
    rng = np.random.default_rng(seed)
    cuts = range(size) if size <= n else np.sort(rng.choice(size, n, replace=False))
    tally = collections.Counter()
    for cut in cuts:
        with truncated(path, int(cut)):
            tally["truncated", outcome()] += 1
    return tally


# --- realistic inputs ------------------------------------------------------------------------


def realistic_checkpoint(path, seed: int = 0) -> tuple[dict, dict]:
    """Write a checkpoint like the trainer's (SimpleCNN weights, SGD momentum buffers, JSON
    metadata with RNG state and history, about 4.5 MB); return ``(arrays, meta)`` as loaded."""
    import xpcnn

    state = xpcnn.SimpleCNN(seed=seed).state_dict()
    rng = np.random.default_rng(seed)
    arrays = {f"model/{k}": np.asarray(v) for k, v in state.items()}
    for i, v in enumerate(state.values()):
        arrays[f"optim/{i}.momentum_buffer"] = rng.standard_normal(v.shape).astype(v.dtype)
    meta = {
        "epoch": 3,
        "step": 0,
        "partial": None,
        "model": {"type": "SimpleCNN", "num_classes": 10},
        "dtype": "float32",
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
        "rng_state": np.random.default_rng(seed).bit_generator.state,
        "history": [{"epoch": e, "loss": 1.0 / e, "test_accuracy": 0.9} for e in (1, 2, 3)],
    }
    ckpt.save(path, arrays, meta)
    return ckpt.load(path)


def mnist_idx_files(directory, count: int = 300) -> dict[str, tuple[pathlib.Path, np.ndarray]]:
    """The first ``count`` embedded MNIST test images and labels, written raw and gzipped into
    ``directory``; name -> (path, array)."""
    ds = datasets.load("mnist-5k")
    directory = pathlib.Path(directory)
    out = {}
    for stem, array in (("images", ds.test_images[:count]), ("labels", ds.test_labels[:count])):
        data = idx_bytes(array)
        raw, gz = directory / f"{stem}-idx", directory / f"{stem}-idx.gz"
        raw.write_bytes(data)
        gz.write_bytes(gzip.compress(data, mtime=0))
        out[f"raw {stem}"], out[f"gzip {stem}"] = (raw, array), (gz, array)
    return out


def idx_bytes(array) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


# --- hand-made archives ----------------------------------------------------------------------


def npy_bytes(array=None, *, header=None, version=(1, 0), body=None) -> bytes:
    """An ``.npy`` member: NumPy's own for ``array``, or a hand-written ``header`` text (any
    string, valid or not) with ``body`` bytes after it."""
    if header is None:
        buf = io.BytesIO(b"")
        np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
        return buf.getvalue()
    text = header.encode("latin1" if version != (3, 0) else "utf-8")
    width = 2 if version == (1, 0) else 4
    prefix = b"\x93NUMPY" + bytes(version)
    return prefix + len(text).to_bytes(width, "little") + text + (body or b"")


def build_zip(members, compression=zipfile.ZIP_STORED) -> bytes:
    """A zip of ``(name, bytes)`` members, correct CRCs, duplicates allowed."""
    buf = io.BytesIO(b"")
    with zipfile.ZipFile(buf, "w", compression) as zf, warnings_off():
        for name, data in members:
            zf.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), data, compression)
    return buf.getvalue()


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def central_entries(data: bytes) -> list[int]:
    """Offsets of the central-directory entries of a plain (non-zip64-end) zip."""
    eocd = data.rfind(b"PK\x05\x06")
    count, _, cd_offset = struct.unpack_from("<H2L", data, eocd + 10)
    offsets, at = [], cd_offset
    for _ in range(count):
        offsets.append(at)
        n, m, k = struct.unpack_from("<3H", data, at + 28)
        at += 46 + n + m + k
    return offsets


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def patch_member(data: bytes, index: int, field: str, value: int) -> bytes:
    """Set a field of member ``index`` in both its central and local headers."""
    central = central_entries(data)[index]
    local = struct.unpack_from("<L", data, central + 42)[0]
    c_off, l_off, fmt = {
        "flags": (8, 6, "<H"),
        "method": (10, 8, "<H"),
        "csize": (20, 18, "<L"),
        "usize": (24, 22, "<L"),
    }[field]
    data = patch(data, central + c_off, fmt, value)
    if field in ("flags", "method"):
        data = patch(data, local + l_off, fmt, value)
    return data


def meta_json(arrays: dict, **changes) -> dict:
    """A valid version-2 metadata dict for ``arrays``, with ``changes`` applied."""
    import hashlib

    meta = {
        "epoch": 1,
        "xpcnn": "0.1.0",
        "format": ckpt.FORMAT,
        "version": 2,
        "arrays": {
            k: {
                "shape": list(v.shape),
                "dtype": v.dtype.str,
                "sha256": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest(),
            }
            for k, v in arrays.items()
        },
    }
    meta.update(changes)
    return meta


def archive(arrays: dict, meta=None, *, meta_raw: bytes | None = None, extra=(), **zip_args):
    """A checkpoint-shaped zip: the metadata entry (``meta`` as JSON, or ``meta_raw`` bytes),
    then ``arrays`` as NumPy writes them, then ``extra`` ``(name, bytes)`` members."""
    raw = meta_raw if meta_raw is not None else json.dumps(meta).encode()
    members = [("__meta__.npy", npy_bytes(np.frombuffer(raw, np.uint8)))]
    members += [(f"{k}.npy", npy_bytes(v)) for k, v in arrays.items()]
    return build_zip(members + list(extra), **zip_args)


def variants() -> list[tuple[str, bytes, str]]:
    """Hand-made checkpoints: ``(label, file bytes, expected)``, expected ``"ok"`` or a fragment
    of the CheckpointError message. They have correct CRCs, so only the loader's own checks can
    refuse them."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    arrays = {"model/w": w, "optim/0.momentum_buffer": np.zeros(5)}
    good = meta_json(arrays)
    out = [("valid", archive(arrays, good), "ok")]
    out.append(("valid, deflated", archive(arrays, good, compression=zipfile.ZIP_DEFLATED), "ok"))
    out.append(("valid, unknown extra field", archive(arrays, dict(good, note=[1, {}])), "ok"))
    v1 = {k: v for k, v in good.items() if k != "xpcnn"}
    out.append(("version 1 without 'xpcnn'", archive(arrays, dict(v1, version=1)), "ok"))

    def bad(label, expected, **kwargs):
        out.append((label, archive(arrays, **kwargs), expected))

    # Metadata that is not the right shape.
    for value in ([], "text", None, 3, [good]):
        bad(f"metadata is {json.dumps(value)[:20]}", "not an xpcnn checkpoint", meta=value)
    for key in ("format", "version", "arrays", "xpcnn"):
        bad(
            f"no {key!r}",
            key if key != "format" else "format",
            meta={k: v for k, v in good.items() if k != key},
        )
    for version in (0, 3, "2", True, 2.0, None):
        bad(f"version {version!r}", "version", meta=dict(good, version=version))
    bad("format wrong", "not an xpcnn checkpoint", meta=dict(good, format="pytorch"))
    bad("'xpcnn' a number", "'xpcnn'", meta=dict(good, xpcnn=1))
    bad("'arrays' a list", "'arrays'", meta=dict(good, arrays=[good["arrays"]]))
    entry = good["arrays"]["model/w"]

    def table(**changes):
        return dict(good, arrays=dict(good["arrays"], **{"model/w": dict(entry, **changes)}))

    for shape in ("3x4", [3, -4], [3.0, 4], [True, 4], [[3], 4], None, [3] * 40):
        bad(f"shape {shape!r}", "'shape'", meta=table(shape=shape))
    for dtype in ("O", "|O", "<U3", "|V8", "<c16", "f4,f4", 4, None, "x" * 100, "<M8[s]"):
        bad(f"table dtype {dtype!r}", "'dtype'", meta=table(dtype=dtype))
    for digest in ("ABC", entry["sha256"].upper(), 0, None, entry["sha256"] + "0"):
        bad(f"sha256 {str(digest)[:10]!r}", "'sha256'", meta=table(sha256=digest))
    bad(
        "entry a list",
        "not a JSON object",
        meta=dict(
            good,
            arrays={"model/w": [], **{k: v for k, v in good["arrays"].items() if k != "model/w"}},
        ),
    )
    bad("table shape differs", "the metadata says", meta=table(shape=[4, 3]))
    bad("table dtype differs", "the metadata says", meta=table(dtype="<f8"))
    bad("table sha256 differs", "SHA-256", meta=table(sha256="0" * 64))
    bad(
        "table lists a missing entry",
        "do not match",
        meta=dict(good, arrays=dict(good["arrays"], ghost=entry)),
    )
    bad("table misses an entry", "do not match", meta=dict(good, arrays={"model/w": entry}))
    # Raw metadata bytes.
    for label, raw, expected in (
        ("deep JSON nesting (100000)", b"[" * 100_000 + b"]" * 100_000, "nested"),
        ("deep JSON nesting (65 objects)", b'{"a":' * 65 + b"1" + b"}" * 65, "nested"),
        ("invalid JSON", b'{"format": ', "not valid JSON"),
        ("not UTF-8", b'{"format": "\xff"}', "not valid JSON"),
        ("huge integer", b'{"epoch": ' + b"9" * 5000 + b"}", "not valid JSON"),
        ("empty", b"", "not valid JSON"),
    ):
        bad(label, expected, meta_raw=raw)
    big = b'{"pad": "' + b" " * (ckpt.MAX_META_BYTES + 1) + b'"}'
    bad("metadata over 16 MiB", "at most", meta_raw=big)
    return out + zip_variants(arrays, good) + npy_variants(arrays, good)


def zip_variants(arrays, good) -> list[tuple[str, bytes, str]]:
    """Zip-structure edits of a valid checkpoint."""
    base = archive(arrays, good)
    meta_member = ("__meta__.npy", npy_bytes(np.frombuffer(json.dumps(good).encode(), np.uint8)))
    w_member = ("model/w.npy", npy_bytes(arrays["model/w"]))
    m_member = ("optim/0.momentum_buffer.npy", npy_bytes(arrays["optim/0.momentum_buffer"]))
    out = []
    for method in (1, 9, 12, 14, 93, 95, 99):
        out.append(
            (
                f"compression method {method}",
                patch_member(base, 1, "method", method),
                "compression method",
            )
        )
    for flag in (0x01, 0x20, 0x40):
        out.append((f"flag 0x{flag:02x}", patch_member(base, 1, "flags", flag), "encrypted"))
    out.append(
        ("duplicate member", build_zip([meta_member, w_member, w_member, m_member]), "twice")
    )
    out.append(
        (
            "member not .npy",
            build_zip([meta_member, w_member, m_member, ("x.pkl", b"x")]),
            "not a <name>.npy",
        )
    )
    out.append(
        (
            "directory member",
            build_zip([meta_member, w_member, m_member, ("d/", b"")]),
            "not a <name>.npy",
        )
    )
    out.append(("no metadata entry", build_zip([w_member, m_member]), "no metadata entry"))
    out.append(
        (
            "extra member",
            build_zip([meta_member, w_member, m_member, ("ghost.npy", npy_bytes(np.zeros(2)))]),
            "do not match",
        )
    )
    out.append(("member missing", build_zip([meta_member, w_member]), "do not match"))
    out.append(("huge uncompressed size", patch_member(base, 1, "usize", 2**32 - 1), "declares"))
    out.append(
        (
            "huge sizes",
            patch_member(patch_member(base, 1, "usize", 2**32 - 2), 1, "csize", 2**32 - 2),
            "past the end",
        )
    )
    eocd = base.rfind(b"PK\x05\x06")
    out.append(
        (
            "end record claims 60000 members",
            patch(patch(base, eocd + 8, "<H", 60000), eocd + 10, "<H", 60000),
            "zip directory declares",
        )
    )
    out.append(
        (
            "end record claims a 4 GB directory",
            patch(base, eocd + 12, "<L", 2**32 - 1),
            "zip directory declares",
        )
    )
    out.append(("archive comment", base[:-2] + struct.pack("<H", 5) + b"hello", "ok"))
    out.append(("garbage prepended (zipfile skips it)", b"\0" * 100 + base, "ok"))
    out.append(("empty file", b"", "unreadable"))
    out.append(("not a zip", b"hello world" * 10, "unreadable"))
    return out


def npy_variants(arrays, good) -> list[tuple[str, bytes, str]]:
    """``.npy`` header edits of ``model/w`` (3x4 float32), with a table that agrees where the
    point is the header itself."""
    w = arrays["model/w"]
    out = []

    def member(label, data, expected, table=None):
        meta = (
            good
            if table is None
            else dict(
                good,
                arrays=dict(
                    good["arrays"], **{"model/w": dict(good["arrays"]["model/w"], **table)}
                ),
            )
        )
        raw = json.dumps(meta).encode()
        members = [
            ("__meta__.npy", npy_bytes(np.frombuffer(raw, np.uint8))),
            ("model/w.npy", data),
            ("optim/0.momentum_buffer.npy", npy_bytes(arrays["optim/0.momentum_buffer"])),
        ]
        out.append((label, build_zip(members), expected))

    body = w.tobytes()
    fine = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }"
    member("hand-written valid header", npy_bytes(header=fine + "\n", body=body), "ok")
    member(".npy version 2.0", npy_bytes(header=fine, version=(2, 0), body=body), "ok")
    member(".npy version 3.0", npy_bytes(header=fine, version=(3, 0), body=body), "ok")
    member(".npy version 9.9", npy_bytes(header=fine, version=(9, 9), body=body), "version")
    for label, header in (
        ("unbalanced brace (TokenError in NumPy)", "{'descr': '<f4', 'fortran_order': False"),
        ("a lone brace", "{"),
        ("python 2 long", "{'descr': '<f4', 'fortran_order': False, 'shape': (3L, 4L), }"),
        ("a call", "__import__('os').system('echo pwned')"),
        ("deep parentheses", "(" * 5000 + ")" * 5000),
        ("a list", "[1, 2, 3]"),
        ("extra key", "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), 'x': 1}"),
        ("missing key", "{'descr': '<f4', 'shape': (3, 4)}"),
        ("shape a list", "{'descr': '<f4', 'fortran_order': False, 'shape': [3, 4]}"),
        ("negative shape", "{'descr': '<f4', 'fortran_order': False, 'shape': (-3, -4)}"),
        ("bool shape", "{'descr': '<f4', 'fortran_order': False, 'shape': (True, 4)}"),
        ("fortran order", "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 4)}"),
        ("fortran order 1", "{'descr': '<f4', 'fortran_order': 1, 'shape': (3, 4)}"),
        ("object dtype", "{'descr': '|O', 'fortran_order': False, 'shape': (3, 4)}"),
        ("structured dtype", "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3, 4)}"),
        ("string dtype", "{'descr': '<U1', 'fortran_order': False, 'shape': (3, 4)}"),
        ("void dtype", "{'descr': '|V4', 'fortran_order': False, 'shape': (3, 4)}"),
        ("not latin-1 safe", "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4)}\udcff"),
    ):
        try:
            data = npy_bytes(header=header, body=body)
        except UnicodeEncodeError:
            data = npy_bytes(
                header=header.encode("utf-8", "surrogateescape").decode("latin1"), body=body
            )
        member(f"npy header: {label}", data, "entry 'model/w'")
    member(
        "header length over the bound",
        b"\x93NUMPY\x02\x00" + (2**31).to_bytes(4, "little") + body,
        "header",
    )
    huge = "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }"
    member(
        "2**40 elements declared, table agrees",
        npy_bytes(header=huge, body=body),
        "holds",
        table={"shape": [2**40]},
    )
    linear = "{'descr': '<f4', 'fortran_order': False, 'shape': (20000, 20000), }"
    member(
        "Linear(20000, 20000) declared in 1 KB",
        npy_bytes(header=linear, body=body),
        "holds",
        table={"shape": [20000, 20000]},
    )
    member(
        "shape differs from the table",
        npy_bytes(header="{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), }", body=body),
        "the metadata says",
    )
    member(
        "dtype differs from the table",
        npy_bytes(header="{'descr': '<i4', 'fortran_order': False, 'shape': (3, 4), }", body=body),
        "the metadata says",
    )
    member(
        "big-endian dtype, table agrees",
        npy_bytes(
            header="{'descr': '>f4', 'fortran_order': False, 'shape': (3, 4), }",
            body=w.astype(">f4").tobytes(),
        ),
        "SHA-256",
        table={"dtype": ">f4"},
    )
    member("bytes after the data", npy_bytes(header=fine, body=body + b"\0"), "holds")
    member("bytes missing", npy_bytes(header=fine, body=body[:-1]), "holds")
    return out


def variant_outcome(path, expected: str) -> str:
    """``"ok"`` if the file loads, ``"error"`` if refused with ``expected`` in the message."""
    try:
        ckpt.load(path)
    except ckpt.CheckpointError as exc:
        message = str(exc)
        if not message.startswith(f"{os.fspath(path)}: ") or "\n" in message:
            return f"BAD MESSAGE {message[:80]!r}"
        return "error" if expected and expected in message else f"error: {message[:160]}"
    except Exception as exc:  # noqa: BLE001
        return f"CRASH {type(exc).__name__}: {str(exc)[:80]}"
    return "ok"


# --- the gzip bomb of issue 9 ----------------------------------------------------------------


def gzip_zeros(prefix: bytes, zeros: int, segment: int = 2**20) -> bytes:
    """A single-member gzip of ``prefix`` followed by ``zeros`` zero bytes, made without
    compressing them all: after a full flush deflate restarts, so every 1 MiB segment of zeros
    compresses to the same bytes; the CRC is computed over the zeros in C."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = [c.compress(prefix), c.flush(zlib.Z_FULL_FLUSH)]
    block = c.compress(bytes(segment)) + c.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(zeros, segment)
    body.append(block * full)
    body.append(c.compress(bytes(rest)) + c.flush())
    crc = zlib.crc32(prefix)
    chunk = bytes(16 * segment)
    left = zeros
    while left:
        n = min(left, len(chunk))
        crc = zlib.crc32(memoryview(chunk)[:n], crc)
        left -= n
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    size = (len(prefix) + zeros) % 2**32
    return head + b"".join(body) + struct.pack("<2L", crc, size)


def gzip_bomb(directory, images: int = 5_500_000) -> pathlib.Path:
    """Issue 9's bomb: train images gzipped with an honest header for ``images`` 28x28 images
    (4.3 GB of zeros in about 4.2 MB), next to a normal labels file of 60000 labels, plus a
    small valid test split. Returns the directory."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", images, 28, 28)
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip_zeros(header, images * 784))
    labels = np.zeros(60000, np.uint8)
    (directory / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    (directory / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((10, 28, 28))))
    (directory / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(10)))
    return directory


MEASURE = r"""
import resource, sys, time, tracemalloc
from xpcnn import datasets
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
start = time.perf_counter()
try:
    datasets.load_directory(sys.argv[1])
    outcome = "loaded"
except datasets.DatasetError as exc:
    outcome = "DatasetError: " + str(exc)
seconds = time.perf_counter() - start
peak = tracemalloc.get_traced_memory()[1]
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(repr((outcome, seconds, peak, before * 1024, after * 1024)))
"""


def measure_load(directory) -> dict:
    """Load ``directory`` in a fresh Python process; returns the outcome, the seconds the load
    took, tracemalloc's peak during it, and the process's peak RSS before and after (bytes)."""
    import ast
    import subprocess

    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(directory)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    outcome, seconds, peak, rss_before, rss_after = ast.literal_eval(done.stdout.strip())
    return {
        "outcome": outcome,
        "seconds": seconds,
        "tracemalloc_peak": peak,
        "maxrss_before": rss_before,
        "maxrss_after": rss_after,
    }


# --- kill -9 during saves --------------------------------------------------------------------


def link_empty_path(fd: int, directory: str) -> str:
    """Link the unnamed file ``fd`` into ``directory`` with ``linkat(AT_EMPTY_PATH)`` (Linux,
    needs CAP_DAC_READ_SEARCH): what `xpcnn.checkpoint` does through ``/proc/self/fd`` on a
    usual kernel, for sandboxes that refuse that link (EXDEV), so the unnamed path can still be
    exercised there."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    while True:
        name = ckpt._tmp_name(directory)
        if libc.linkat(fd, b"", -100, os.fsencode(name), 0x1000) == 0:  # AT_FDCWD, AT_EMPTY_PATH
            return name
        err = ctypes.get_errno()
        if err != 17:  # EEXIST: try another name
            raise OSError(err, os.strerror(err), name)


SAVER = """
import itertools, sys
sys.path[:0] = sys.argv[4:6]
import hostile
from xpcnn import checkpoint as ckpt
if sys.argv[2] == "named":
    ckpt._open_unnamed = lambda directory: None
if sys.argv[3] == "empty-path":
    ckpt._link_unnamed = hostile.link_empty_path
arrays, meta = ckpt.load(sys.argv[6])
print("saving", flush=True)
for epoch in itertools.count():
    ckpt.save(sys.argv[1], arrays, dict(meta, epoch=epoch))
"""


def kill_during_saves(directory, kills: int, *, named=False, link="proc", seed=0) -> dict:
    """Save a realistic checkpoint back to back in a child process and ``kill -9`` it at a
    random moment, ``kills`` times. After each kill the checkpoint must load and at most one
    temporary file may be there (each save removes what the last killed one left); at the end
    one more write must leave no temporary file. Returns the counts."""
    import random
    import signal
    import subprocess

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / "source.ckpt"
    realistic_checkpoint(source)
    work = directory / "run"
    work.mkdir(exist_ok=True)
    target = work / "run.ckpt"
    here = pathlib.Path(__file__).resolve().parent
    paths = [str(here), str(here.parent)]
    rng = random.Random(seed)
    left, intact = [], 0
    for _ in range(kills):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SAVER,
                str(target),
                "named" if named else "unnamed",
                link,
                *paths,
                str(source),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        proc.stdout.readline()
        time.sleep(rng.uniform(0.01, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        left.append(len([n for n in os.listdir(work) if n.startswith(ckpt.TMP_PREFIX)]))
        try:
            ckpt.load(target)
            intact += 1
        except ckpt.CheckpointError:
            pass
    ckpt.atomic_write(work / "other", lambda f: f.write(b"x"))
    return {
        "kills": kills,
        "checkpoint loaded after the kill": intact,
        "kills that left a temporary file": sum(1 for n in left if n),
        "most temporary files at once": max(left, default=0),
        "temporary files after one more write": sum(
            1 for n in os.listdir(work) if n.startswith(ckpt.TMP_PREFIX)
        ),
    }


# --- command line ----------------------------------------------------------------------------


def print_tally(title: str, tally: collections.Counter) -> bool:
    """Print ``(region, outcome) -> count``; return True if every outcome is a good one."""
    print(title)
    ok = True
    for (region, outcome), count in sorted(tally.items()):
        mark = "" if outcome in GOOD or outcome == "ok" else "   <-- NOT ALLOWED"
        ok &= not mark
        print(f"  {region:20} {outcome:40} {count:6}{mark}")
    totals = collections.Counter()
    for (_, outcome), count in tally.items():
        totals[outcome] += count
    print("  total: " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items())))
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint to mutate (default: make one)")
    parser.add_argument("--idx", help="IDX file to mutate, raw or gzip")
    parser.add_argument("--flips", type=int, default=1000)
    parser.add_argument("--truncations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", action="store_true", help="run the hand-made variants")
    parser.add_argument("--gzip-bomb", metavar="DIR", help="write issue 9's bomb, time its load")
    parser.add_argument("--kill-saves", type=int, metavar="N", help="kill -9 N back-to-back saves")
    parser.add_argument("--named", action="store_true", help="with --kill-saves: no O_TMPFILE")
    parser.add_argument(
        "--link",
        choices=["proc", "empty-path"],
        default="proc",
        help="with --kill-saves: link unnamed files through /proc (xpcnn's way) or with "
        "linkat(AT_EMPTY_PATH) (root; for sandboxes that refuse the /proc link)",
    )
    args = parser.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        if args.gzip_bomb:
            start = time.perf_counter()
            gzip_bomb(args.gzip_bomb)
            size = os.path.getsize(pathlib.Path(args.gzip_bomb) / "train-images-idx3-ubyte.gz")
            print(f"wrote the bomb ({size} bytes) in {time.perf_counter() - start:.1f} s")
            m = measure_load(args.gzip_bomb)
            print(f"  {m['outcome']}")
            print(
                f"  refused in {m['seconds'] * 1000:.1f} ms; tracemalloc peak "
                f"{m['tracemalloc_peak'] / 2**20:.2f} MiB; process peak RSS "
                f"{m['maxrss_before'] / 2**20:.1f} MiB before, {m['maxrss_after'] / 2**20:.1f} "
                "MiB after"
            )
            ok &= m["outcome"].startswith("DatasetError") and m["seconds"] < 1
        if args.kill_saves:
            counts = kill_during_saves(
                pathlib.Path(tmp) / "kills", args.kill_saves, named=args.named, link=args.link
            )
            mode = "named temporary files" if args.named else f"O_TMPFILE, {args.link} link"
            print(f"kill -9 during back-to-back saves ({mode})")
            for key, value in counts.items():
                print(f"  {key:40} {value:6}")
            ok &= counts["checkpoint loaded after the kill"] == args.kill_saves
            ok &= counts["most temporary files at once"] <= 1
            ok &= counts["temporary files after one more write"] == 0
        if args.variants:
            tally = collections.Counter()
            for i, (label, data, expected) in enumerate(variants()):
                path = pathlib.Path(tmp) / f"v{i}.ckpt"
                path.write_bytes(data)
                got = variant_outcome(path, expected)
                want = "ok" if expected == "ok" else "error"
                tally["variants", got if got in ("ok", "error") else "WRONG"] += 1
                if got != want:
                    ok = False
                    print(f"  {label}: expected {want} ({expected!r}), got {got}")
            ok &= print_tally("hand-made variants", tally)
        if args.idx:
            path = pathlib.Path(tmp) / pathlib.Path(args.idx).name
            path.write_bytes(pathlib.Path(args.idx).read_bytes())
            reference = datasets.read_idx(path)
            regions = idx_regions(path.read_bytes())

            def outcome():
                return idx_outcome(path, reference)

            tally = run_flips(path, regions, args.flips, args.seed, outcome)
            tally += run_truncations(path, args.truncations, args.seed, outcome)
            ok &= print_tally(f"{args.idx}: byte flips and truncations", tally)
        if args.checkpoint or not (args.idx or args.variants or args.gzip_bomb or args.kill_saves):
            path = pathlib.Path(tmp) / "c.ckpt"
            if args.checkpoint:
                path.write_bytes(pathlib.Path(args.checkpoint).read_bytes())
                reference = ckpt.load(path)
            else:
                reference = realistic_checkpoint(path)
            regions = zip_regions(path.read_bytes())

            def outcome():
                return checkpoint_outcome(path, reference)

            start = time.perf_counter()
            tally = run_flips(path, regions, args.flips, args.seed, outcome)
            tally += run_truncations(path, args.truncations, args.seed, outcome)
            title = f"{args.checkpoint or 'a SimpleCNN checkpoint'}: byte flips and truncations"
            ok &= print_tally(f"{title} ({time.perf_counter() - start:.1f} s)", tally)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
