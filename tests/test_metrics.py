"""Metrics against values computed by hand in the comments."""
import math

import numpy as np
import pytest

from ms_dfkd.metrics import (accuracy, binary_f1, compute_metric, distinct_n, label_balance, macro_f1,
                             matthews_corrcoef, micro_f1, self_bleu, specificity_rate)


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_mcc_binary_by_hand():
    labels = [1, 1, 1, 1, 1, 0, 0, 0]
    preds = [1, 1, 1, 0, 0, 0, 0, 1]
    # TP=3 FN=2 TN=2 FP=1: (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 4 / sqrt(4*5*3*4)
    assert matthews_corrcoef(preds, labels) == pytest.approx(4 / math.sqrt(240), abs=1e-12)
    # swapping the roles of the two classes does not change MCC
    assert matthews_corrcoef([1 - p for p in preds], [1 - y for y in labels]) == pytest.approx(4 / math.sqrt(240))


def test_mcc_multiclass_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # confusion (rows true): [[1,1,0],[0,2,0],[1,0,1]]; t=(2,2,2) p=(2,3,1) c=4 s=6
    # (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (24 - 12) / sqrt((36 - 14)(36 - 12))
    assert matthews_corrcoef(preds, labels) == pytest.approx(12 / math.sqrt(22 * 24), abs=1e-12)


def test_mcc_degenerate_is_zero():
    assert matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0
    assert matthews_corrcoef([0, 1], [0, 1]) == 1.0
    assert matthews_corrcoef([1, 0], [0, 1]) == -1.0


def test_micro_f1_ignore_O_by_hand():
    labels = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG"]]
    preds = [["B-PER", "O", "B-LOC", "O"], ["O", "B-PER"]]
    # TP = 1 (B-PER); predicted non-O = 3; gold non-O = 3 -> P = R = 1/3 -> F1 = 1/3
    assert micro_f1(preds, labels, ignore="O") == pytest.approx(1 / 3)
    # without an ignored label micro-F1 is accuracy over all 6 tokens: 3 correct
    assert micro_f1(preds, labels) == pytest.approx(0.5)


def test_micro_f1_relation_ignore_int():
    labels = [0, 0, 1, 2, 2]
    preds = [0, 1, 1, 2, 0]
    # ignore 0: TP = 2 (1, 2); predicted non-0 = 3; gold non-0 = 3 -> F1 = 2/3
    assert micro_f1(preds, labels, ignore=0) == pytest.approx(2 / 3)


def test_macro_and_binary_f1_by_hand():
    labels = [0, 0, 1, 1, 2]
    preds = [0, 1, 1, 1, 2]
    # class 0: P=1 R=1/2 F=2/3; class 1: P=2/3 R=1 F=0.8; class 2: F=1
    assert macro_f1(preds, labels) == pytest.approx((2 / 3 + 0.8 + 1) / 3)
    # positive class 1 of a binary task: TP=2 FP=1 FN=1 -> F1 = 2/3
    assert binary_f1([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(2 / 3)


def test_compute_metric_names_and_errors():
    assert compute_metric("accuracy", [1, 0], [1, 1]) == 0.5
    assert compute_metric("mcc", [0, 1], [0, 1]) == 1.0
    assert compute_metric("micro_f1", ["O", "X"], ["X", "X"], ignore="O") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown metric 'bleu'.*accuracy"):
        compute_metric("bleu", [1], [1])
    with pytest.raises(ValueError, match="3 vs 2"):
        accuracy([1, 0, 1], [1, 0])


def test_distinct_n_by_hand():
    texts = ["the cat sat", "The cat ran"]
    # unigrams: the cat sat the cat ran -> 4 unique / 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 unique / 4; no bigram spans two texts
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["one"], 2) == 0.0


def test_self_bleu_identical_texts():
    texts = ["a good film with a great cast"] * 3
    assert self_bleu(texts) == pytest.approx(1.0)
    assert self_bleu(texts, max_samples=2) == pytest.approx(1.0)


def test_self_bleu_two_sentences_by_hand():
    texts = ["the cat sat on the mat", "the cat is on the mat"]
    # either as hypothesis vs the other: p1 = 5/6, p2 = 3/5 (the cat, on the, the mat),
    # p3 = 1/4 (on the mat), p4 = 0 -> epsilon 0.1 / 3; equal lengths so BP = 1
    expected = (5 / 6 * 3 / 5 * 1 / 4 * (0.1 / 3)) ** 0.25
    assert self_bleu(texts) == pytest.approx(expected, rel=1e-12)


def test_self_bleu_brevity_penalty_by_hand():
    texts = ["the cat sat on the mat", "the cat sat on the mat today"]
    # short one vs long: all precisions 1, BP = exp(1 - 7/6)
    # long one vs short: p = 6/7, 5/6, 4/5, 3/4 and no penalty (7 > 6)
    expected = (math.exp(1 - 7 / 6) + (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25) / 2
    assert self_bleu(texts) == pytest.approx(expected, rel=1e-12)


def test_self_bleu_clips_by_other_references_only():
    texts = ["a a a b", "a a x y", "a z w v"]
    # unigram BLEU, all lengths 4 so BP = 1:
    #   "a a a b": 'a' clipped to 2 (most in another text), b unmatched -> 2/4
    #   "a a x y": 'a' clipped to min(2, 3) = 2 -> 2/4
    #   "a z w v": 'a' -> 1/4
    assert self_bleu(texts, n_max=1) == pytest.approx((0.5 + 0.5 + 0.25) / 3)


def test_label_balance_by_hand():
    out = label_balance([0, 0, 0, 1], 2)
    assert out["distribution"] == pytest.approx([0.75, 0.25])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert out["entropy_ratio"] == pytest.approx(h / math.log(2))
    assert label_balance([0, 1, 2], 3)["entropy_ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="0..1"):
        label_balance([0, 2], 2)


def test_specificity_rate():
    assert specificity_rate(np.array([1, 0, 1, 1]), [1, 1, 1, 0]) == 0.5


def test_degenerate_samples_are_flagged():
    from ms_dfkd.metrics import degenerate_share, is_degenerate
    for bad in ["- - - - - - - -", "N.B - - - - - -", "the the the the good", "", "!!! ???", "a 1 2 3"]:
        assert is_degenerate(bad), bad
    for good in ["A warm, funny film.", "Great cast", "the plot is the weakest part of the film",
                 "- a sharp and moving drama -"]:
        assert not is_degenerate(good), good
    assert degenerate_share(["- - - - -", "a fine film", "N.B - - - -", "dull"]) == 0.5
    assert degenerate_share([]) == 0.0


@pytest.mark.parametrize("path", ["numpy", "graph"])
def test_generator_perplexity_matches_a_float64_log_softmax(path):
    """The driver's perplexity_g0 against the float64 log-softmax written out, on logits of the sampler's size,
    with a mask: from numpy logits (the prompted generator's: float32 exponentials summed in float64) and from
    G_θ0's logits where they are (dfkd-t3: losses.token_nll compiled, float32)."""
    import mindspore as ms
    from ms_dfkd.losses import token_nll
    from ms_dfkd.train import _perplexity, _perplexity_of
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 6, 49152)) * 4).astype(np.float32)
    ids = rng.integers(0, 49152, (4, 6))
    mask = (rng.random((4, 6)) > 0.3).astype(np.int32)
    lo = logits.astype(np.float64)
    logp = lo - lo.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[..., None], -1)[..., 0]
    want = np.exp((nll * mask).sum() / mask.sum())
    if path == "numpy":
        assert abs(_perplexity(logits.reshape(24, -1), ids, mask) / want - 1) < 1e-6
        assert _perplexity(logits, ids, np.zeros_like(mask)) == 1.0  # nothing to score
    else:
        got = ms.jit(token_nll)(ms.Tensor(logits), ms.Tensor(ids.astype(np.int32))).asnumpy()
        np.testing.assert_allclose(got, nll, rtol=1e-5, atol=1e-5)
        assert abs(_perplexity_of(got, mask) / want - 1) < 1e-5
        assert _perplexity_of(got, np.zeros_like(mask)) == 1.0
