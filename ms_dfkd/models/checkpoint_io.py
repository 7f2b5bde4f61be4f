"""Strict loading of name -> numpy state dicts into MindSpore cells, and the
project's own checkpoint files (MindSpore-compatible safetensors, written atomically).

Nothing is half-loaded: every key and shape is checked before the first
parameter is touched, and one error lists every problem.
"""
import functools
import os
import tempfile
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    pass


def check_state(cell, state, source="checkpoint", allow_missing=()):
    """Compare a {name: array} dict with cell.parameters_and_names(); raise CheckpointError.

    Names are the cell-relative names (``cell.parameters_and_names()``), so the
    cell's own prefix does not matter. ``allow_missing`` holds name prefixes that
    may stay at their initial values (e.g. a fresh classification head).
    """
    params = dict(cell.parameters_and_names())
    missing = [n for n in params if n not in state and not any(n.startswith(p) for p in allow_missing)]
    unexpected = [n for n in state if n not in params]
    mismatched = [f"{n}: checkpoint {tuple(np.shape(state[n]))} vs model {tuple(params[n].shape)}"
                  for n in state if n in params and tuple(np.shape(state[n])) != tuple(params[n].shape)]
    if missing or unexpected or mismatched:
        lines = [f"cannot load {source}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                             + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    return params


def load_state(cell, state, source="checkpoint", allow_missing=()):
    """Check everything first, then assign. Arrays are cast to each parameter's dtype."""
    import mindspore as ms
    params = check_state(cell, state, source, allow_missing)
    for name, arr in state.items():
        p = params[name]
        p.set_data(ms.Tensor(np.ascontiguousarray(arr), dtype=p.dtype))
    return cell


def state_of(cell):
    """{cell-relative name: float/int numpy array} of every parameter."""
    return {n: p.asnumpy() for n, p in cell.parameters_and_names()}


def atomic_write(path, write_fn, before_replace=None, finish_later=False):
    """Call write_fn(tmp_path), flush it to disk, call before_replace() if given, then rename it over
    path: a crash never leaves a half file.

    finish_later: only write_fn runs now; the flush, before_replace and the rename run on a background
    thread (the flush of a 292 MB run checkpoint waits on the disk for about a third of a second), and
    the returned Future's result() waits for them and raises what they raised. Until then path is the
    file it was. Interpreter exit waits for them too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)

    def finish():
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if before_replace is not None:
                before_replace()
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    try:
        write_fn(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if not finish_later:
        return finish()
    return _finisher().submit(finish)


@functools.lru_cache(maxsize=None)
def _finisher():
    """One worker thread: the finishing steps of atomic_write(finish_later=True), in order."""
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="ms_dfkd_finish_write")


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, read-only, ...); the file at its path is unchanged."""


def save_safetensors(state, path, metadata=None, before_replace=None, finish_later=False):
    """Write {name: np.ndarray} as safetensors (readable by ms.load_checkpoint(format='safetensors')).

    Atomic: on any failure the file at ``path`` (if any) is left as it was, and CheckpointWriteError says so.
    before_replace and finish_later as in atomic_write; with finish_later it returns a function that waits
    for the finishing steps and raises CheckpointWriteError if they failed."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file
    path = Path(path)
    clean = {k: np.ascontiguousarray(v) for k, v in state.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}

    def failed(e):
        kept = "the previous one there is unchanged" if path.exists() else "nothing was written"
        return CheckpointWriteError(f"could not write {path} ({e}); {kept}")
    try:
        pending = atomic_write(path, lambda tmp: save_file(clean, tmp, metadata=meta), before_replace, finish_later)
    except (SafetensorError, OSError) as e:
        raise failed(e) from None
    if pending is None:
        return None

    def wait():
        try:
            pending.result()
        except OSError as e:
            raise failed(e) from None
    return wait


def load_safetensors(path):
    """{name: np.ndarray} from a safetensors file, with a clear error for a missing or corrupt file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt or truncated safetensors file {path}: {e}") from None


def safetensors_metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata() or {}
