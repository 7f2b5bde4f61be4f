"""Entity-level F1 over BIO tags: hand-computed cases (in the comments), and seqeval's default mode on random
sequences where seqeval is installed (it is not a dependency of ms-dfkd; `pip install seqeval`)."""
import warnings

import numpy as np
import pytest

from ms_dfkd.metrics import bio_entities, compute_metric, entity_f1


@pytest.mark.parametrize("tags, want", [
    (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 2), ("LOC", 3, 4)}),
    (["O", "I-PER", "I-PER", "O"], {("PER", 1, 3)}),                     # I- after O opens an entity
    (["I-LOC"], {("LOC", 0, 1)}),                                          # ... and so at the start
    (["B-PER", "I-LOC", "I-LOC"], {("PER", 0, 1), ("LOC", 1, 3)}),         # a type switch splits the span
    (["B-PER", "B-PER", "I-PER"], {("PER", 0, 1), ("PER", 1, 3)}),         # B- after B- opens another
    (["B-A", "I-A", "I-B", "B-B", "O", "I-A"], {("A", 0, 2), ("B", 2, 3), ("B", 3, 4), ("A", 5, 6)}),
    (["O", "O"], set()),
    ([], set()),
    (["O", "B-geo-loc", "I-geo-loc"], {("geo-loc", 1, 3)}),               # a type with a hyphen
])
def test_bio_entities_by_hand(tags, want):
    assert bio_entities(tags) == want


@pytest.mark.parametrize("bad", ["X", "B-", "E-PER", "b-per", "", None])
def test_bio_entities_rejects_non_bio_tags(bad):
    with pytest.raises(ValueError, match="not a BIO tag"):
        bio_entities(["O", bad])


def test_entity_f1_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"], ["O", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG"], ["O", "B-MISC"]]
    # true: PER s0[0:2], LOC s0[3:4], ORG s1[0:1], MISC s2[1:2] (I- after O)
    # pred: PER s0[0:2], ORG s0[3:4], ORG s1[0:2] (span too long), MISC s2[1:2]
    # correct: PER and MISC -> P = 2/4, R = 2/4, F1 = 1/2
    r = entity_f1(true, pred)
    assert r["precision"] == pytest.approx(0.5) and r["recall"] == pytest.approx(0.5)
    assert r["micro_f1"] == pytest.approx(0.5)
    assert r["support"] == 4 and r["predicted"] == 4
    assert r["per_type"] == {
        "LOC": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},   # never predicted
        "MISC": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
        "ORG": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},   # 0 of 2 predictions right
        "PER": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}}


def test_entity_f1_unequal_precision_and_recall():
    true = [["B-A", "O", "B-A", "O", "B-B"]]
    pred = [["B-A", "O", "O", "O", "O"]]
    # 1 of 1 predicted right, 1 of 3 true found: P = 1, R = 1/3, F1 = 2 * (1/3) / (4/3) = 1/2
    r = entity_f1(true, pred)
    assert (r["precision"], r["recall"], r["micro_f1"]) == pytest.approx((1.0, 1 / 3, 0.5))
    assert r["per_type"]["A"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert r["per_type"]["B"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_entity_f1_empty_predictions_and_no_true_entities():
    r = entity_f1([["B-A", "I-A", "O"]], [["O", "O", "O"]])
    assert (r["precision"], r["recall"], r["micro_f1"], r["support"], r["predicted"]) == (0.0, 0.0, 0.0, 1, 0)
    r = entity_f1([["O", "O"]], [["O", "B-A"]])
    assert (r["precision"], r["recall"], r["micro_f1"], r["support"], r["predicted"]) == (0.0, 0.0, 0.0, 0, 1)
    assert r["per_type"] == {"A": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}
    r = entity_f1([["O"]], [["O"]])
    assert r["micro_f1"] == 0.0 and r["per_type"] == {}
    assert entity_f1([["B-A", "I-A"]], [["B-A", "I-A"]])["micro_f1"] == 1.0


def test_entities_do_not_cross_sentences():
    # one sentence ends in B-A, the next starts with I-A: two entities, and a prediction that joins
    # them cannot exist; scoring the pair of sentences as given finds both
    r = entity_f1([["O", "B-A"], ["I-A", "O"]], [["O", "B-A"], ["I-A", "O"]])
    assert r["support"] == 2 and r["micro_f1"] == 1.0


def test_entity_f1_shape_errors():
    with pytest.raises(ValueError, match="differ in number"):
        entity_f1([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="sentence 1: 2 true tags but 1 predicted"):
        entity_f1([["O"], ["O", "O"]], [["O"], ["O"]])


def test_compute_metric_entity_f1_takes_preds_first():
    true, pred = [["B-A", "O", "B-A"]], [["B-A", "O", "O"]]
    # P = 1, R = 1/2 -> F1 = 2/3 either way round, so check the order on precision instead
    assert compute_metric("entity_f1", pred, true) == pytest.approx(2 / 3)
    assert entity_f1(true, pred)["precision"] == 1.0


# ------------------------------------------------------------------ against seqeval

def _random_seqs(rng, lengths, types, p_o=0.45):
    tags = ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
    weights = np.array([p_o] + [(1 - p_o) / (len(tags) - 1)] * (len(tags) - 1))
    return [[tags[i] for i in rng.choice(len(tags), n, p=weights)] for n in lengths]


def _perturb(rng, seqs, types):
    out = []
    for s in seqs:
        s = list(s)
        for j in range(len(s)):
            if rng.random() < 0.25:
                s[j] = rng.choice(["O", *[f"{p}-{t}" for t in types for p in "BI"]])
        out.append(s)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matches_seqeval_default_mode(seed):
    seqeval = pytest.importorskip("seqeval.metrics")
    from seqeval.metrics.sequence_labeling import get_entities
    rng = np.random.default_rng(seed)
    types = ["PER", "LOC", "geo-loc"][: 1 + seed % 3]
    lengths = rng.integers(0, 12, 40)
    true = _random_seqs(rng, lengths, types)
    pred = _perturb(rng, true, types) if seed % 2 else _random_seqs(rng, lengths, types)
    for s in true + pred:   # seqeval's end is inclusive
        assert bio_entities(s) == {(t, b, e + 1) for t, b, e in get_entities(s)}
    r = entity_f1(true, pred)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # seqeval warns on 0/0 and returns 0, as entity_f1 does
        assert r["micro_f1"] == pytest.approx(seqeval.f1_score(true, pred), abs=1e-12)
        assert r["precision"] == pytest.approx(seqeval.precision_score(true, pred), abs=1e-12)
        assert r["recall"] == pytest.approx(seqeval.recall_score(true, pred), abs=1e-12)
        report = seqeval.classification_report(true, pred, output_dict=True)
    for t, v in r["per_type"].items():
        assert v["precision"] == pytest.approx(report[t]["precision"], abs=1e-12)
        assert v["recall"] == pytest.approx(report[t]["recall"], abs=1e-12)
        assert v["f1"] == pytest.approx(report[t]["f1-score"], abs=1e-12)
        assert v["support"] == report[t]["support"]
    assert set(r["per_type"]) == {k for k in report if not k.endswith(" avg")}
