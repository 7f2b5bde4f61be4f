"""ms_dfkd/run_files.py: the append-only JSONL files of a run folder, their rewind on resume and the
per-rank shards, checked byte for byte against files written by hand."""
import json

import pytest

from ms_dfkd.run_files import JsonlWriter, read_jsonl, rewind_shards, shard_name


def _lines(*records):
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def test_write_appends_one_line_per_record(tmp_path):
    w = JsonlWriter(tmp_path / "sub" / "a.jsonl")  # creates the folder
    assert w.offset == 0
    w.write([{"text": "x", "n": 1}])
    w.write([{"text": "é", "n": 2}, {"text": "z", "n": 3}])
    raw = (tmp_path / "sub" / "a.jsonl").read_bytes()
    assert raw == '{"text": "x", "n": 1}\n{"text": "é", "n": 2}\n{"text": "z", "n": 3}\n'.encode()
    assert w.offset == len(raw)
    assert [r["n"] for r in read_jsonl(tmp_path / "sub" / "a.jsonl")] == [1, 2, 3]


def test_rewind_keeps_the_prefix_and_moves_the_tail_aside(tmp_path):
    p = tmp_path / "metrics.jsonl"
    head, tail = _lines({"round": 0}), _lines({"round": 1}, {"round": 2})
    p.write_bytes(head + tail)
    side = JsonlWriter(p).rewind(len(head), "after-step3")
    assert p.read_bytes() == head
    assert side == tmp_path / "metrics.jsonl.after-step3.orphaned" and side.read_bytes() == tail
    assert JsonlWriter(p).rewind(len(head), "again") is None  # nothing after the offset: no side file
    with pytest.raises(ValueError, match="fewer than"):
        JsonlWriter(p).rewind(len(head) + 1, "x")
    with pytest.raises(FileNotFoundError, match="missing"):
        JsonlWriter(tmp_path / "gone.jsonl").rewind(10, "x")


def test_shards_are_cut_at_the_first_record_of_the_checkpoint_step(tmp_path):
    assert shard_name(0, 1) == "generated.jsonl" and shard_name(1, 2) == "generated.rank1.jsonl"
    keep0, cut0 = _lines({"step": 0}, {"step": 1}), _lines({"step": 2}) + b'{"step": 3'  # torn last line
    keep1, cut1 = _lines({"step": 0}), _lines({"step": 2}, {"step": 3})
    old = _lines({"step": 1}, {"step": 5})  # a shard of an earlier 3-rank run: rank 0 cuts it too
    (tmp_path / "generated.rank0.jsonl").write_bytes(keep0 + cut0)
    (tmp_path / "generated.rank1.jsonl").write_bytes(keep1 + cut1)
    (tmp_path / "generated.rank2.jsonl").write_bytes(old)
    sides = rewind_shards(tmp_path, 2, "t", rank=0, world_size=2)
    assert (tmp_path / "generated.rank0.jsonl").read_bytes() == keep0
    assert (tmp_path / "generated.rank1.jsonl").read_bytes() == keep1 + cut1  # rank 1 cuts its own
    assert (tmp_path / "generated.rank2.jsonl").read_bytes() == old[:len(_lines({"step": 1}))]
    assert sorted(s.name for s in sides) == ["generated.rank0.jsonl.t.orphaned", "generated.rank2.jsonl.t.orphaned"]
    rewind_shards(tmp_path, 2, "t", rank=1, world_size=2)
    assert (tmp_path / "generated.rank1.jsonl").read_bytes() == keep1
    # a folder merges its shards, in name order
    assert [r["step"] for r in read_jsonl(tmp_path)] == [0, 1, 0, 1]


def test_read_jsonl_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no generated"):
        read_jsonl(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        read_jsonl(tmp_path / "nothing.jsonl")


def _hold_lock(folder):
    """A second process that takes the run folder's lock and keeps it until killed."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "import sys, time; from ms_dfkd.run_files import RunLock; "
                          "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(folder)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_refuses_a_second_holder_and_takes_over_from_a_dead_one(tmp_path, caplog):
    import signal
    import socket
    from ms_dfkd.run_files import RunFolderBusy, RunLock
    p = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunFolderBusy) as e:
            RunLock(tmp_path).acquire()
        assert f"in use by pid {p.pid} on host {socket.gethostname()}" in str(e.value)
    finally:
        p.send_signal(signal.SIGKILL)  # dies holding it: the lock file still names it
        p.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == p.pid
    with caplog.at_level("WARNING", logger="ms_dfkd"):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / ".lock").read_text())["pid"] != p.pid
    assert f"taking over the lock of pid {p.pid}" in caplog.text
    assert (tmp_path / ".lock").read_text() == ""  # released: the next run sees no stale holder
    with RunLock(tmp_path):
        pass


def test_stale_temp_files_are_removed(tmp_path):
    from ms_dfkd.run_files import remove_stale_temp_files
    stale = [tmp_path / ".checkpoint.safetensors.abc123.tmp", tmp_path / ".tmpq8x1"]
    keep = [tmp_path / "checkpoint.safetensors", tmp_path / "generated.jsonl", tmp_path / ".lock"]
    for f in stale + keep:
        f.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert all(f.exists() for f in keep) and not any(f.exists() for f in stale)
