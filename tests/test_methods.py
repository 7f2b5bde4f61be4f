"""The driver's other methods end to end on the smoke config, one round each: random, real and prompted
write rounds x gen_steps_per_round x batch_size records labelled by the teacher, and each batch is what
docs/METHOD.md says it is (dfkd-t3 and corpus run in test_e2e_smoke.py)."""
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
ROUNDS, GEN_STEPS, BATCH = 1, 2, 4  # --run.rounds 1; the smoke config's gen_steps_per_round and batch_size


def _distiller(teacher, out, method):
    import mindspore as ms
    from ms_dfkd.config import load_config, parse_overrides
    from ms_dfkd.train import Distiller
    cfg = load_config(SMOKE, parse_overrides(["--teacher.checkpoint", teacher, "--run.out_dir", str(out),
                                              "--run.rounds", str(ROUNDS), "--run.method", method]))
    assert (cfg.run.gen_steps_per_round, cfg.generator.batch_size) == (GEN_STEPS, BATCH)
    ms.set_context(mode=ms.GRAPH_MODE if cfg.run.mode == "graph" else ms.PYNATIVE_MODE)
    return Distiller(cfg)


def _check_records(d, out):
    """rounds x batches x batch size records, in order, each with the teacher's probabilities on its text."""
    recs = [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]
    assert len(recs) == ROUNDS * GEN_STEPS * BATCH
    assert [r["step"] for r in recs] == [s for s in range(GEN_STEPS) for _ in range(BATCH)]
    assert all(r["round"] == 0 and r["rank"] == 0 for r in recs)
    probs = np.array([r["teacher_probs"] for r in recs])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, d.teacher_run.probs([r["text"] for r in recs]), atol=2e-6)
    assert [r["text"] for r in d.replay.records] == [r["text"] for r in recs]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == ROUNDS and metrics[0]["samples"] == len(recs) and np.isfinite(metrics[0]["loss_s"])
    assert d.counters["stu_steps"] == ROUNDS * d.cfg.run.student_steps_per_round
    return recs, metrics[0]


class _RecordingTokenizer:
    """The teacher's tokenizer, recording what it is asked to decode."""

    def __init__(self, tok):
        self._tok, self.decoded = tok, []

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def decode(self, ids, *args, **kwargs):
        ids = np.asarray(ids)
        text = self._tok.decode(ids, *args, **kwargs)
        self.decoded.append((ids, text))
        return text


def test_random_method_decodes_random_teacher_word_pieces(smoke_teacher, tmp_path):
    out = tmp_path / "random"
    d = _distiller(smoke_teacher, out, "random")
    assert d.generator is None and d.corpus_sampler is None  # no generator, no corpus
    tok = d.t_tok = _RecordingTokenizer(d.t_tok)
    assert d.run() is not None
    recs, metrics = _check_records(d, out)
    assert len(tok.decoded) == len(recs)
    T, V = d.cfg.generator.max_new_tokens, tok.vocab_size
    specials = {tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    lengths = []
    for (ids, text), r in zip(tok.decoded, recs):
        assert r["text"] == text and r["target"] == -1  # no target label: the student learns the teacher
        assert 5 <= len(ids) <= T  # 5 to max_new_tokens pieces
        assert ((ids >= 0) & (ids < V)).all() and not set(ids.tolist()) & specials
        assert all(not tok.id_to_token(int(i)).startswith("[unused") for i in ids)
        lengths.append(len(ids))
    assert len(set(lengths)) > 1 and len({r["text"] for r in recs}) == len(recs)
    assert "specificity" not in metrics and "loss_g" not in metrics


def test_real_method_draws_train_examples_with_their_labels(smoke_teacher, tmp_path):
    from ms_dfkd.data import load_split
    out = tmp_path / "real"
    d = _distiller(smoke_teacher, out, "real")
    assert d.generator is None and d.corpus_sampler is None
    assert d.run() is not None
    recs, _ = _check_records(d, out)
    labels = {}
    for text, y in load_split(d.cfg, "train"):
        labels.setdefault(text, set()).add(y)
    for r in recs:
        assert labels.get(r["text"]) == {r["target"]}, r  # a train example, with its true label as target
    dev = {t for t, _ in load_split(d.cfg, "dev")} | {t for t, _ in load_split(d.cfg, "test")}
    assert not any(r["text"] in dev for r in recs)


def test_prompted_method_samples_the_frozen_generator(smoke_teacher, smoke_one_round_run, tmp_path):
    """prompted: the pretrained generator's samples, never trained, with the prompts, labels and noise of
    dfkd-t3: its first batch is the one the dfkd-t3 run sampled before its first update."""
    out = tmp_path / "prompted"
    d = _distiller(smoke_teacher, out, "prompted")
    assert not hasattr(d, "opt_g") and not d.generator.trainable_params()
    gen0 = {n: p.asnumpy().copy() for n, p in d.generator.parameters_and_names()}
    batches, real_generate = [], d.generate_batch

    def recording(*args, **kwargs):
        s = real_generate(*args, **kwargs)
        batches.append(s)
        return s
    d.generate_batch = recording
    assert d.run() is not None
    for n, p in d.generator.parameters_and_names():
        np.testing.assert_array_equal(p.asnumpy(), gen0[n], err_msg=n)
    recs, metrics = _check_records(d, out)
    assert len(batches) == GEN_STEPS
    texts = [t for s in batches for t in s["texts"]]
    assert [r["text"] for r in recs] == texts
    assert [r["target"] for r in recs] == [int(y) for s in batches for y in s["labels"]] == [0, 1] * 4
    for s in batches:  # the texts are the decoded sampled tokens, up to each row's stop
        for ids, mask, text in zip(s["ids"], s["mask"], s["texts"]):
            assert mask.tolist() == sorted(mask.tolist(), reverse=True)  # a prefix
            assert text == d.g_tok.decode(ids[mask == 1]).strip()
    assert np.isfinite(metrics["perplexity_g0"]) and 0.0 <= metrics["specificity"] <= 1.0
    assert "loss_g" not in metrics
    dfkd = [json.loads(line) for line in (smoke_one_round_run / "generated.jsonl").read_text().splitlines()]
    first = [(r["text"], r["target"]) for r in dfkd if r["step"] == 0]
    assert [(r["text"], r["target"]) for r in recs[:BATCH]] == first
