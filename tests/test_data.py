"""Task data: the Rotten Tomatoes split protocol and the labelled-file readers' errors."""
import bz2
import csv
import json
from collections import defaultdict

import pytest

from ms_dfkd import data
from ms_dfkd.data import get_task, load_glue_tsv, load_labelled_file, load_rotten_tomatoes, load_task_file


# ------------------------------------------------------------------ Rotten Tomatoes

@pytest.fixture(scope="module")
def rt_raw(asset_or_skip):
    """The raw CSV rows, read here independently of ms_dfkd.data."""
    path = asset_or_skip("rotten_tomatoes_csv")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        return [(r["category"], " ".join(r["text"].split())) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def rt_splits(rt_raw):
    return {s: load_rotten_tomatoes(s) for s in ("train", "dev", "test", "all")}


def test_rt_split_sizes_disjoint_and_deterministic(rt_splits):
    sizes = {s: len(rt_splits[s]) for s in ("train", "dev", "test")}
    total = sum(sizes.values())
    assert total == len(rt_splits["all"])
    assert 0.78 < sizes["train"] / total < 0.82
    assert 0.08 < sizes["dev"] / total < 0.12
    assert 0.08 < sizes["test"] / total < 0.12
    keys = {s: {t.lower() for t, _ in rt_splits[s]} for s in ("train", "dev", "test")}
    assert not keys["train"] & keys["dev"] and not keys["train"] & keys["test"] and not keys["dev"] & keys["test"]
    # a fresh read (cache cleared) gives the same split in the same order
    data._rt_examples.cache_clear()
    data._read_rt_rows.cache_clear()
    assert load_rotten_tomatoes("test") == rt_splits["test"]


def test_rt_labels_no_plots_no_duplicates(rt_raw, rt_splits):
    labels_of = defaultdict(set)
    for cat, text in rt_raw:
        labels_of[text.lower()].add(cat)
    conflicting = {k for k, cats in labels_of.items() if {"fresh", "rotten"} <= cats}
    plots = {k for k, cats in labels_of.items() if cats == {"plot"}}
    all_examples = rt_splits["all"]
    keys = [t.lower() for t, _ in all_examples]
    assert len(keys) == len(set(keys)), "duplicate texts survived"
    assert not set(keys) & plots
    assert not set(keys) & conflicting
    for text, y in all_examples:
        assert labels_of[text.lower()] & {"fresh", "rotten"} == {["rotten", "fresh"][y]}
    # every usable critic snippet is kept
    usable = {k for k, cats in labels_of.items() if len(cats & {"fresh", "rotten"}) == 1}
    assert set(keys) == usable
    for s in ("train", "dev", "test"):
        assert set(y for _, y in rt_splits[s]) == {0, 1}


def test_rt_unknown_split():
    with pytest.raises(ValueError, match="'validation'"):
        load_rotten_tomatoes("validation")


# ------------------------------------------------------------------ labelled files

def test_glue_sst2_and_cola_layouts(tmp_path):
    sst = tmp_path / "sst_dev.tsv"
    sst.write_text("sentence\tlabel\nit 's a charming journey . \t1\na dull mess \t0\n", encoding="utf-8")
    assert load_glue_tsv(sst, "sst2") == [("it 's a charming journey . ", 1), ("a dull mess ", 0)]
    sst_test = tmp_path / "sst_test.tsv"
    sst_test.write_text("index\tsentence\n0\tuneasy mishmash .\n", encoding="utf-8")
    assert load_glue_tsv(sst_test, "sst2") == [("uneasy mishmash .", None)]
    cola = tmp_path / "in_domain_dev.tsv"
    cola.write_text("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
                    "gj04\t0\t*\tThe more we study verbs, the crazier they get get.\n", encoding="utf-8")
    assert load_task_file(cola, "cola") == [("The sailors rode the breeze clear of the rocks.", 1),
                                             ("The more we study verbs, the crazier they get get.", 0)]
    bad = tmp_path / "bad_cola.tsv"
    bad.write_text("gj04\t1\t\tFine.\ngj04\t7\t\tOdd label.\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_cola\.tsv:2: unknown label 7.*unacceptable"):
        load_glue_tsv(bad, "cola")


def test_labelled_file_formats(tmp_path):
    names = ["negative", "positive"]
    tsv = tmp_path / "eval.tsv"
    tsv.write_text("text\tlabel\ngreat fun\tpositive\nawful\t0\n", encoding="utf-8")
    assert load_labelled_file(tsv, names) == [("great fun", 1), ("awful", 0)]
    csv_path = tmp_path / "eval.csv"
    csv_path.write_text('label,text\n1,"good, really"\n', encoding="utf-8")
    assert load_labelled_file(csv_path, names) == [("good, really", 1)]
    jl = tmp_path / "eval.jsonl"
    jl.write_text(json.dumps({"text": "meh", "label": 0}) + "\n\n" + json.dumps({"text": "wow", "label": "positive"}))
    assert load_labelled_file(jl, names) == [("meh", 0), ("wow", 1)]


def test_labelled_file_unknown_label_names_file_line_and_known_labels(tmp_path):
    names = ["negative", "positive"]
    tsv = tmp_path / "eval.tsv"
    tsv.write_text("text\tlabel\ngreat fun\tpositive\nso-so\tneutral\n", encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_labelled_file(tsv, names)
    msg = str(e.value)
    assert "eval.tsv:3" in msg and "'neutral'" in msg and "negative" in msg and "positive" in msg
    jl = tmp_path / "eval.jsonl"
    jl.write_text(json.dumps({"text": "x", "label": 1}) + "\n" + json.dumps({"text": "y", "label": 2}) + "\n")
    with pytest.raises(ValueError, match=r"eval\.jsonl:2: unknown label 2"):
        load_labelled_file(jl, names)


def test_labelled_file_missing_and_malformed(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_labelled_file(missing, ["a", "b"])
    no_col = tmp_path / "cols.tsv"
    no_col.write_text("sentence\ty\nx\t1\n")
    with pytest.raises(ValueError, match="cols.tsv.*'text'"):
        load_labelled_file(no_col, ["a", "b"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl: no labelled examples"):
        load_labelled_file(empty, ["a", "b"])


def test_tasks():
    assert get_task("sst2").label_names == ["negative", "positive"]
    assert get_task("cola").label_names == ["unacceptable", "acceptable"] and get_task("cola").metric == "mcc"
    assert get_task("sentiment").num_labels == 2
    with pytest.raises(ValueError, match="unknown task 'mnli'"):
        get_task("mnli")


def test_tsv_is_read_line_by_line_without_quote_processing(tmp_path):
    """A text that starts with a double quote (csv's quoting would merge the lines after it into one
    field) stays one row; every row keeps its own label."""
    names = ["a", "b", "c", "d", "e"]
    rows = [('"Quoted start of a headline', "a"), ("a plain one", "b"), ('ends with a quote"', "c"),
            ('"both"', "d"), ("tab-free text with \"inner\" quotes", "e")] * 5
    tsv = tmp_path / "topics.tsv"
    tsv.write_bytes(("text\tlabel\r\n" + "".join(f"{t}\t{l}\r\n" for t, l in rows)).encode())
    got = load_labelled_file(tsv, names)
    assert got == [(t, names.index(l)) for t, l in rows]


def test_tsv_wrong_column_count_names_file_and_line(tmp_path):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text("text\tlabel\nfine\ta\ntwo\ttabs\there\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.tsv:3: expected 2 tab-separated columns \(text, label\), got 3"):
        load_labelled_file(tsv, ["a", "b"])
    empty = tmp_path / "empty.tsv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.tsv: empty file"):
        load_labelled_file(empty, ["a", "b"])


@pytest.mark.parametrize("name", ["bin.tsv", "bin.csv", "bin.jsonl"])
def test_binary_file_is_an_error_naming_it(tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"text\tlabel\n\xff\xfe\x00\x81garbage\t0\n")
    with pytest.raises(ValueError, match=rf"{name.replace('.', chr(92) + '.')}: not UTF-8 text"):
        load_labelled_file(f, ["a", "b"])
