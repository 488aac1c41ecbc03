"""Checkpoint files: round trip, atomic writes, and refusal of truncated or altered files."""

import os
import zipfile

import numpy as np
import pytest

from xpcnn import checkpoint as ckpt


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


def test_failed_write_leaves_previous_file_intact(tmp_path, rng, monkeypatch):
    path = tmp_path / "a.ckpt"
    ckpt.save(path, {"w": np.arange(3)}, {"epoch": 1})
    before = path.read_bytes()

    def exploding_savez(f, **arrays):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a save

    monkeypatch.setattr(np, "savez", exploding_savez)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(path, {"w": np.arange(4)}, {"epoch": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.ckpt"]  # no temporary file left behind
