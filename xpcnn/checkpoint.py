"""Checkpoints: an ``.npz`` archive of plain numeric arrays plus one JSON metadata entry.

No pickle, in either direction: arrays are written with ``numpy.savez`` and read back with
``allow_pickle=False``; everything else (architecture, dtype, epoch, RNG state, history,
optimizer settings) is JSON. The metadata records every array's shape, dtype and SHA-256, so a
truncated, altered or hand-edited file is refused with a message that names the file and the
entry. Writes are atomic: a temporary file in the same directory, fsync, then rename, so a crash
or Ctrl-C during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "xpcnn-checkpoint"
VERSION = 1
_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or does not fit; the message names the file."""


def _digest(a):
    return hashlib.sha256(np.array(a, order="C", copy=None).tobytes()).hexdigest()


def save(path, arrays, meta):
    """Write ``arrays`` (name -> NumPy array) and JSON-able ``meta`` to ``path`` atomically.
    Raises TypeError for a non-numeric array (object arrays would need pickle)."""
    path = os.fspath(path)
    arrays = {k: np.array(v, order="C", copy=None) for k, v in arrays.items()}  # keeps 0-d
    for k, v in arrays.items():
        if v.dtype.kind not in "biuf":
            raise TypeError(f"checkpoint array {k!r} has non-numeric dtype {v.dtype}")
    meta = dict(
        meta,
        format=FORMAT,
        version=VERSION,
        arrays={
            k: {"shape": list(v.shape), "dtype": v.dtype.str, "sha256": _digest(v)}
            for k, v in arrays.items()
        },
    )
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **{_META: blob}, **arrays))


def atomic_write(path, write):
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it over
    ``path``: a crash or Ctrl-C at any moment leaves either the old file or the complete new
    one, never a mix. The temporary file is removed if anything fails."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load(path):
    """Read and verify a checkpoint. Returns ``(arrays, meta)``; raises CheckpointError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with open(path, "rb") as f:
            data = f.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            names = list(z.files)
            if _META not in names:
                raise CheckpointError(f"{path}: not an xpcnn checkpoint (no metadata entry)")
            meta = json.loads(bytes(z[_META]).decode())
            arrays = {k: z[k] for k in names if k != _META}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path}: unreadable checkpoint, truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an xpcnn checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {meta.get('version')}, this xpcnn reads version {VERSION}"
        )
    listed = meta.get("arrays", {})
    if set(listed) != set(arrays):
        raise CheckpointError(
            f"{path}: entries {sorted(set(arrays) ^ set(listed))} do not match "
            "the metadata (missing or added)"
        )
    for k, info in listed.items():
        a = arrays[k]
        if list(a.shape) != info["shape"] or a.dtype.str != info["dtype"]:
            raise CheckpointError(
                f"{path}: entry {k!r} is {a.dtype.str}{list(a.shape)}, the "
                f"metadata says {info['dtype']}{info['shape']}"
            )
        if _digest(a) != info["sha256"]:
            raise CheckpointError(f"{path}: entry {k!r} fails its SHA-256 check (altered)")
    return arrays, meta
