"""The general corpus and its sampler: passages, sources' errors, sharding and resume determinism."""
import json
import math
import logging
from collections import Counter

import numpy as np
import pytest

from ms_dfkd import corpus as corpus_mod
from ms_dfkd.corpus import Corpus, CorpusError, CorpusSampler, balanced_labels, paragraph_passages


# ------------------------------------------------------------------ corpus

def test_paragraph_passages_join_and_bounds():
    para = ("Yes. It works. The market rose sharply on Monday after the strong results were announced. "
            + "Long " * 70 + "end. Short end.")
    out = paragraph_passages(para, min_words=4, max_words=20)
    # "Yes." + "It works." (3 words < 4) are joined with the next sentence (3 + 13 = 16 <= 20 words);
    # the 71-word sentence is dropped, and the trailing 2-word sentence is too short.
    assert out == ["Yes. It works. The market rose sharply on Monday after the strong results were announced."]


def test_real_corpus_nonempty_in_bounds_unique(asset_or_skip):
    asset_or_skip("bbcnews_dir")
    asset_or_skip("political_csv")
    corpus = Corpus(["bbc", "political"], min_words=8, max_words=60)
    assert len(corpus) > 10000
    assert set(corpus.source_counts) == {"bbc", "political"} and min(corpus.source_counts.values()) > 1000
    lengths = np.array([len(p.split()) for p in corpus.passages])
    assert lengths.min() >= 8 and lengths.max() <= 60
    assert len({p.lower() for p in corpus.passages}) == len(corpus)
    assert all(p == " ".join(p.split()) for p in corpus.passages)
    again = Corpus(["bbc"], min_words=8, max_words=60)
    assert again.passages == corpus.passages[:len(again)]


def test_file_corpus_text_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("one two three four five six seven eight\n\n  one two  three four five six seven eight\n"
                   "too short\nnine ten eleven twelve thirteen fourteen fifteen sixteen\n", encoding="utf-8")
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "a b c d e f g h"}) + "\n" + json.dumps({"text": "NINE ten eleven twelve "
                                                                               "thirteen fourteen fifteen sixteen"}))
    corpus = Corpus([f"file:{txt}", f"file:{jl}"])
    assert corpus.passages == ["one two three four five six seven eight",
                               "nine ten eleven twelve thirteen fourteen fifteen sixteen", "a b c d e f g h"]
    assert corpus.source_counts == {f"file:{txt}": 2, f"file:{jl}": 1}


def test_corpus_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="empty.txt"):
        Corpus([f"file:{empty}"])
    short = tmp_path / "short.txt"
    short.write_text("too short\nalso short\n")
    with pytest.raises(CorpusError, match="short.txt.*no passages"):
        Corpus([f"file:{short}"])
    with pytest.raises(FileNotFoundError, match="missing_corpus.txt"):
        Corpus([f"file:{tmp_path / 'missing_corpus.txt'}"])
    with pytest.raises(CorpusError, match="unknown corpus source 'wiki'"):
        Corpus(["wiki"])


def test_fortunes_source_and_missing_notice(tmp_path, monkeypatch, caplog):
    fdir = tmp_path / "fortunes"
    fdir.mkdir()
    (fdir / "wisdom").write_text("A journey of a thousand miles begins with a single step.\n%\n"
                                 "Hi.\n%\nThe best way to predict the future is\nto invent it.\n\t\t-- Alan Kay\n%\n")
    (fdir / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    monkeypatch.setattr(corpus_mod, "FORTUNES_DIR", fdir)
    corpus = Corpus(["fortunes"])
    assert corpus.passages == ["A journey of a thousand miles begins with a single step.",
                               "The best way to predict the future is to invent it. -- Alan Kay"]
    monkeypatch.setattr(corpus_mod, "FORTUNES_DIR", tmp_path / "not_installed")
    ok = tmp_path / "ok.txt"
    ok.write_text("one two three four five six seven eight\n")
    with caplog.at_level(logging.WARNING, logger="ms_dfkd.corpus"):
        assert len(Corpus(["fortunes", f"file:{ok}"])) == 1
    assert "fortunes" in caplog.text and "not_installed" in caplog.text
    with pytest.raises(CorpusError, match="empty.*fortunes"):
        Corpus(["fortunes"])


# ------------------------------------------------------------------ sampler

PASSAGES = [f"passage {i}" for i in range(24)]


def test_sampler_shards_disjoint_and_cover_one_epoch():
    world, n = 3, 2  # 4 steps of a 6-passage global batch = one epoch of 24
    samplers = [CorpusSampler(PASSAGES, seed=7, rank=r, world_size=world) for r in range(world)]
    seen = [[p for _ in range(4) for p in s.next_batch(n)] for s in samplers]
    for r in range(world):
        for q in range(r + 1, world):
            assert not set(seen[r]) & set(seen[q])
    assert sorted(p for shard in seen for p in shard) == sorted(PASSAGES)
    assert all(s.state_dict() == samplers[0].state_dict() for s in samplers)
    assert samplers[0].state_dict()["epoch"] == 1 and samplers[0].state_dict()["position"] == 0


def test_sampler_epochs_are_permutations_and_seeded():
    s = CorpusSampler(PASSAGES, seed=1)
    e0, e1 = s.next_batch(24), s.next_batch(24)
    assert sorted(e0) == sorted(PASSAGES) == sorted(e1) and e0 != e1 and e0 != PASSAGES
    assert CorpusSampler(PASSAGES, seed=2).next_batch(24) != e0
    assert CorpusSampler(PASSAGES, seed=1).next_batch(24) == e0


def test_sampler_resume_equals_straight_run():
    corpus = PASSAGES[:10]  # batches of 3 cross epoch boundaries
    straight = CorpusSampler(corpus, seed=3)
    expected = [straight.next_batch(3) for _ in range(8)]
    first = CorpusSampler(corpus, seed=3)
    got = [first.next_batch(3) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # it survives a JSON checkpoint
    assert all(isinstance(v, int) for v in state.values())
    resumed = CorpusSampler(corpus, seed=3)
    resumed.load_state_dict(state)
    got += [resumed.next_batch(3) for _ in range(4)]
    assert got == expected


def test_sampler_world_size_change_continues_global_stream():
    corpus = PASSAGES[:17]
    n = 2
    reference = CorpusSampler(corpus, seed=5)  # one rank; the global stream in order

    def global_batch(samplers):
        per_rank = [s.next_batch(n) for s in samplers]
        w = len(samplers)
        return [per_rank[k % w][k // w] for k in range(n * w)]  # rank r holds offsets r, r+w, ...

    two = [CorpusSampler(corpus, seed=5, rank=r, world_size=2) for r in range(2)]
    stream = [p for _ in range(3) for p in global_batch(two)]
    state = two[1].state_dict()
    assert state == two[0].state_dict() and state["position"] == 12
    three = [CorpusSampler(corpus, seed=5, rank=r, world_size=3) for r in range(3)]
    for s in three:
        s.load_state_dict(state)
    stream += [p for _ in range(3) for p in global_batch(three)]
    assert stream == reference.next_batch(12 + 18)


def test_sampler_state_mismatch_errors():
    s = CorpusSampler(PASSAGES, seed=1)
    state = s.state_dict()
    with pytest.raises(ValueError, match="seed 1.*seed 2"):
        CorpusSampler(PASSAGES, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="24 passages.*10"):
        CorpusSampler(PASSAGES[:10], seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        CorpusSampler(PASSAGES, seed=1, rank=2, world_size=2)


def test_balanced_labels():
    for step in range(5):
        y = balanced_labels(7, 3, step)
        counts = np.bincount(y, minlength=3)
        assert counts.max() - counts.min() <= 1
    running = np.concatenate([balanced_labels(5, 2, step) for step in range(10)])
    assert np.bincount(running).tolist() == [25, 25]
    a = balanced_labels(9, 4, np.random.default_rng(0))
    b = balanced_labels(9, 4, np.random.default_rng(0))
    assert a.tolist() == b.tolist() and sorted(Counter(a.tolist()).values()) == [2, 2, 2, 3]


def test_select_confident_against_a_brute_force_ranking():
    """Per predicted label, the ceil(fraction * n) rows with the highest probability of that label (ties to
    the earlier row), found here by sorting (probability, row) pairs in plain Python."""
    from ms_dfkd.corpus import select_confident
    rng = np.random.default_rng(3)
    for n, k, fraction in ((50, 2, 0.2), (37, 3, 0.5), (9, 2, 1.0), (5, 4, 0.01)):
        logits = rng.normal(size=(n, k))
        logits[1] = logits[0]                      # a tie
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        want = []
        for y in range(k):
            rows = [(-probs[i, y], i) for i in range(n) if max(range(k), key=lambda c: probs[i, c]) == y]
            want += [i for _, i in sorted(rows)[:math.ceil(fraction * len(rows))]]
        assert select_confident(probs, fraction).tolist() == sorted(want)
    with pytest.raises(ValueError, match="fraction"):
        select_confident(np.full((3, 2), 0.5), 0)
