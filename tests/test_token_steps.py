"""TokenGeneratorLoss (ms_dfkd/token_steps.py), the generator step of a token task, against a float64 numpy
implementation written from docs/METHOD.md "Token tasks (NER)", on tests/test_steps.py's tiny world (its
generator, prompts, samples, noise and numpy Llama), with token-classification teacher and student: per row
the encoder reads [CLS] E_hat[z_1] .. E_hat[z_L] [SEP]; specificity is -log of the best generator position's
probability of B-<target type>, over the rows with a token; diversity on the mean of the last hidden states;
the adversarial term -tau^2 KL per generator position; fluency as for sequence tasks. Also the alignment of
the teacher's logits with the student's input (aligned_targets) by hand."""
import mindspore as ms
import numpy as np
import pytest

from ms_dfkd.config import LossConfig
from ms_dfkd.models.bert import BertConfig, BertForTokenClassification
from ms_dfkd.models.checkpoint_io import load_state
from ms_dfkd.models.llama import LlamaConfig, LlamaForCausalLM, set_trainable
from ms_dfkd.token_steps import TokenGeneratorLoss, aligned_targets
from test_steps import (B, CLS_ID, GEN_CFG, GEN_LENS, K, KD_T, LABELS, P, SEP_ID, STUDENT_CFG, T, TAU, TEACHER_CFG,
                        _randomize_bert, cell_inputs, fluency, kl, log_softmax, np_bert_hidden, sample_logits)
from test_steps import world as base_world  # noqa: F401  (the module fixture, by its name below)

C = 1 + 2 * K  # O, then B-/I- of each of the K types
WEIGHTS = LossConfig(spec=0.7, div=0.3, adv=0.2, flu=1.3)


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def np_bert_tokens(w, cfg, embeds):
    """(tag logits [L, C], mean of the last hidden states [H]) of one unpadded row of input embeddings."""
    x = np_bert_hidden(w, cfg, embeds)
    return x @ w["classifier.weight"].T + w["classifier.bias"], x.mean(0)


@pytest.fixture(scope="module")
def world(base_world):
    """test_steps' world with token teacher and student (C tags) and their bridged tables."""
    rng = np.random.default_rng(7)
    w = dict(base_world)
    w["teacher_cfg"] = BertConfig(**{**TEACHER_CFG, "num_labels": C})
    w["student_cfg"] = BertConfig(**{**STUDENT_CFG, "num_labels": C})
    w["teacher_state"] = _randomize_bert(BertForTokenClassification(w["teacher_cfg"]), rng)
    w["student_state"] = _randomize_bert(BertForTokenClassification(w["student_cfg"]), rng)
    w["teacher"] = {n: a.astype(np.float64) for n, a in w["teacher_state"].items()}
    w["student"] = {n: a.astype(np.float64) for n, a in w["student_state"].items()}
    E_t, E_s = w["teacher"]["bert.embeddings.word_embeddings.weight"], w["student"]["bert.embeddings.word_embeddings.weight"]
    bridge = np.zeros((GEN_CFG["vocab_size"], E_t.shape[0]))  # as test_steps': 1-3 word-pieces of weight 1/n
    for g in range(4, bridge.shape[0]):
        pieces = rng.choice(np.arange(4, E_t.shape[0]), size=rng.integers(1, 4), replace=False)
        bridge[g, pieces] = 1.0 / len(pieces)
    w["hat_t"], w["hat_s"] = bridge @ E_t, bridge @ E_s
    w["cls_t"], w["sep_t"], w["cls_s"], w["sep_s"] = E_t[CLS_ID], E_t[SEP_ID], E_s[CLS_ID], E_s[SEP_ID]
    return w


def reference(w, weights):
    gl = sample_logits(w["gen64"], w["gen_cfg"], w["batch"])
    z, y = w["batch"]["gen_ids"], np.array(LABELS)
    specs, feats, advs, zts = [], [], [], []
    for b in range(B):
        L = GEN_LENS[b]
        zt, ht = np_bert_tokens(w["teacher"], w["teacher_cfg"],
                                np.concatenate([w["cls_t"][None], w["hat_t"][z[b, :L]], w["sep_t"][None]]))
        zs, _ = np_bert_tokens(w["student"], w["student_cfg"],
                               np.concatenate([w["cls_s"][None], w["hat_s"][z[b, :L]], w["sep_s"][None]]))
        feats.append(ht)
        zts.append(zt)
        if L:
            specs.append(-max(log_softmax(zt[l])[1 + 2 * y[b]] for l in range(1, L + 1)))
            advs += [-KD_T ** 2 * kl(zt[l] / KD_T, zs[l] / KD_T) for l in range(1, L + 1)]
    f = np.array(feats) / np.linalg.norm(feats, axis=-1, keepdims=True)
    pairs = [(i, j) for i in range(B) for j in range(B) if i != j and y[i] == y[j]]
    ref = {"spec": np.mean(specs), "div": sum(f[i] @ f[j] for i, j in pairs) / len(pairs), "adv": np.mean(advs),
           "flu": fluency(gl, w["frozen_logits"].astype(np.float64))}
    ref["total"] = sum(getattr(weights, k) * ref[k] for k in ("spec", "div", "adv", "flu"))
    return ref, zts


def test_token_generator_loss_matches_float64_reference(world):
    gen = LlamaForCausalLM(LlamaConfig(**GEN_CFG), seed=1)
    load_state(gen, world["gen_state"])
    set_trainable(gen, "all")
    teacher, student = BertForTokenClassification(world["teacher_cfg"]), BertForTokenClassification(world["student_cfg"])
    for model, state in ((teacher, world["teacher_state"]), (student, world["student_state"])):
        load_state(model, state)
        model.set_train(False)
        for p in model.get_parameters():
            p.requires_grad = False
    cell = TokenGeneratorLoss(gen, teacher, student, P, T, K, WEIGHTS, KD_T, TAU)
    out = cell(*cell_inputs(world))
    got = dict(zip(("total", "spec", "div", "adv", "flu"), (float(o.asnumpy()) for o in out[:5])))
    ref, zts = reference(world, WEIGHTS)
    for k in ("spec", "div", "adv", "flu", "total"):
        assert abs(ref[k]) > 1e-2, (k, ref[k])  # no vacuous term
        assert abs(got[k] - ref[k]) <= 1e-5 * abs(ref[k]) + 2e-6 * KD_T ** 2, (k, got[k], ref[k])
    # the logits the step reports: the teacher's at the generator tokens, zero at [CLS], [SEP] and padding
    rep = out[5].asnumpy()
    assert rep.shape == (B, T + 2, C)
    for b in range(B):
        L = GEN_LENS[b]
        np.testing.assert_allclose(rep[b, 1:L + 1], zts[b][1:L + 1], atol=3e-5 * np.abs(zts[b]).max())
        assert not rep[b, 0].any() and not rep[b, L + 1:].any()


def test_aligned_targets_by_hand():
    """Teacher logits [B=3, Lt=5, C=2] onto the student's input of Ls=6: real pieces 4, 1 and 0 (mask sums
    6, 3, 2); the teacher's array holds Lt - 2 = 3 pieces; row 1's teacher count 0 is given explicitly."""
    t = np.arange(3 * 5 * 2, dtype=np.float32).reshape(3, 5, 2) + 1
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]], np.int32)
    targets, m = aligned_targets(mask, t)
    assert targets.shape == (3, 6, 2) and m.shape == (3, 6)
    np.testing.assert_array_equal(targets[:, :5], t)
    assert not targets[:, 5].any()
    np.testing.assert_array_equal(m, [[0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    _, m = aligned_targets(mask, t, teacher_counts=np.array([2, 0, 3]))
    np.testing.assert_array_equal(m, [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
