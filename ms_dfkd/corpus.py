"""The general-domain corpus, deterministic corpus sampling, and balanced target labels.

The corpus is unlabelled passages (BBC news, convention speeches, fortunes, user files)
that the generator rewrites into task data. ``CorpusSampler`` replays the same passage
stream from a seed and a two-int cursor, so that a resumed run draws what a straight
run would have drawn.
"""
import csv
import logging
import re
from pathlib import Path

import numpy as np

from .assets import asset_path
from .data import iter_jsonl, normalize_ws

logger = logging.getLogger(__name__)

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


def select_confident(probs, fraction):
    """Which passages to keep, choosing without task data: for each label the teacher predicts, the
    ``fraction`` of the passages it assigns to that label on which its probability of the label is highest
    (rounded up, so every predicted label keeps at least one). probs: float [N, K]. Returns the kept row
    indices, ascending. Ties go to the earlier row."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or not len(probs):
        raise ValueError(f"need teacher probabilities of shape [N, K], N > 0; got {probs.shape}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    pred = probs.argmax(1)
    keep = []
    for y in np.unique(pred):
        rows = np.flatnonzero(pred == y)
        order = rows[np.argsort(-probs[rows, y], kind="stable")]
        keep.append(order[:int(np.ceil(fraction * len(rows)))])
    return np.sort(np.concatenate(keep))
