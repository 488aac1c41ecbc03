"""Checkpoints: a ``.npz`` archive of plain numeric arrays plus one JSON metadata entry.

No pickle, in either direction: each array is an ``.npy`` member of a zip archive and
everything else (architecture, dtype, epoch, RNG state, history, optimizer settings) is JSON.
A checkpoint file is untrusted input. `load` reads it in this order, refusing anything
malformed with a `CheckpointError` whose message starts with the file's path:

1. the zip directory: its declared size and member count are bounded before ``zipfile`` reads
   it; every member must be ``<name>.npy``, unique, unencrypted, stored or deflated, and its
   declared sizes must fit in the file;
2. the metadata entry (at most `MAX_META_BYTES`, JSON nested at most `MAX_JSON_DEPTH` deep): its
   format, version and table of arrays (shape, dtype, SHA-256 per entry) are type-checked;
3. every ``.npy`` header (read as a literal with ``ast.literal_eval``, never run): numeric
   dtype, C order, and a shape whose size is exactly what the zip directory says the member
   holds; the table must name the same entries with the same shapes and dtypes, and their total
   size must be at most ``max_bytes`` (default `MAX_BYTES`);
4. only then the array bytes, each checked against its SHA-256.

So a damaged or hostile file cannot make the loader allocate more than it holds, run code, or
end in any other exception. Writes are atomic (`atomic_write`): an unnamed temporary file (or,
where the system lacks ``O_TMPFILE``, a named one that later writes clean up), fsync, then
rename, so a crash, ``kill -9`` or Ctrl-C during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np

FORMAT = "xpcnn-checkpoint"
#: Written by `save`. Version 2 adds the ``"xpcnn"`` field (the writer's version); the files
#: are otherwise alike, so version 1 files (xpcnn 0.1) load unchanged.
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

#: Default bound on the total bytes of a checkpoint's arrays; ``load(path, max_bytes=...)``
#: raises or lowers it.
MAX_BYTES = 2 * 2**30
#: Bound on the metadata entry's JSON text.
MAX_META_BYTES = 16 * 2**20
#: Bound on the nesting depth of the metadata JSON (an object or array is one level).
MAX_JSON_DEPTH = 64
#: Bounds on the zip directory, checked before ``zipfile`` parses it.
MAX_MEMBERS = 10_000
MAX_DIRECTORY_BYTES = 8 * 2**20
#: Bounds on one ``.npy`` header (NumPy's own reader allows 10000 bytes) and its shape.
MAX_NPY_HEADER = 10_000
MAX_NDIM = 32
#: Longest array name `save` writes and `load` accepts.
MAX_NAME = 1000
#: Deflate cannot expand data by more than about 1032:1.
DEFLATE_MAX_RATIO = 1100
#: Prefix of every temporary file `atomic_write` and `check_writable` create; stale ones are
#: removed by later writes into the same directory.
TMP_PREFIX = ".xpcnn-tmp-"

_META = "__meta__"
_NPY_MAGIC = b"\x93NUMPY"
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: what needs no pickle to mean anything
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 2**20
# POSIX open flags, 0 where the system lacks them (Windows).
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or does not fit; the message names the file."""


class _Refused(Exception):
    """Internal: a reason to refuse the file; `load` prefixes the path."""


def _one_line(text: object, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _version() -> str:
    from . import __version__  # lazy: the package imports this module while initializing

    return __version__


# --- writing ---------------------------------------------------------------------------------


def _json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a JSON-like value (0 for a scalar), without recursion; stops counting
    once past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def save(path: str | os.PathLike, arrays: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Write ``arrays`` (name -> NumPy array) and JSON-able ``meta`` to ``path`` atomically.

    Adds ``format``, ``version``, ``xpcnn`` (this package's version, unless ``meta`` has one)
    and ``arrays`` (shape, dtype, SHA-256 of each array) to the metadata. Raises TypeError for a
    non-numeric array (object arrays would need pickle) or a metadata value JSON cannot hold,
    and ValueError for an array name or metadata that `load` would refuse.
    """
    path = os.fspath(path)
    arrays = {k: np.asarray(v, order="C") for k, v in arrays.items()}  # keeps 0-d arrays 0-d
    for k, v in arrays.items():
        if not isinstance(k, str) or not k or k == _META or len(k) > MAX_NAME or "\0" in k:
            raise ValueError(f"checkpoint array name {k!r} is not allowed")
        if v.dtype.kind not in _NUMERIC_KINDS or v.dtype.fields is not None:
            raise TypeError(f"checkpoint array {k!r} has non-numeric dtype {v.dtype}")
        if v.ndim > MAX_NDIM:
            raise ValueError(f"checkpoint array {k!r} has {v.ndim} dimensions, at most {MAX_NDIM}")
    meta = dict(meta)
    meta.setdefault("xpcnn", _version())
    meta.update(
        format=FORMAT,
        version=VERSION,
        arrays={
            k: {
                "shape": list(v.shape),
                "dtype": v.dtype.str,
                "sha256": hashlib.sha256(v.reshape(-1).view(np.uint8)).hexdigest(),
            }
            for k, v in arrays.items()
        },
    )
    if _json_depth(meta) > MAX_JSON_DEPTH:
        raise ValueError(f"checkpoint metadata is nested more than {MAX_JSON_DEPTH} deep")
    text = json.dumps(meta).encode()
    if len(text) > MAX_META_BYTES:
        raise ValueError(
            f"checkpoint metadata is {len(text)} bytes of JSON, at most {MAX_META_BYTES}"
        )
    blob = np.frombuffer(text, dtype=np.uint8)

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, array in [(_META, blob), *arrays.items()]:
                # A fixed timestamp: equal inputs give byte-identical files.
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o644 << 16
                with zf.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    atomic_write(path, write)


# --- atomic writes ---------------------------------------------------------------------------

_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(\d+)-[A-Za-z0-9_]+\Z")


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: count every pid as alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # exists but is not ours (PermissionError), or not a real pid
    except OSError:
        return True
    return True


def _remove_stale(directory: str) -> list[str]:
    """Remove temporary files of our naming in ``directory`` left by dead processes.

    A file qualifies when the pid in its name is not running here and no process holds the
    ``flock`` its writer takes (released by the kernel even on ``kill -9``), so a live writer
    in another PID namespace or on another host sharing the directory keeps its file. Best
    effort: errors are ignored. Returns the names removed.
    """
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        full = os.path.join(directory, name)
        try:
            fd = os.open(full, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            if not _try_lock(fd):
                continue  # a writer still holds it
            os.unlink(full)
            removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX: the pid test alone decides
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True  # no flock on this file system: the pid test alone decides
    return True


def _tmp_name(directory: str) -> str:
    return os.path.join(directory, f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}")


def _open_named(directory: str) -> tuple[int, str]:
    """Create a fresh temporary file of our naming, mode 0666 & ~umask, locked while open."""
    while True:
        name = _tmp_name(directory)
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | _CLOEXEC | getattr(os, "O_BINARY", 0),
                0o666,
            )
        except FileExistsError:
            continue
        _try_lock(fd)
        return fd, name


def _open_unnamed(directory: str) -> int | None:
    """An unnamed file in ``directory`` (Linux ``O_TMPFILE``), or None where unsupported."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        fd = os.open(directory, flag | os.O_RDWR | _CLOEXEC, 0o666)
    except OSError:
        return None  # EOPNOTSUPP, EISDIR (old kernel), ...: the named fallback reports real errors
    _try_lock(fd)
    return fd


#: Devices (``st_dev``) where an unnamed file could not be linked into place (some sandboxes
#: refuse links through ``/proc/self/fd``): later writes there use a named file from the start.
_NO_LINK: set[int] = set()


def _link_unnamed(fd: int, directory: str) -> str:
    """Give the unnamed file ``fd`` a temporary name of our naming; returns it."""
    while True:
        name = _tmp_name(directory)
        try:
            os.link(f"/proc/self/fd/{fd}", name, follow_symlinks=True)
            return name
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it over
    ``path``, so that a crash, ``kill -9`` or Ctrl-C at any moment leaves either the old file or
    the complete new one, never a mix.

    On Linux the temporary file is unnamed (``O_TMPFILE``) until it is complete, then linked
    in through ``/proc/self/fd`` and renamed, so a crash leaves nothing behind except in the
    instant between link and rename. Elsewhere (and where the link is refused) it is named
    ``.xpcnn-tmp-<pid>-<random>`` from the start and removed on failure. Any such file that a
    killed process left is removed by the next `atomic_write` or `check_writable` in the same
    directory.
    The new file gets the usual permissions, 0666 minus the umask.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_stale(directory)
    device = os.stat(directory).st_dev
    fd = None if device in _NO_LINK else _open_unnamed(directory)
    tmp = None
    if fd is None:
        fd, tmp = _open_named(directory)
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if tmp is None:
            try:
                tmp = _link_unnamed(fd, directory)
            except OSError:  # /proc refused the link: copy into a named file, this once
                _NO_LINK.add(device)
                tmp = _copy_to_named(fd, directory)
        os.replace(tmp, path)
        tmp = None
    finally:
        os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _copy_to_named(src: int, directory: str) -> str:
    fd, name = _open_named(directory)
    try:
        offset = 0
        while chunk := os.pread(src, _CHUNK, offset):
            offset += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return name


def check_writable(path: str | os.PathLike, size: int = 0) -> None:
    """Check, before any work, that `atomic_write` can later write ``path``.

    Creates the directory if missing (as `atomic_write` would), then creates, fills with one
    byte, fsyncs and removes a temporary file of our naming there; with ``size``, also checks
    that the file system has that many bytes free. Raises `CheckpointError` naming ``path``
    and the reason: a directory (or other non-file) at ``path``, a directory that cannot be
    created or written, a full or read-only file system.
    """
    path = os.fspath(path)
    full = os.path.abspath(path)
    directory = os.path.dirname(full)

    def refuse(reason: str) -> CheckpointError:
        return CheckpointError(f"{path}: cannot write a checkpoint here: {reason}")

    if os.path.isdir(full):
        raise refuse("it is a directory")
    if os.path.exists(full) and not os.path.isfile(full):
        raise refuse("it exists and is not a regular file")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise refuse(f"cannot create directory {directory}: {exc.strerror or exc}") from None
    _remove_stale(directory)
    try:
        fd, name = _open_named(directory)
    except OSError as exc:
        raise refuse(f"cannot create a file in {directory}: {exc.strerror or exc}") from None
    try:
        os.write(fd, b"\0")
        os.fsync(fd)
        if size > 0:
            st = os.fstatvfs(fd)
            free = st.f_bavail * st.f_frsize
            if free < size:
                raise OSError(errno.ENOSPC, f"{free} bytes free, {size} needed")
    except OSError as exc:
        raise refuse(f"cannot write in {directory}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass


# --- reading ---------------------------------------------------------------------------------

_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


def _read_at(f: IO[bytes], offset: int, count: int) -> bytes:
    f.seek(offset)
    return f.read(count)


def _check_directory(f: IO[bytes], size: int) -> None:
    """Bound the zip directory's declared size and member count before ``zipfile`` reads it
    (it builds an object per member), mirroring how ``zipfile`` finds the end record."""
    tail_len = min(size, _EOCD.size + 2**16)
    tail = _read_at(f, size - tail_len, tail_len)
    if tail[-_EOCD.size : 4 - _EOCD.size] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        at = len(tail) - _EOCD.size  # no archive comment: zipfile's first guess
    else:
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise _Refused("unreadable checkpoint, truncated or corrupt (no zip directory record)")
    entries, directory_bytes = _EOCD.unpack_from(tail, at)[4:6]
    end = size - tail_len + at
    if end >= _ZIP64_LOCATOR.size:
        sig, _, offset, _ = _ZIP64_LOCATOR.unpack(
            _read_at(f, end - _ZIP64_LOCATOR.size, _ZIP64_LOCATOR.size)
        )
        if sig == b"PK\x06\x07":
            record = _read_at(f, end - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size, _ZIP64_EOCD.size)
            if len(record) != _ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
                raise _Refused("unreadable checkpoint, truncated or corrupt (bad zip64 record)")
            entries, directory_bytes = _ZIP64_EOCD.unpack(record)[7:9]
    if entries > MAX_MEMBERS or directory_bytes > MAX_DIRECTORY_BYTES:
        raise _Refused(
            f"zip directory declares {entries} members in {directory_bytes} bytes, at most "
            f"{MAX_MEMBERS} in {MAX_DIRECTORY_BYTES}"
        )


def _check_members(infos: list[zipfile.ZipInfo], size: int) -> dict[str, zipfile.ZipInfo]:
    """Name -> member, after checking names, flags, compression and declared sizes."""
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if not name.endswith(".npy") or len(name) <= 4 or len(name) > MAX_NAME + 4:
            raise _Refused(f"zip member {_one_line(repr(name), 80)} is not a <name>.npy array")
        key = name[:-4]
        if key in members:
            raise _Refused(f"zip member {name!r} appears twice")
        if info.flag_bits & 0x61:  # 0x01 encrypted, 0x20 patched data, 0x40 strong encryption
            raise _Refused(
                f"entry {key!r} is encrypted or patched (zip flags 0x{info.flag_bits:x})"
            )
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _Refused(
                f"entry {key!r} uses zip compression method {info.compress_type}; "
                "only stored (0) and deflate (8) are read"
            )
        if info.header_offset + 30 + len(name) + info.compress_size > size:
            raise _Refused(
                f"entry {key!r} declares {info.compress_size} bytes at offset "
                f"{info.header_offset}, past the end of the {size}-byte file (truncated)"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise _Refused(
                f"entry {key!r} is stored with {info.compress_size} bytes but declares "
                f"{info.file_size}"
            )
        if info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
            raise _Refused(
                f"entry {key!r} declares {info.file_size} bytes, more than its "
                f"{info.compress_size} compressed bytes can hold"
            )
        members[key] = info
    return members


def _read_exact(stream: IO[bytes], count: int) -> bytes:
    data = stream.read(count)
    if len(data) != count:
        raise _Refused("unreadable checkpoint, truncated or corrupt (an entry ends early)")
    return data


def _npy_header(stream: IO[bytes], key: str) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parse an ``.npy`` header: ``(dtype, shape, bytes before the data)``. Only C-order
    arrays of a numeric dtype are accepted; the header is read as a literal, never run."""
    pre = _read_exact(stream, 8)
    if pre[:6] != _NPY_MAGIC:
        raise _Refused(f"entry {key!r} is not an .npy array (bad magic {pre[:6]!r})")
    version = (pre[6], pre[7])
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise _Refused(f"entry {key!r} has .npy format version {version}, not 1.0, 2.0 or 3.0")
    width = 2 if version == (1, 0) else 4
    length = int.from_bytes(_read_exact(stream, width), "little")
    if length > MAX_NPY_HEADER:
        raise _Refused(f"entry {key!r} has a {length}-byte .npy header, at most {MAX_NPY_HEADER}")
    raw = _read_exact(stream, length)
    try:
        text = raw.decode("utf-8" if version == (3, 0) else "latin1")
        header = ast.literal_eval(text)
    except Exception as exc:  # SyntaxError, ValueError, MemoryError, RecursionError, ...
        raise _Refused(
            f"entry {key!r} has an unreadable .npy header ({type(exc).__name__})"
        ) from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise _Refused(f"entry {key!r} has a malformed .npy header {_one_line(repr(header), 80)}")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    dtype = _numeric_dtype(descr)
    if dtype is None:
        raise _Refused(
            f"entry {key!r} has dtype {_one_line(repr(descr), 60)}; only numeric are read"
        )
    if fortran is not False:
        raise _Refused(f"entry {key!r} has fortran_order {fortran!r}; xpcnn writes C order only")
    if not _is_shape(shape) or not isinstance(shape, tuple):
        raise _Refused(f"entry {key!r} has a malformed .npy shape {_one_line(repr(shape), 80)}")
    return dtype, shape, 8 + width + length


def _numeric_dtype(descr: object) -> np.dtype | None:
    if not isinstance(descr, str) or len(descr) > 16:
        return None
    try:
        dtype = np.dtype(descr)
    except Exception:
        return None
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype:
        return None
    if dtype.itemsize == 0:
        return None
    return dtype


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(shape: object) -> bool:
    return (
        isinstance(shape, (tuple, list))
        and len(shape) <= MAX_NDIM
        and all(_is_int(d) and d >= 0 for d in shape)
    )


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _parse_meta(raw: bytes) -> dict:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise _Refused(
            f"metadata JSON is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        ) from None
    except Exception as exc:  # UnicodeDecodeError, JSONDecodeError, ValueError (huge ints), ...
        raise _Refused(f"metadata is not valid JSON ({_one_line(exc, 120)})") from None
    if _json_depth(meta) > MAX_JSON_DEPTH:
        raise _Refused(f"metadata JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    if not isinstance(meta, dict):
        raise _Refused(f"not an xpcnn checkpoint (metadata is a JSON {_json_type(meta)})")
    if meta.get("format") != FORMAT:
        raise _Refused(
            f"not an xpcnn checkpoint (format {_one_line(repr(meta.get('format')), 60)})"
        )
    version = meta.get("version")
    if not _is_int(version) or version not in SUPPORTED_VERSIONS:
        raise _Refused(
            f"checkpoint version {_one_line(repr(version), 40)}, this xpcnn reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
        )
    if version >= 2 and not isinstance(meta.get("xpcnn"), str):
        raise _Refused("metadata field 'xpcnn' (the writer's version) must be a string")
    table = meta.get("arrays")
    if not isinstance(table, dict):
        raise _Refused("metadata field 'arrays' must be a JSON object")
    for key, info in table.items():
        problem = None
        if not isinstance(info, dict):
            problem = "is not a JSON object"
        elif not _is_shape(info.get("shape")) or not isinstance(info.get("shape"), list):
            problem = "needs 'shape', a list of non-negative integers"
        elif _numeric_dtype(info.get("dtype")) is None:
            problem = "needs 'dtype', a numeric NumPy dtype string"
        elif not isinstance(info.get("sha256"), str) or not _SHA256.fullmatch(info["sha256"]):
            problem = "needs 'sha256', 64 lowercase hex digits"
        if problem:
            raise _Refused(f"metadata entry {_one_line(repr(key), 80)} {problem}")
    return meta


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> tuple[Any, ...]:
    with zf.open(info) as stream:
        dtype, shape, header = _npy_header(stream, key)
        nbytes = math.prod(shape) * dtype.itemsize
        if header + nbytes != info.file_size:
            raise _Refused(
                f"entry {key!r} declares {dtype.str}{list(shape)} ({nbytes} bytes), but its "
                f"zip member holds {info.file_size - header}"
            )
    return dtype, shape, header, nbytes


def _read_data(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, expect: tuple) -> bytearray:
    with zf.open(info) as stream:
        if _npy_header(stream, key) != expect[:3]:
            raise _Refused(f"entry {key!r} changed while being read")
        buf = bytearray(expect[3])
        view, got = memoryview(buf), 0
        while got < len(buf):
            chunk = stream.read(min(_CHUNK, len(buf) - got))
            if not chunk:
                raise _Refused(
                    f"unreadable checkpoint, truncated or corrupt (entry {key!r} ends early)"
                )
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        if stream.read(1):
            raise _Refused(f"entry {key!r} has bytes after its data")
    return buf


def load(
    path: str | os.PathLike, max_bytes: int = MAX_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read and verify a checkpoint; returns ``(arrays, meta)``.

    Raises `CheckpointError`, its message starting with the path, for anything else than a
    complete, unaltered checkpoint of a supported version (see the module docstring for the
    checks and their order) or one whose arrays total more than ``max_bytes`` bytes. Allocates
    at most ``max_bytes`` for the arrays and `MAX_META_BYTES` for the metadata, and only once
    the file's structure says they are there; never unpickles.
    """
    if not _is_int(max_bytes) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative integer, got {max_bytes!r}")
    path = os.fspath(path)
    try:
        return _load(path, max_bytes)
    except CheckpointError:
        raise
    except _Refused as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # zipfile, zlib, OS and anything else: one clear line
        raise CheckpointError(
            f"{path}: unreadable checkpoint, truncated or corrupt "
            f"({type(exc).__name__}: {_one_line(exc)})"
        ) from None


def _open_regular(path: str) -> tuple[IO[bytes], int]:
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        what = "a broken symbolic link" if os.path.islink(path) else "no such checkpoint file"
        raise _Refused(what) from None
    except OSError as exc:
        raise _Refused(f"cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise _Refused("is a directory, not a checkpoint file")
        if not stat.S_ISREG(st.st_mode):
            raise _Refused("not a regular file")
        if _NONBLOCK:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _load(path: str, max_bytes: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    f, size = _open_regular(path)
    with f:
        _check_directory(f, size)
        f.seek(0)
        with zipfile.ZipFile(f) as zf:
            members = _check_members(zf.infolist(), size)
            if _META not in members:
                raise _Refused("not an xpcnn checkpoint (no metadata entry)")
            # 1. The metadata, bounded.
            dtype, shape, header, nbytes = _read_member(zf, members[_META], _META)
            if dtype != np.uint8 or len(shape) != 1:
                raise _Refused(f"metadata entry is {dtype.str}{list(shape)}, not bytes")
            if nbytes > MAX_META_BYTES:
                raise _Refused(f"metadata entry is {nbytes} bytes, at most {MAX_META_BYTES}")
            raw = _read_data(zf, members[_META], _META, (dtype, shape, header, nbytes))
            meta = _parse_meta(bytes(raw))
            table = meta["arrays"]
            # 2. The archive against the table, before reading any array.
            names = set(members) - {_META}
            if set(table) != names:
                raise _Refused(
                    f"entries {sorted(names ^ set(table))} do not match the metadata "
                    "(missing or added)"
                )
            found = {k: _read_member(zf, members[k], k) for k in sorted(names)}
            for k, (dtype, shape, _, _) in found.items():
                info = table[k]
                if list(shape) != info["shape"] or dtype.str != info["dtype"]:
                    raise _Refused(
                        f"entry {k!r} is {dtype.str}{list(shape)}, the metadata says "
                        f"{info['dtype']}{info['shape']}"
                    )
            total = sum(v[3] for v in found.values())
            if total > max_bytes:
                raise _Refused(
                    f"arrays total {total} bytes, more than the {max_bytes} allowed "
                    "(load(path, max_bytes=...) raises the bound)"
                )
            # 3. The data, each array against its SHA-256.
            arrays = {}
            for k in table:
                dtype, shape, header, nbytes = found[k]
                buf = _read_data(zf, members[k], k, found[k])
                if hashlib.sha256(buf).hexdigest() != table[k]["sha256"]:
                    raise _Refused(f"entry {k!r} fails its SHA-256 check (altered)")
                if nbytes:
                    arrays[k] = np.frombuffer(buf, dtype=dtype).reshape(shape)
                else:
                    arrays[k] = np.zeros(shape, dtype=dtype)
    return arrays, meta


# --- checking metadata fields ----------------------------------------------------------------


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: The kinds `require` knows: name -> (test, what the message says a value must be).
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "count": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "positive": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, dict), "a JSON object"),
    "list": (lambda v: isinstance(v, list), "a JSON array"),
    "any": (lambda v: True, "present"),
}


def require(
    meta: Mapping[str, Any],
    path: str | os.PathLike,
    key: str,
    kind: str | tuple | frozenset,
    *,
    optional: bool = False,
) -> Any:
    """Return ``meta[key]`` if it is of ``kind``, else raise `CheckpointError` naming the file
    and the field, e.g. ``PATH: metadata field 'epoch' must be a non-negative integer, got -1``.

    ``key`` may be dotted (``"model.type"``) to reach into nested objects. ``kind`` is a name in
    `KINDS` or a tuple/frozenset of the allowed values (compared with their types, so ``True``
    is not ``1``). With ``optional=True`` a missing or null field gives None. For the callers
    (trainer, CLI) to validate what they read from a checkpoint before they use it.
    """
    value: Any = meta
    for i, part in enumerate(key.split(".")):
        if not isinstance(value, Mapping):
            parent = ".".join(key.split(".")[:i])
            raise CheckpointError(
                f"{os.fspath(path)}: metadata field {parent!r} must be a JSON object"
            )
        value = value.get(part)
    if value is None:
        if optional:
            return None
        raise CheckpointError(f"{os.fspath(path)}: metadata field {key!r} is missing")
    if isinstance(kind, str):
        test, what = KINDS[kind]
        ok = test(value)
    else:
        ok = any(type(value) is type(c) and value == c for c in kind)
        what = "one of " + ", ".join(repr(c) for c in sorted(kind, key=repr))
    if not ok:
        raise CheckpointError(
            f"{os.fspath(path)}: metadata field {key!r} must be {what}, got "
            f"{_one_line(repr(value), 60)}"
        )
    return value


def check_fields(
    meta: Mapping[str, Any], path: str | os.PathLike, schema: Mapping[str, str | tuple | frozenset]
) -> dict[str, Any]:
    """`require` for each ``key: kind`` of ``schema``; a key ending in ``?`` is optional.
    Returns ``{key: value}`` (keys without the ``?``)."""
    return {
        k.rstrip("?"): require(meta, path, k.rstrip("?"), kind, optional=k.endswith("?"))
        for k, kind in schema.items()
    }


__all__ = [
    "FORMAT",
    "KINDS",
    "MAX_BYTES",
    "MAX_DIRECTORY_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MEMBERS",
    "MAX_META_BYTES",
    "MAX_NAME",
    "MAX_NDIM",
    "MAX_NPY_HEADER",
    "SUPPORTED_VERSIONS",
    "TMP_PREFIX",
    "VERSION",
    "CheckpointError",
    "atomic_write",
    "check_fields",
    "check_writable",
    "load",
    "require",
    "save",
]
