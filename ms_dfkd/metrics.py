"""Task metrics and generation metrics, in numpy.

Task metrics (METHOD.md, "Metrics per task"): accuracy for sentiment and topic,
Matthews correlation for acceptability (CoLA), micro-F1 for information extraction
posed as token or relation classification, where the "nothing here" label ("O",
"no_relation") is excluded from the counts, and entity-level F1 over BIO tag sequences
(NER, seqeval's conventions). Generation metrics describe the generated
texts: specificity rate, label balance, distinct-n and self-BLEU.
"""
import math
from collections import Counter

import numpy as np


def _flat_pair(preds, labels):
    """Flatten (possibly nested, e.g. per-token) predictions and labels to equal-length arrays."""
    def flat(x):
        x = list(x)
        if x and isinstance(x[0], (list, tuple, np.ndarray)):
            return [v for seq in x for v in seq]
        return x
    p, y = flat(preds), flat(labels)
    if len(p) != len(y):
        raise ValueError(f"predictions and labels differ in length: {len(p)} vs {len(y)}")
    if not p:
        raise ValueError("no predictions to score")
    return np.asarray(p), np.asarray(y)


def accuracy(preds, labels):
    p, y = _flat_pair(preds, labels)
    return float(np.mean(p == y))


def confusion_matrix(preds, labels, classes=None):
    """C[i, j] = number of examples with true class classes[i] predicted as classes[j]."""
    p, y = _flat_pair(preds, labels)
    classes = list(np.unique(np.concatenate([y, p]))) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    c = np.zeros((len(classes), len(classes)), np.int64)
    for t, q in zip(y.tolist(), p.tolist()):
        c[index[t], index[q]] += 1
    return c


def matthews_corrcoef(preds, labels):
    """Matthews correlation, K-class form of Gorodkin (2004) as in sklearn; 0.0 when undefined.

    With C the confusion matrix, t = true counts, p = predicted counts, c = trace, s = total:
        MCC = (c*s - t.p) / sqrt((s^2 - p.p) * (s^2 - t.t)).
    For two classes this equals (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
    """
    cm = confusion_matrix(preds, labels).astype(np.float64)
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    c, s = np.trace(cm), cm.sum()
    cov_ytyp = c * s - t @ p
    denom = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return 0.0 if denom == 0 else float(cov_ytyp / denom)


def _f1(tp, n_pred, n_true):
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_true if n_true else 0.0
    return 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)


def micro_f1(preds, labels, ignore=None):
    """Micro-averaged F1 over all classes except ``ignore``.

    Without ``ignore`` every example is a positive of some class, so micro-F1 equals
    accuracy. With ignore="O" (tokens) or "no_relation": a prediction counts as a true
    positive when it equals the label and is not ``ignore``; precision is over the
    predictions that are not ``ignore``, recall over the labels that are not.
    Nested lists (one list of tags per sentence) are flattened.
    """
    p, y = _flat_pair(preds, labels)
    if ignore is None:
        return float(np.mean(p == y))
    tp = int(np.sum((p == y) & (y != ignore)))
    return float(_f1(tp, int(np.sum(p != ignore)), int(np.sum(y != ignore))))


def macro_f1(preds, labels, classes=None):
    """Unweighted mean of per-class F1 over ``classes`` (default: every class in labels or preds)."""
    p, y = _flat_pair(preds, labels)
    classes = np.unique(np.concatenate([y, p])) if classes is None else classes
    scores = [_f1(int(np.sum((p == c) & (y == c))), int(np.sum(p == c)), int(np.sum(y == c)))
              for c in classes]
    return float(np.mean(scores))


def binary_f1(preds, labels, positive=1):
    """F1 of the positive class (GLUE's F1 for MRPC/QQP)."""
    p, y = _flat_pair(preds, labels)
    tp = int(np.sum((p == positive) & (y == positive)))
    return float(_f1(tp, int(np.sum(p == positive)), int(np.sum(y == positive))))


# ------------------------------------------------------------------ entity-level F1 (BIO)

def _split_tag(tag):
    """("O", None) or ("B"|"I", type); anything else is a ValueError."""
    if tag == "O":
        return "O", None
    if isinstance(tag, str) and len(tag) > 2 and tag[0] in "BI" and tag[1] == "-":
        return tag[0], tag[2:]
    raise ValueError(f"not a BIO tag: {tag!r} (expected O, B-<type> or I-<type>)")


def bio_entities(tags):
    """The entities of one BIO tag sequence as a set of (type, start, end), end exclusive (tokens[start:end]).

    seqeval's default (non-strict, conlleval) reading: B-x starts an entity; I-x continues the entity
    before it only if that entity has type x, and otherwise (after O, at the start, or after an entity of
    another type) starts a new entity of type x; O ends the entity before it.
    """
    out = set()
    cur_type, start = None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, typ = _split_tag(tag)
        if cur_type is not None and (prefix != "I" or typ != cur_type):
            out.add((cur_type, start, i))
            cur_type = None
        if prefix == "B" or (prefix == "I" and cur_type is None):
            cur_type, start = typ, i
    return out


def entity_f1(true_seqs, pred_seqs):
    """Entity-level scores over sentences of BIO tags, as seqeval's defaults (``bio_entities``).

    A predicted entity is correct when its type, start and end all match a true entity of the same
    sentence. Returns {micro_f1, precision, recall, support (true entities), predicted,
    per_type: {type: {precision, recall, f1, support}}}, per_type over the types that are true or
    predicted somewhere. A ratio with a zero denominator is 0.0 (seqeval's zero_division default, without
    its warning): no predicted entities give precision 0, no true entities recall 0.
    """
    true_seqs, pred_seqs = list(true_seqs), list(pred_seqs)
    if len(true_seqs) != len(pred_seqs):
        raise ValueError(f"true and predicted sequences differ in number: {len(true_seqs)} vs {len(pred_seqs)}")
    n_true, n_pred, n_tp = Counter(), Counter(), Counter()
    for i, (t, p) in enumerate(zip(true_seqs, pred_seqs)):
        t, p = list(t), list(p)
        if len(t) != len(p):
            raise ValueError(f"sentence {i}: {len(t)} true tags but {len(p)} predicted")
        te, pe = bio_entities(t), bio_entities(p)
        n_true.update(e[0] for e in te)
        n_pred.update(e[0] for e in pe)
        n_tp.update(e[0] for e in te & pe)

    def prf(tp, np_, nt):
        prec = tp / np_ if np_ else 0.0
        rec = tp / nt if nt else 0.0
        return prec, rec, _f1(tp, np_, nt)

    per_type = {}
    for typ in sorted(set(n_true) | set(n_pred)):
        prec, rec, f1 = prf(n_tp[typ], n_pred[typ], n_true[typ])
        per_type[typ] = {"precision": prec, "recall": rec, "f1": f1, "support": n_true[typ]}
    tp, np_, nt = sum(n_tp.values()), sum(n_pred.values()), sum(n_true.values())
    prec, rec, f1 = prf(tp, np_, nt)
    return {"micro_f1": f1, "precision": prec, "recall": rec, "support": nt, "predicted": np_,
            "per_type": per_type}


def entity_micro_f1(preds, labels):
    """``entity_f1(labels, preds)["micro_f1"]`` in the (preds, labels) order of METRICS."""
    return entity_f1(labels, preds)["micro_f1"]


METRICS = {
    "accuracy": accuracy, "acc": accuracy,
    "mcc": matthews_corrcoef, "matthews_corrcoef": matthews_corrcoef,
    "micro_f1": micro_f1, "macro_f1": macro_f1, "f1": binary_f1,
    "entity_f1": entity_micro_f1,
}


def compute_metric(name, preds, labels, **kwargs):
    """A task metric by name (see METRICS); kwargs go to it (e.g. ignore="O" for micro_f1)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known metrics: {sorted(METRICS)}")
    return METRICS[name](preds, labels, **kwargs)


# ------------------------------------------------------------------ generation metrics

def _tokens(text):
    return text.lower().split()


def _ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts, n):
    """Unique n-grams / total n-grams over the set of texts (n-grams do not cross texts).

    Tokens are whitespace-split and lowercased. 0.0 when the texts have no n-gram.
    """
    grams = [g for t in texts for g in _ngrams(_tokens(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts, n_max=4, max_samples=None, seed=0, epsilon=0.1):
    """Mean BLEU of each text (hypothesis) against all the other texts (references).

    BLEU per hypothesis: modified n-gram precisions p_1..p_n_max with counts clipped by the
    maximum count in any one reference, uniform weights, smoothing method 1 of Chen &
    Cherry (2014) (a zero numerator becomes epsilon), and the brevity penalty against the
    reference length closest to the hypothesis length (ties: the shorter). A hypothesis
    with no unigram match scores 0. High self-BLEU means the texts repeat each other.

    max_samples: score at most this many hypotheses, chosen with ``seed``; the references
    are always all the other texts.
    """
    toks = [_tokens(t) for t in texts]
    if len(toks) < 2:
        raise ValueError(f"self-BLEU needs at least two texts, got {len(toks)}")
    counts = [[Counter(_ngrams(t, n)) for n in range(1, n_max + 1)] for t in toks]
    # For every n-gram keep the two largest counts over texts and the text holding the largest:
    # the clipping count against "all texts but i" is then the largest, or the second if i holds it.
    top = [{} for _ in range(n_max)]
    for i, per_n in enumerate(counts):
        for k, cnt in enumerate(per_n):
            for g, c in cnt.items():
                best, best_i, second = top[k].get(g, (0, -1, 0))
                if c > best:
                    top[k][g] = (c, i, best)
                elif c > second:
                    top[k][g] = (best, best_i, c)
    length_counts = Counter(len(t) for t in toks)

    hyps = range(len(toks))
    if max_samples is not None and max_samples < len(toks):
        hyps = sorted(np.random.default_rng(seed).choice(len(toks), max_samples, replace=False).tolist())
    scores = []
    for i in hyps:
        hyp_len = len(toks[i])
        log_p = 0.0
        for k in range(n_max):
            total = sum(counts[i][k].values())
            matched = 0
            for g, c in counts[i][k].items():
                best, best_i, second = top[k][g]
                matched += min(c, second if best_i == i else best)
            if k == 0 and matched == 0:
                log_p = None
                break
            log_p += math.log((matched if matched else epsilon) / max(total, 1)) / n_max
        if log_p is None or hyp_len == 0:
            scores.append(0.0)
            continue
        others = length_counts.copy()
        others[hyp_len] -= 1
        ref_len = min((l for l, c in others.items() if c > 0), key=lambda l: (abs(l - hyp_len), l))
        bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
        scores.append(bp * math.exp(log_p))
    return float(np.mean(scores))


def is_degenerate(text):
    """True for a sample that is not text: no word of two letters or more, or (from four tokens on) one
    whitespace token that makes up more than half of it ("- - - - -", "N.B - - - -", "the the the the")."""
    tokens = _tokens(text)
    if not any(sum(c.isalpha() for c in t) >= 2 for t in tokens):
        return True
    return len(tokens) >= 4 and Counter(tokens).most_common(1)[0][1] * 2 > len(tokens)


def degenerate_share(texts):
    """Share of ``is_degenerate`` samples (0.0 for no texts)."""
    return float(np.mean([is_degenerate(t) for t in texts])) if texts else 0.0


def label_balance(labels, num_labels):
    """Share of each label and the entropy ratio H(shares) / log K (1.0 = perfectly balanced)."""
    y = np.asarray(labels, np.int64).reshape(-1)
    if y.size == 0:
        raise ValueError("label_balance needs at least one label")
    if y.min() < 0 or y.max() >= num_labels:
        raise ValueError(f"labels must lie in 0..{num_labels - 1}; got values {sorted(set(y.tolist()))}")
    dist = np.bincount(y, minlength=num_labels) / y.size
    nz = dist[dist > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    ratio = entropy / math.log(num_labels) if num_labels > 1 else 1.0
    return {"distribution": dist.tolist(), "entropy_ratio": ratio}


def specificity_rate(teacher_argmax, target_labels):
    """Share of generated samples whose teacher argmax is the label they were asked for."""
    return accuracy(np.asarray(teacher_argmax).reshape(-1), np.asarray(target_labels).reshape(-1))
