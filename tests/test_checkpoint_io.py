"""Run-checkpoint files: the background finish of a write, and the checksum."""
import hashlib

import numpy as np
import pytest

from ms_dfkd.models.checkpoint_io import CheckpointWriteError, load_safetensors, save_safetensors
from ms_dfkd.run_checkpoint import digest


def _state(seed):
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": np.arange(5, dtype=np.int64),
            "c": np.array(2.5, np.float32)}


def test_a_write_finished_later_replaces_the_file_only_after_before_replace(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_safetensors(_state(0), path)
    seen = []

    def before():  # the old file is still there, the new one written aside
        seen.append(load_safetensors(path)["a"].copy())
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
    wait = save_safetensors(_state(1), path, before_replace=before, finish_later=True)
    wait()
    np.testing.assert_array_equal(seen[0], _state(0)["a"])
    assert len(seen[1]) == 2 and seen[1][1] == "ck.safetensors" and seen[1][0].endswith(".tmp")
    got = load_safetensors(path)
    for k, v in _state(1).items():
        np.testing.assert_array_equal(got[k].reshape(v.shape), v)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]


def test_a_failed_finish_is_raised_by_wait_and_leaves_the_old_file(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_safetensors(_state(0), path)

    def before():
        raise OSError(28, "No space left on device")
    wait = save_safetensors(_state(1), path, before_replace=before, finish_later=True)
    with pytest.raises(CheckpointWriteError, match=f"could not write {path}.*No space left.*unchanged"):
        wait()
    np.testing.assert_array_equal(load_safetensors(path)["a"], _state(0)["a"])
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]


def test_the_checksum_is_sha256_of_names_dtypes_sizes_and_bytes():
    arrays = {"z": np.arange(6, dtype=np.float32).reshape(2, 3).T, **_state(2)}  # one not contiguous
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.asarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.size}|".encode() + np.ascontiguousarray(a).tobytes())
    h.update(b'{"x": 1}')
    assert digest(arrays, '{"x": 1}') == h.hexdigest()
