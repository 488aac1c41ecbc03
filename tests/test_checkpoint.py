"""Checkpoint files: round trip, atomic writes, and refusal of truncated or altered files.

Byte flips, truncations and hand-made hostile files are in test_fuzz.py; here are the format,
versions, metadata helpers, atomic writes and the writability check.
"""

import base64
import hashlib
import os
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import xpcnn
from xpcnn import checkpoint as ckpt

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)

import hostile  # noqa: E402


def _arrays(rng):
    return {
        "model/w": rng.standard_normal((4, 3)).astype(np.float32),
        "optim/0.momentum_buffer": rng.standard_normal(7),
        "counts": np.arange(5),
    }


def test_round_trip(tmp_path, rng):
    arrays = _arrays(rng)
    meta = {"epoch": 3, "rng_state": {"state": {"state": 2**100 + 7}}, "history": [{"a": 1.5}]}
    path = tmp_path / "a.ckpt"
    ckpt.save(path, arrays, meta)
    got, got_meta = ckpt.load(path)
    assert set(got) == set(arrays)
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)
    assert got_meta["epoch"] == 3 and got_meta["rng_state"]["state"]["state"] == 2**100 + 7
    assert zipfile.is_zipfile(path)  # a plain .npz: no pickle anywhere
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def test_truncated_file_is_refused(tmp_path, rng):
    path = tmp_path / "a.ckpt"
    ckpt.save(path, _arrays(rng), {})
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 30):
        path.write_bytes(data[:cut])
        with pytest.raises(ckpt.CheckpointError, match=f"{path}: unreadable checkpoint"):
            ckpt.load(path)


def test_altered_bytes_are_refused(tmp_path, rng):
    path = tmp_path / "a.ckpt"
    ckpt.save(path, {"w": np.zeros(1000, np.float32)}, {})
    data = bytearray(path.read_bytes())
    i = data.find(b"w.npy") + 200  # inside the array's stored bytes
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=str(path)):
        ckpt.load(path)


def test_edited_entry_fails_its_digest(tmp_path, rng):
    """A well-formed archive whose array was replaced is caught by the SHA-256 in the metadata."""
    path = tmp_path / "a.ckpt"
    ckpt.save(path, {"w": np.zeros(8)}, {})
    with np.load(path, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    entries["w"] = np.ones(8)
    with open(path, "wb") as f:
        np.savez(f, **entries)
    with pytest.raises(ckpt.CheckpointError, match="entry 'w' fails its SHA-256 check"):
        ckpt.load(path)
    entries["extra"] = np.zeros(2)
    with open(path, "wb") as f:
        np.savez(f, **entries)
    with pytest.raises(ckpt.CheckpointError, match=r"entries \['extra'\] do not match"):
        ckpt.load(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, a=np.zeros(2))
    with pytest.raises(ckpt.CheckpointError, match="not an xpcnn checkpoint"):
        ckpt.load(path)
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint file"):
        ckpt.load(tmp_path / "missing.ckpt")
    (tmp_path / "text.ckpt").write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load(tmp_path / "text.ckpt")


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(TypeError, match="non-numeric dtype object"):
        ckpt.save(tmp_path / "x.ckpt", {"o": np.array([{}], dtype=object)}, {})


# --- format and versions ---------------------------------------------------------------------

# Written by xpcnn 0.1's checkpoint.save (format version 1, before the "xpcnn" field):
# arrays model/fc.weight = arange(6).reshape(2, 3) / 4 and model/fc.bias = [0.5, -1] (float32),
# optim/0.momentum_buffer = arange(3) (float64); meta epoch 2, step 0, one history entry.
V1_FILE = base64.b64decode(
    """
UEsDBC0AAAAAAAAAIQA1AYNN//////////8MABQAX19tZXRhX18ubnB5AQAQAIQCAAAAAAAAhAIAAAAAAACTTlVNUFkBAHYA
eydkZXNjcic6ICd8dTEnLCAnZm9ydHJhbl9vcmRlcic6IEZhbHNlLCAnc2hhcGUnOiAoNTE2LCksIH0gICAgICAgICAgICAg
ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgCnsiZXBvY2giOiAyLCAic3RlcCI6IDAsICJo
aXN0b3J5IjogW3siZXBvY2giOiAxLCAibG9zcyI6IDAuMjV9XSwgImZvcm1hdCI6ICJ4cGNubi1jaGVja3BvaW50IiwgInZl
cnNpb24iOiAxLCAiYXJyYXlzIjogeyJtb2RlbC9mYy53ZWlnaHQiOiB7InNoYXBlIjogWzIsIDNdLCAiZHR5cGUiOiAiPGY0
IiwgInNoYTI1NiI6ICJiMTI5MGNkNDNlYWM4ZTJmYTRhZDhkNDVkOWY3OWY4ODY4ZmM4YTZlMDhjNjI3YzMzNTU3ODE0NzQz
ZmZkZjNlIn0sICJtb2RlbC9mYy5iaWFzIjogeyJzaGFwZSI6IFsyXSwgImR0eXBlIjogIjxmNCIsICJzaGEyNTYiOiAiMDMx
YTVlOTNlNzI2NjMwZDJlNzA4N2U0MzU2ODI5ZGU2OTA3NjgzZjNhMmFiYTc2OWU1MTU1ZTdhMDY4ZDE2NyJ9LCAib3B0aW0v
MC5tb21lbnR1bV9idWZmZXIiOiB7InNoYXBlIjogWzNdLCAiZHR5cGUiOiAiPGY4IiwgInNoYTI1NiI6ICJiMGM0NTMwM2Y3
ZjExODQ4Y2I1ZTZlNWIyYWYyZmIyYWVjZDBiNzJjMjg3NDhiODhiNTgzYWI2YmI3NmRmMTc0In19fVBLAwQtAAAAAAAAACEA
CpwApP//////////EwAUAG1vZGVsL2ZjLndlaWdodC5ucHkBABAAmAAAAAAAAACYAAAAAAAAAJNOVU1QWQEAdgB7J2Rlc2Ny
JzogJzxmNCcsICdmb3J0cmFuX29yZGVyJzogRmFsc2UsICdzaGFwZSc6ICgyLCAzKSwgfSAgICAgICAgICAgICAgICAgICAg
ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAKAAAAAAAAgD4AAAA/AABAPwAAgD8AAKA/UEsDBC0AAAAA
AAAAIQCEqZrv//////////8RABQAbW9kZWwvZmMuYmlhcy5ucHkBABAAiAAAAAAAAACIAAAAAAAAAJNOVU1QWQEAdgB7J2Rl
c2NyJzogJzxmNCcsICdmb3J0cmFuX29yZGVyJzogRmFsc2UsICdzaGFwZSc6ICgyLCksIH0gICAgICAgICAgICAgICAgICAg
ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAKAAAAPwAAgL9QSwMELQAAAAAAAAAhACQh4Sv/////
/////xsAFABvcHRpbS8wLm1vbWVudHVtX2J1ZmZlci5ucHkBABAAmAAAAAAAAACYAAAAAAAAAJNOVU1QWQEAdgB7J2Rlc2Ny
JzogJzxmOCcsICdmb3J0cmFuX29yZGVyJzogRmFsc2UsICdzaGFwZSc6ICgzLCksIH0gICAgICAgICAgICAgICAgICAgICAg
ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAKAAAAAAAAAAAAAAAAAADwPwAAAAAAAABAUEsBAi0DLQAA
AAAAAAAhADUBg02EAgAAhAIAAAwAAAAAAAAAAAAAAIABAAAAAF9fbWV0YV9fLm5weVBLAQItAy0AAAAAAAAAIQAKnACkmAAA
AJgAAAATAAAAAAAAAAAAAACAAcICAABtb2RlbC9mYy53ZWlnaHQubnB5UEsBAi0DLQAAAAAAAAAhAISpmu+IAAAAiAAAABEA
AAAAAAAAAAAAAIABnwMAAG1vZGVsL2ZjLmJpYXMubnB5UEsBAi0DLQAAAAAAAAAhACQh4SuYAAAAmAAAABsAAAAAAAAAAAAA
AIABagQAAG9wdGltLzAubW9tZW50dW1fYnVmZmVyLm5weVBLBQYAAAAABAAEAAMBAABPBQAAAAA=
"""
)


def test_version_1_files_still_load(tmp_path):
    assert hashlib.sha256(V1_FILE).hexdigest().startswith("d2b60927e5c26f10")
    path = tmp_path / "v1.ckpt"
    path.write_bytes(V1_FILE)
    arrays, meta = ckpt.load(path)
    assert meta["version"] == 1 and 1 in ckpt.SUPPORTED_VERSIONS
    assert meta["epoch"] == 2 and meta["history"] == [{"epoch": 1, "loss": 0.25}]
    assert "xpcnn" not in meta
    np.testing.assert_array_equal(
        arrays["model/fc.weight"], np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    )
    assert arrays["model/fc.bias"].dtype == np.float32
    np.testing.assert_array_equal(arrays["optim/0.momentum_buffer"], np.arange(3.0))


def test_save_writes_version_2_with_the_package_version(tmp_path):
    path = tmp_path / "a.ckpt"
    ckpt.save(path, {"w": np.zeros(2)}, {"epoch": 1})
    _, meta = ckpt.load(path)
    assert ckpt.VERSION == 2 and meta["version"] == 2
    assert meta["xpcnn"] == xpcnn.__version__
    ckpt.save(path, {"w": np.zeros(2)}, {"xpcnn": "9.9.9"})  # given: kept
    assert ckpt.load(path)[1]["xpcnn"] == "9.9.9"


def test_version_2_needs_the_writer_version(tmp_path):
    path = tmp_path / "a.ckpt"
    ckpt.save(path, {"w": np.zeros(2)}, {"xpcnn": 2})
    with pytest.raises(ckpt.CheckpointError, match="field 'xpcnn'.*must be a string"):
        ckpt.load(path)


def test_equal_inputs_give_identical_files(tmp_path):
    arrays = {"a": np.arange(10), "b": np.ones((2, 3), np.float32)}
    ckpt.save(tmp_path / "1.ckpt", arrays, {"x": 1})
    ckpt.save(tmp_path / "2.ckpt", arrays, {"x": 1})
    assert (tmp_path / "1.ckpt").read_bytes() == (tmp_path / "2.ckpt").read_bytes()


@pytest.mark.parametrize(
    "array",
    [
        np.array([True, False]),
        np.arange(-3, 3, dtype=np.int8),
        np.arange(6, dtype=np.uint16).reshape(2, 3),
        np.array([2**62], dtype=np.int64),
        np.linspace(0, 1, 5, dtype=np.float16),
        np.arange(4, dtype=">f4"),
        np.float64(3.5).reshape(()),
        np.zeros((0, 3), np.float32),
        np.arange(24.0).reshape(2, 3, 4).transpose(2, 0, 1),  # not contiguous
    ],
    ids=["bool", "int8", "uint16", "int64", "float16", "big-endian", "0-d", "empty", "strided"],
)
def test_numeric_dtypes_round_trip(tmp_path, array):
    path = tmp_path / "a.ckpt"
    ckpt.save(path, {"x": array}, {})
    got = ckpt.load(path)[0]["x"]
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert got.flags.c_contiguous and got.flags.writeable


def test_save_refuses_what_load_would_refuse(tmp_path):
    path = tmp_path / "x.ckpt"
    for name in ("__meta__", "", 3, "x" * 1001):
        with pytest.raises(ValueError, match="name"):
            ckpt.save(path, {name: np.zeros(1)}, {})
    for array in (np.zeros(2, complex), np.zeros(2, "U3"), np.zeros(2, "f4,f4")):
        with pytest.raises(TypeError, match="non-numeric dtype"):
            ckpt.save(path, {"a": array}, {})
    deep = {}
    for _ in range(ckpt.MAX_JSON_DEPTH):
        deep = {"d": deep}
    with pytest.raises(ValueError, match="nested more than"):
        ckpt.save(path, {}, {"deep": deep})
    with pytest.raises(TypeError):
        ckpt.save(path, {}, {"f": object()})
    assert not path.exists()


def test_load_refuses_what_is_not_a_regular_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="is a directory"):
        ckpt.load(tmp_path)
    fifo = tmp_path / "fifo.ckpt"
    os.mkfifo(fifo)
    with pytest.raises(ckpt.CheckpointError, match=f"{fifo}: not a regular file"):
        ckpt.load(fifo)  # and does not block waiting for a writer
    zero = tmp_path / "zero.ckpt"
    zero.symlink_to("/dev/zero")
    with pytest.raises(ckpt.CheckpointError, match=f"{zero}: not a regular file"):
        ckpt.load(zero)
    broken = tmp_path / "broken.ckpt"
    broken.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ckpt.CheckpointError, match="broken symbolic link"):
        ckpt.load(broken)


def test_only_checkpoint_error_escapes_but_ctrl_c_does(tmp_path, monkeypatch):
    path = tmp_path / "a.ckpt"
    ckpt.save(path, {"w": np.zeros(3)}, {})

    def boom(exc):
        def raiser(*args, **kwargs):
            raise exc

        return raiser

    for exc in (
        MemoryError(),
        RecursionError("deep"),
        NotImplementedError("x\ny"),
        OSError(5, "EIO"),
    ):
        monkeypatch.setattr(ckpt, "_npy_header", boom(exc))
        with pytest.raises(ckpt.CheckpointError) as info:
            ckpt.load(path)
        assert str(info.value).startswith(f"{path}: unreadable checkpoint")
        assert "\n" not in str(info.value)
    monkeypatch.setattr(ckpt, "_npy_header", boom(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ckpt.load(path)


def test_deflated_archive_loads(tmp_path):
    """NumPy's savez_compressed layout (deflate) is read too, not only the stored one."""
    path = tmp_path / "a.ckpt"
    ckpt.save(path, {"w": np.arange(1000.0)}, {"epoch": 4})
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / "d.ckpt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), zipfile.ZIP_DEFLATED)
    arrays, meta = ckpt.load(tmp_path / "d.ckpt")
    np.testing.assert_array_equal(arrays["w"], np.arange(1000.0))
    assert meta["epoch"] == 4
    assert (tmp_path / "d.ckpt").stat().st_size < path.stat().st_size


# --- metadata field checks -------------------------------------------------------------------


META = {
    "epoch": 3,
    "step": 0,
    "lr": 0.1,
    "schedule": "cosine",
    "partial": None,
    "flag": True,
    "model": {"type": "SimpleCNN", "num_classes": 10},
    "history": [],
}


def test_require_returns_valid_fields():
    assert ckpt.require(META, "p", "epoch", "count") == 3
    assert ckpt.require(META, "p", "step", "count") == 0
    assert ckpt.require(META, "p", "lr", "number") == 0.1
    assert ckpt.require(META, "p", "schedule", ("cosine", "constant")) == "cosine"
    assert ckpt.require(META, "p", "model.type", "str") == "SimpleCNN"
    assert ckpt.require(META, "p", "model.num_classes", "positive") == 10
    assert ckpt.require(META, "p", "history", "list") == []
    assert ckpt.require(META, "p", "model", "dict")["type"] == "SimpleCNN"
    assert ckpt.require(META, "p", "flag", "bool") is True
    assert ckpt.require(META, "p", "partial", "dict", optional=True) is None
    assert ckpt.require(META, "p", "absent", "count", optional=True) is None


@pytest.mark.parametrize(
    "meta, key, kind, message",
    [
        ({}, "epoch", "count", "metadata field 'epoch' is missing"),
        ({"epoch": None}, "epoch", "count", "metadata field 'epoch' is missing"),
        ({"epoch": -1}, "epoch", "count", "'epoch' must be a non-negative integer, got -1"),
        ({"epoch": True}, "epoch", "count", "must be a non-negative integer, got True"),
        ({"epoch": 2.0}, "epoch", "count", "must be a non-negative integer, got 2.0"),
        ({"epoch": "3"}, "epoch", "count", "must be a non-negative integer, got '3'"),
        ({"n": 0}, "n", "positive", "must be a positive integer, got 0"),
        ({"lr": float("nan")}, "lr", "number", "must be a finite number, got nan"),
        ({"lr": "0.1"}, "lr", "number", "must be a finite number"),
        ({"s": "linear"}, "s", ("cosine", "constant"), "must be one of 'constant', 'cosine'"),
        ({"s": 1}, "s", (True, False), "must be one of False, True, got 1"),
        ({"model": []}, "model.type", "str", "metadata field 'model' must be a JSON object"),
        ({"model": {}}, "model.type", "str", "metadata field 'model.type' is missing"),
        ({"h": {}}, "h", "list", "'h' must be a JSON array, got {}"),
        ({"h": "x" * 500}, "h", "dict", "got 'xxxxx"),
    ],
)
def test_require_refuses_with_the_file_and_field(meta, key, kind, message):
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.require(meta, "/runs/a.ckpt", key, kind)
    text = str(info.value)
    assert text.startswith("/runs/a.ckpt: ")
    assert message in text
    assert len(text) < 200 and "\n" not in text


def test_check_fields():
    got = ckpt.check_fields(META, "p", {"epoch": "count", "partial?": "dict", "absent?": "str"})
    assert got == {"epoch": 3, "partial": None, "absent": None}
    with pytest.raises(ckpt.CheckpointError, match="p: metadata field 'schedule' must be a JSON"):
        ckpt.check_fields(META, "p", {"epoch": "count", "schedule": "dict"})


# --- atomic writes ---------------------------------------------------------------------------

# Some sandboxes refuse the link through /proc/self/fd that puts an O_TMPFILE file in place
# (the machine these tests were written on answers EXDEV); there, where we may, the tests link
# with linkat's AT_EMPTY_PATH instead (hostile.link_empty_path), which is what the /proc link
# does on a usual kernel, so that the unnamed path is still exercised end to end.
_link_empty_path = hostile.link_empty_path


def _linker(directory):
    """How unnamed files get linked in ``directory``: "proc" (the module's own way), "empty-path"
    (the tests' stand-in, see above), or None (no O_TMPFILE, or no way to link it)."""
    for kind, link in (("proc", ckpt._link_unnamed), ("empty-path", _link_empty_path)):
        fd = ckpt._open_unnamed(str(directory))
        if fd is None:
            return None
        try:
            os.unlink(link(fd, str(directory)))
            return kind
        except OSError:
            continue
        finally:
            os.close(fd)
    return None


@pytest.fixture(autouse=True)
def _fresh_link_cache(monkeypatch):
    monkeypatch.setattr(ckpt, "_NO_LINK", set())


@pytest.fixture(params=["unnamed", "named"])
def tmp_mode(request, monkeypatch, tmp_path):
    """Run a test with O_TMPFILE (skipped where it cannot be linked) and the named fallback."""
    if request.param == "unnamed":
        linker = _linker(tmp_path)
        if linker is None:
            pytest.skip("no O_TMPFILE, or no way to link it here")
        if linker == "empty-path":
            monkeypatch.setattr(ckpt, "_link_unnamed", _link_empty_path)
    else:
        monkeypatch.setattr(ckpt, "_open_unnamed", lambda directory: None)
    return request.param


def test_temporary_file_while_writing(tmp_path, tmp_mode):
    seen = []

    def write(f):
        f.write(b"data")
        seen.append(os.listdir(tmp_path))

    ckpt.atomic_write(tmp_path / "out", write)
    if tmp_mode == "unnamed":
        assert seen == [[]]  # nothing in the directory until the file is complete
    else:
        (name,) = seen[0]
        assert name.startswith(f"{ckpt.TMP_PREFIX}{os.getpid()}-")
    assert os.listdir(tmp_path) == ["out"]
    assert (tmp_path / "out").read_bytes() == b"data"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_permissions_follow_the_umask(tmp_path, tmp_mode, umask):
    old = os.umask(umask)
    try:
        ckpt.atomic_write(tmp_path / "out", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_leaves_previous_file_intact(tmp_path, rng, monkeypatch, tmp_mode):
    path = tmp_path / "a.ckpt"
    ckpt.save(path, {"w": np.arange(3)}, {"epoch": 1})
    before = path.read_bytes()

    def exploding_write_array(f, array, **kwargs):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a save

    monkeypatch.setattr(np.lib.format, "write_array", exploding_write_array)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(path, {"w": np.arange(4)}, {"epoch": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.ckpt"]  # no temporary file left behind


def test_refused_link_falls_back_to_a_copy_then_to_named_files(tmp_path, monkeypatch):
    if ckpt._open_unnamed(str(tmp_path)) is None:
        pytest.skip("no O_TMPFILE here")

    def refused(fd, directory):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(ckpt, "_link_unnamed", refused)
    seen = []

    def write(data):
        def writer(f):
            f.write(data)
            seen.append(os.listdir(tmp_path))

        return writer

    data = os.urandom(3 * 2**20 + 5)
    ckpt.atomic_write(tmp_path / "out", write(data))  # unnamed, then copied
    assert (tmp_path / "out").read_bytes() == data
    ckpt.atomic_write(tmp_path / "out", write(b"again"))  # named from the start
    assert (tmp_path / "out").read_bytes() == b"again"
    assert seen[0] == []  # unnamed while written
    assert len(seen[1]) == 2 and any(n.startswith(ckpt.TMP_PREFIX) for n in seen[1])
    assert os.listdir(tmp_path) == ["out"]


KILLED_WRITER = """
import os, sys, time
import hostile
from xpcnn import checkpoint as ckpt
path, mode, linker = sys.argv[1:4]
if linker == "empty-path":
    ckpt._link_unnamed = hostile.link_empty_path
if mode == "named":
    ckpt._open_unnamed = lambda directory: None
if mode == "linked":  # stop between link and rename, the one window O_TMPFILE leaves
    def stall(src, dst):
        print("ready", flush=True)
        time.sleep(60)
    os.replace = stall
def write(f):
    f.write(b"new" * 100000)
    f.flush()
    if mode != "linked":
        print("ready", flush=True)
        time.sleep(60)
ckpt.atomic_write(path, write)
"""


def _killed_during_write(path, mode, linker):
    paths = os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=paths)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), mode, str(linker)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    return proc.pid


@pytest.mark.parametrize("mode", ["unnamed", "linked", "named"])
def test_kill_9_during_a_save(tmp_path, mode):
    """kill -9 mid-save: the old file is intact; with O_TMPFILE nothing is left; a temporary
    file left between link and rename, or by the named fallback, is removed by the next write."""
    linker = _linker(tmp_path)
    if mode != "named" and linker is None:
        pytest.skip("no O_TMPFILE, or no way to link it here")
    path = tmp_path / "a.ckpt"
    path.write_bytes(b"old")
    pid = _killed_during_write(path, mode, linker)
    assert path.read_bytes() == b"old"
    left = sorted(set(os.listdir(tmp_path)) - {"a.ckpt"})
    if mode == "unnamed":
        assert left == []
    else:
        (name,) = left
        assert name.startswith(f"{ckpt.TMP_PREFIX}{pid}-")
        assert (tmp_path / name).stat().st_size == 300000
    ckpt.atomic_write(tmp_path / "b.ckpt", lambda f: f.write(b"b"))
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "b.ckpt"]


def _dead_pid():
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(proc.stdout)


def test_stale_cleanup_spares_what_is_not_stale(tmp_path):
    dead = _dead_pid()
    names = {
        "dead": f"{ckpt.TMP_PREFIX}{dead}-abc123",
        "alive": f"{ckpt.TMP_PREFIX}{os.getpid()}-abc123",
        "locked": f"{ckpt.TMP_PREFIX}{dead}-locked",
        "other": f".tmp-{dead}-abc123",
        "odd": f"{ckpt.TMP_PREFIX}x-abc",
        "user": "notes.txt",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f"{ckpt.TMP_PREFIX}{dead}-dir").mkdir()
    # A writer in another PID namespace or host: pid unknown here, but it holds the lock.
    import fcntl

    with open(tmp_path / names["locked"], "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        removed = ckpt._remove_stale(str(tmp_path))
    assert removed == [names["dead"]]
    left = set(os.listdir(tmp_path))
    assert left == set(names.values()) - {names["dead"]} | {f"{ckpt.TMP_PREFIX}{dead}-dir"}
    ckpt.check_writable(tmp_path / "a.ckpt")  # also cleans up: now the lock is released
    assert names["locked"] not in os.listdir(tmp_path)


# --- the writability check -------------------------------------------------------------------


def test_check_writable_accepts_and_leaves_nothing(tmp_path):
    ckpt.check_writable(tmp_path / "a.ckpt")
    ckpt.check_writable(tmp_path / "new" / "dir" / "a.ckpt")  # creates the directories
    assert sorted(os.listdir(tmp_path)) == ["new"]
    assert os.listdir(tmp_path / "new" / "dir") == []
    (tmp_path / "a.ckpt").write_bytes(b"old")
    ckpt.check_writable(tmp_path / "a.ckpt")  # an existing checkpoint is fine
    assert (tmp_path / "a.ckpt").read_bytes() == b"old"


def test_check_writable_refuses(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=f"{tmp_path}: .*it is a directory"):
        ckpt.check_writable(tmp_path)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="cannot create directory"):
        ckpt.check_writable(tmp_path / "file" / "a.ckpt")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ckpt.CheckpointError, match="not a regular file"):
        ckpt.check_writable(tmp_path / "fifo")
    with pytest.raises(ckpt.CheckpointError, match="bytes free"):
        ckpt.check_writable(tmp_path / "a.ckpt", size=2**62)
    # Unwritable even for root: /proc takes no new files.
    with pytest.raises(ckpt.CheckpointError, match="/proc/xpcnn.ckpt: cannot write a checkpoint"):
        ckpt.check_writable("/proc/xpcnn.ckpt")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_check_writable_refuses_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ckpt.CheckpointError, match="Permission denied"):
            ckpt.check_writable(ro / "a.ckpt")
    finally:
        ro.chmod(0o700)
