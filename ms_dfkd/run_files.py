"""The files of a run folder: its lock, and the files that grow as it runs, generated*.jsonl (one shard
per rank) and metrics.jsonl.

One process at a time owns a run folder (``RunLock``: a second one would duplicate every line). The
JSONL files are append-only. The checkpoint records how many bytes each held when it was written;
on resume the lines written after it are moved to a side file (kept, never lost) before appending
again, so that a resumed run writes what a straight one would. A command that writes one output file
(``generate``) locks it with ``FileLock`` and continues it with ``resume_output_file``.
"""
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from .data import iter_jsonl

log = logging.getLogger("ms_dfkd")


LOCK_NAME = ".lock"


class FileBusy(RuntimeError):
    """Another live process holds the lock on a run folder or an output file."""


class RunFolderBusy(FileBusy):
    """Another live process holds the run folder."""


class FileLock:
    """An exclusive lock for as long as a process writes somewhere: ``flock`` on a lock file whose text
    names the holder (pid, host, start time). ``what`` names the locked thing and ``hint`` what to do
    instead, in the error a second process gets.

    The kernel drops a flock when its process dies, however it dies (kill -9 included), so a lock file
    left by a dead process is simply taken over, with a warning that names the old holder.
    """
    busy_error = FileBusy

    def __init__(self, path, what, hint):
        self.path, self.what, self.hint = Path(path), what, hint
        self._fd = None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise self.busy_error(f"{self.what} is in use by pid {holder.get('pid', '?')} on host "
                                  f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for it to "
                                  f"finish or {self.hint}") from None
        old = _read_holder(fd)
        if old:
            log.warning(f"{self.what}: taking over the lock of pid {old.get('pid', '?')} on host "
                        f"{old.get('host', '?')}, which no longer holds it (it ended without releasing it)")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self):
        """Empty the lock file (so that the next process sees no stale holder) and unlock it."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class RunLock(FileLock):
    """The lock of a run folder for the whole run: RUN_DIR/.lock."""
    busy_error = RunFolderBusy

    def __init__(self, out_dir):
        super().__init__(Path(out_dir) / LOCK_NAME, f"run folder {Path(out_dir)}", "choose another --run.out_dir")


def _read_holder(fd):
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}


def remove_stale_temp_files(out_dir):
    """Delete the temporary files that an interrupted atomic write left in a run folder (``.NAME.*.tmp``).

    Only called while holding the folder's lock, so no live writer owns them. Returns the paths removed."""
    removed = []
    for p in sorted({*Path(out_dir).glob(".*.tmp"), *Path(out_dir).glob(".tmp*")}):
        if p.is_file():
            p.unlink()
            removed.append(p)
    if removed:
        log.warning(f"removed {len(removed)} temporary file(s) left by an interrupted save in {out_dir}: "
                    + ", ".join(p.name for p in removed))
    return removed


class JsonlWriter:
    """Append-only JSONL. ``offset`` (bytes) goes into the checkpoint; ``rewind`` cuts back to it."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def offset(self):
        return self.path.stat().st_size if self.path.exists() else 0

    def write(self, records):
        with open(self.path, "a", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewind(self, offset, tag):
        """Keep bytes [0, offset); move the rest to <name>.<tag>.orphaned (returns that path or None)."""
        if not self.path.exists():
            if offset:
                raise FileNotFoundError(f"{self.path} is missing but the checkpoint says it had {offset} bytes")
            return None
        size = self.path.stat().st_size
        if size < offset:
            raise ValueError(f"{self.path} has {size} bytes, fewer than the {offset} the checkpoint recorded")
        if size == offset:
            return None
        side = self.path.with_name(f"{self.path.name}.{tag}.orphaned")
        with open(self.path, "rb") as f:
            f.seek(offset)
            tail = f.read()
        with open(side, "ab") as g:
            g.write(tail)
            g.flush()
            os.fsync(g.fileno())
        with open(self.path, "rb+") as f:
            f.truncate(offset)
        return side


def settings_path(path):
    """The file beside a resumable output file that records the settings it is written with."""
    path = Path(path)
    return path.with_name(path.name + ".settings.json")


def resume_output_file(path, settings):
    """How many complete records a JSONL file that a command writes batch by batch already holds, so that
    a rerun with the same settings continues it (0 for a new or empty file).

    The first run writes ``settings`` (a JSON-able dict) beside the file (``settings_path``); a rerun must
    give the same ones, or it is refused with the keys that differ (appending would mix two kinds of
    texts). A torn last line, from a process killed while writing, is moved to a side file."""
    from .models.checkpoint_io import atomic_write
    path, side = Path(path), settings_path(path)
    now = json.loads(json.dumps(settings))  # the form it has once read back (tuples become lists)
    if not path.exists() or path.stat().st_size == 0:
        atomic_write(side, lambda tmp: Path(tmp).write_text(json.dumps(now, indent=1) + "\n", encoding="utf-8"))
        return 0
    if not side.is_file():
        raise ValueError(f"{path} exists and was not written by this command ({side.name} is missing beside it); "
                         f"move it away or choose another --out")
    saved = json.loads(side.read_text(encoding="utf-8"))
    differ = [f"{k} {a!r} -> {b!r}" for k, (a, b) in _flat_differences(saved, now).items()]
    if differ:
        raise ValueError(f"{path} was written with other settings ({'; '.join(differ)}); continuing it would mix "
                         f"two kinds of texts: choose another --out, or delete it and {side.name} to start over")
    count = offset = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                json.loads(line)
            except ValueError:
                break
            if not line.endswith(b"\n"):
                break
            count, offset = count + 1, offset + len(line)
    moved = JsonlWriter(path).rewind(offset, "torn")
    if moved:
        log.warning(f"{path}: an unfinished last line (from an interrupted run) was moved to {moved}")
    return count


def _flat_differences(a, b, prefix=""):
    """{dotted key: (a's value, b's value)} where two nested dicts differ."""
    out = {}
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_flat_differences(x, y, f"{prefix}{k}."))
        elif x != y:
            out[prefix + k] = (x, y)
    return out


def read_jsonl(paths):
    """Records from one JSONL file, a list of files, or a folder of per-rank shards (generated*.jsonl)."""
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        if p.is_dir():
            paths = sorted(p.glob("generated*.jsonl"))
            if not paths:
                raise FileNotFoundError(f"no generated*.jsonl files in {p}")
        else:
            paths = [p]
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"JSONL file not found: {p}")
        out.extend(rec for _, rec in iter_jsonl(p))
    return out


def shard_name(rank, world_size):
    """The JSONL file a rank appends its samples to (a single process keeps the plain name)."""
    return f"generated.rank{rank}.jsonl" if world_size > 1 else "generated.jsonl"


def rewind_shards(out_dir, step, tag, rank, world_size):
    """Move the samples written after a checkpoint (generator step >= ``step``) to side files.

    The checkpoint records only rank 0's byte offset, and the shards of different ranks
    have different lengths, so the cut is found from the records' own "step" field.
    Each rank cuts its own shard; rank 0 also cuts the shards that no current rank owns
    (an earlier run with more ranks, or a single-process run resumed on several).
    Returns the side files written.
    """
    out_dir = Path(out_dir)
    own = out_dir / shard_name(rank, world_size)
    paths = [own]
    if rank == 0:
        current = {shard_name(r, world_size) for r in range(world_size)}
        paths += [p for p in sorted(out_dir.glob("generated*.jsonl")) if p.name not in current]
    sides = []
    for p in paths:
        if not p.exists():
            continue
        side = JsonlWriter(p).rewind(offset_of_step(p, step), tag)
        if side:
            log.warning(f"samples written after the checkpoint were moved to {side}")
            sides.append(side)
    return sides


def offset_of_step(path, step):
    """Byte offset of the first record with record["step"] >= step (the file size if none)."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                rec_step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                rec_step = None  # a torn last line from a killed rank: it goes to the side file
                if not line.endswith(b"\n"):
                    return offset
            if rec_step is not None and rec_step >= step:
                return offset
            offset += len(line)
    return offset
