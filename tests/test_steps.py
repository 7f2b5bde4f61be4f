"""GeneratorLoss (ms_dfkd/steps.py), the core DFKD-T3 step, against a float64 numpy implementation
written here from docs/METHOD.md, on tiny random models (no torch needed).

The reference computes everything itself: the generator's logits by a numpy Llama over each row's
unpadded [prompt; kept sample] (so the P-1 offset of the padded layout is checked, not copied), the
straight-through soft embeddings as row gathers of B_vocab . E at the sampled ids, the encoder inputs
[CLS] e_1 .. e_L [SEP] of each row, a numpy BERT for teacher and student, the four losses (and the
optional reward-weighted likelihood) and their weights. The gradient is checked by central differences
of the straight-through surrogate
    F(theta) = w_flu L_flu(theta) + w_rwl L_rwl(theta) + L_enc(E_hat[z] + (y(theta) - y(theta_0)) E_hat),
whose value at theta_0 is the step's loss and whose gradient there is the step's gradient.
Also: soft_sequence_layout and place_soft_tokens against hand-built arrays, and a float16 step
against the float32 one.
"""
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

from kernels.gumbel_noise import derive_seed, gumbel_np
from ms_dfkd.config import LossConfig
from ms_dfkd.models.bert import BertConfig, BertForSequenceClassification
from ms_dfkd.models.checkpoint_io import load_state, state_of
from ms_dfkd.models.llama import LlamaConfig, LlamaForCausalLM, set_trainable
from ms_dfkd.steps import GeneratorLoss, loss_scaler_for, make_train_step, place_soft_tokens, soft_sequence_layout

VG, VT = 96, 80                      # generator and encoder vocabularies
B, P, T, K = 6, 10, 7, 3
PROMPT_LENS = [10, 7, 4, 10, 9, 6]   # left-padded prompts
GEN_LENS = [7, 3, 0, 5, 7, 1]        # kept sample tokens per row: full rows, early stops, one stop at once
LABELS = [0, 1, 2, 0, 1, 2]          # two texts per label: every label has one same-label pair
CLS_ID, SEP_ID, EOS_ID = 1, 2, 3     # encoder [CLS]/[SEP]; generator end of sequence
KD_T, TAU = 2.0, 0.7
WEIGHTS = LossConfig(spec=0.7, div=0.3, adv=0.2, flu=1.3)
WITH_RWL = LossConfig(spec=0.7, div=0.3, adv=0.2, flu=1.3, rwl=0.9)  # the optional reward-weighted likelihood
SEED = derive_seed(0, 0, 5, 1)

GEN_CFG = dict(vocab_size=VG, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, eos_token_id=EOS_ID,
               pad_token_id=0)
TEACHER_CFG = dict(vocab_size=VT, hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                   max_position_embeddings=16, num_labels=K)
STUDENT_CFG = dict(vocab_size=VT, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                   max_position_embeddings=16, num_labels=K, pooling="mean", add_pooler=False)


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


# ------------------------------------------------------------------ the float64 numpy reference

def np_llama_logits(w, cfg, ids):
    """Logits [L, V] of one unpadded sequence (Hugging Face Llama: RMSNorm, rotate-half RoPE, GQA, SwiGLU)."""
    x = w["model.embed_tokens.weight"][ids]
    L, D = x.shape[0], cfg.head_dim
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    angle = np.arange(L)[:, None] / cfg.rope_theta ** (np.arange(0, D, 2) / D)[None, :]
    cos, sin = np.cos(angle), np.sin(angle)

    def rope(v):
        a, b = v[:, :D // 2], v[:, D // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], 1)

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.rms_norm_eps) * g

    causal = np.tril(np.ones((L, L), bool))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        heads = []
        for hd in range(cfg.num_attention_heads):
            kv = hd // group
            s = rope(q[:, hd * D:(hd + 1) * D]) @ rope(k[:, kv * D:(kv + 1) * D]).T / np.sqrt(D)
            s = np.where(causal, s, -np.inf)
            e = np.exp(s - s.max(1, keepdims=True))
            heads.append((e / e.sum(1, keepdims=True)) @ v[:, kv * D:(kv + 1) * D])
        x = x + np.concatenate(heads, 1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T


_erf = np.vectorize(math.erf)


def np_bert(w, cfg, embeds):
    """(logits [K], pooled features [H]) of one unpadded row of input embeddings [L, H] (post-LN BERT)."""
    x = np_bert_hidden(w, cfg, embeds)
    pooled = (np.tanh(x[0] @ w["bert.pooler.dense.weight"].T + w["bert.pooler.dense.bias"])
              if cfg.pooling == "cls_pooler" else x.mean(0))
    return pooled @ w["classifier.weight"].T + w["classifier.bias"], pooled


def np_bert_hidden(w, cfg, embeds):
    """The last hidden states [L, H] of one unpadded row of input embeddings [L, H] (post-LN BERT)."""
    def ln(x, n):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * w[n + ".weight"] + w[n + ".bias"]

    def lin(x, n):
        return x @ w[n + ".weight"].T + w[n + ".bias"]

    L, H, nh = embeds.shape[0], cfg.hidden_size, cfg.num_attention_heads
    dh = H // nh
    x = (embeds + w["bert.embeddings.position_embeddings.weight"][:L]
         + w["bert.embeddings.token_type_embeddings.weight"][0])
    x = ln(x, "bert.embeddings.LayerNorm")
    for i in range(cfg.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + n).reshape(L, nh, dh).transpose(1, 0, 2)
                   for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(1, 0, 2).reshape(L, H)
        x = ln(lin(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        f = lin(x, p + "intermediate.dense")
        f = 0.5 * f * (1.0 + _erf(f / np.sqrt(2.0)))
        x = ln(lin(f, p + "output.dense") + x, p + "output.LayerNorm")
    return x


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl(a, b):
    """KL(softmax(a) || softmax(b)) per row."""
    la, lb = log_softmax(a), log_softmax(b)
    return (np.exp(la) * (la - lb)).sum(-1)


def sample_logits(w, cfg, batch):
    """{(b, t): generator logits [V] predicting sample token t} for the kept tokens t < L_b, each from a
    forward over the row's unpadded [prompt; kept sample]: the logit of token t sits at n_prompt - 1 + t."""
    out = {}
    for b in range(B):
        prompt = batch["p_ids"][b][batch["p_mask"][b] == 1]
        L = GEN_LENS[b]
        if L == 0:
            continue
        lo = np_llama_logits(w, cfg, np.concatenate([prompt, batch["gen_ids"][b, :L]]))
        for t in range(L):
            out[b, t] = lo[len(prompt) - 1 + t]
    return out


def encoder_terms(world, e_t, e_s, weights):
    """The three encoder terms on per-row soft embeddings {b: [L_b, H]}, as METHOD.md defines them."""
    zt, ht, zs = [], [], []
    for b in range(B):
        x_t = np.concatenate([world["cls_t"][None], e_t[b], world["sep_t"][None]])
        lo, feat = np_bert(world["teacher"], world["teacher_cfg"], x_t)
        zt.append(lo)
        ht.append(feat)
        if weights.adv:
            x_s = np.concatenate([world["cls_s"][None], e_s[b], world["sep_s"][None]])
            zs.append(np_bert(world["student"], world["student_cfg"], x_s)[0])
    zt, ht, y = np.array(zt), np.array(ht), np.array(LABELS)
    spec = -log_softmax(zt)[np.arange(B), y].mean()
    f = ht / np.linalg.norm(ht, axis=-1, keepdims=True)
    pairs = [(i, j) for i in range(B) for j in range(B) if i != j and y[i] == y[j]]
    div = sum(f[i] @ f[j] for i, j in pairs) / len(pairs)
    adv = -KD_T ** 2 * kl(zt / KD_T, np.array(zs) / KD_T).mean() if weights.adv else 0.0
    return spec, div, adv, zt


def fluency(gl, frozen):
    """Mean over the kept tokens of KL(G_theta || G_theta0): the stop token and what follows are left out."""
    keys = sorted(gl)
    return float(np.mean([kl(gl[k], frozen[k[0] * T + k[1]]) for k in keys]))


def reward_weights(zt):
    """w_b = max(p_T(y_b | z_b) - the mean of p_T(y | z) over the batch's samples asked for label y_b, 0)."""
    y = np.array(LABELS)
    p = np.exp(log_softmax(zt))[np.arange(B), y]
    mean = {k: p[y == k].mean() for k in set(LABELS)}
    return np.maximum(p - np.array([mean[k] for k in y]), 0.0)


def reward_weighted_nll(gl, ids, w):
    """-sum_b w_b mean_{t < L_b} log p_theta(z_bt) / B; a row with no kept token adds nothing."""
    total = 0.0
    for b in range(B):
        lps = [log_softmax(gl[b, t])[z_bt] for t, z_bt in enumerate(ids[b, :GEN_LENS[b]])]
        total += w[b] * (np.mean(lps) if lps else 0.0)
    return -total / B


def reference_loss(world, weights, gen_state=None):
    """The step's forward value and its terms (hard straight-through: e_t = E_hat[z_t])."""
    gl = sample_logits(world["gen64"] if gen_state is None else gen_state, world["gen_cfg"], world["batch"])
    z = world["batch"]["gen_ids"]
    e_t = {b: world["hat_t"][z[b, :GEN_LENS[b]]] for b in range(B)}
    e_s = {b: world["hat_s"][z[b, :GEN_LENS[b]]] for b in range(B)}
    spec, div, adv, zt = encoder_terms(world, e_t, e_s, weights)
    flu = fluency(gl, world["frozen_logits"].astype(np.float64))
    rwl = reward_weighted_nll(gl, z, reward_weights(zt)) if weights.rwl else 0.0
    total = weights.spec * spec + weights.div * div + weights.adv * adv + weights.flu * flu + weights.rwl * rwl
    return {"total": total, "spec": spec, "div": div, "adv": adv, "flu": flu, "rwl": rwl}, zt


def surrogate(world, weights, gen_state, w0=None):
    """F(theta): the straight-through surrogate whose gradient at theta_0 is the step's gradient (the
    reward weights w0 of the reward-weighted likelihood are taken at theta_0: they carry no gradient)."""
    gl = sample_logits(gen_state, world["gen_cfg"], world["batch"])
    z = world["batch"]["gen_ids"]
    e_t, e_s = {}, {}
    for b in range(B):
        rows_t, rows_s = [], []
        for t in range(GEN_LENS[b]):
            y = np.exp(log_softmax((gl[b, t] + world["noise"][b * T + t]) / TAU))
            dy = y - world["y0"][b, t]
            rows_t.append(world["hat_t"][z[b, t]] + dy @ world["hat_t"])
            rows_s.append(world["hat_s"][z[b, t]] + dy @ world["hat_s"])
        e_t[b] = np.array(rows_t).reshape(-1, world["hat_t"].shape[1])
        e_s[b] = np.array(rows_s).reshape(-1, world["hat_s"].shape[1])
    spec, div, adv, _ = encoder_terms(world, e_t, e_s, weights)
    rwl = reward_weighted_nll(gl, z, w0) if weights.rwl else 0.0
    return (weights.spec * spec + weights.div * div + weights.adv * adv
            + weights.flu * fluency(gl, world["frozen_logits"].astype(np.float64)) + weights.rwl * rwl)


# ------------------------------------------------------------------ the tiny world, built once

def _randomize_bert(model, rng):
    state = {}
    for name, p in model.parameters_and_names():
        shape = tuple(p.shape)
        if name.endswith("LayerNorm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("word_embeddings.weight"):
            a = 0.5 * rng.standard_normal(shape)
        elif name.endswith(".bias") or "LayerNorm" in name:
            a = 0.1 * rng.standard_normal(shape)
        else:
            a = 0.3 * rng.standard_normal(shape)
        state[name] = a.astype(np.float32)
    return state


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    gen_cfg = LlamaConfig(**GEN_CFG)
    gen = LlamaForCausalLM(gen_cfg, seed=1)
    gen_state = state_of(gen)
    for name in gen_state:
        if name.endswith("norm.weight"):  # norms start at one: make them matter
            gen_state[name] = (1.0 + 0.2 * rng.standard_normal(gen_state[name].shape)).astype(np.float32)
    frozen_state = {n: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in gen_state.items()}
    teacher_cfg, student_cfg = BertConfig(**TEACHER_CFG), BertConfig(**STUDENT_CFG)
    teacher_state = _randomize_bert(BertForSequenceClassification(teacher_cfg), rng)
    student_state = _randomize_bert(BertForSequenceClassification(student_cfg), rng)

    # a vocabulary bridge: special tokens map to nothing, other tokens to 1-3 word-pieces of weight 1/n
    bridge = np.zeros((VG, VT))
    for g in range(4, VG):
        pieces = rng.choice(np.arange(4, VT), size=rng.integers(1, 4), replace=False)
        bridge[g, pieces] = 1.0 / len(pieces)
    E_t = teacher_state["bert.embeddings.word_embeddings.weight"].astype(np.float64)
    E_s = student_state["bert.embeddings.word_embeddings.weight"].astype(np.float64)

    p_ids, p_mask = np.zeros((B, P), np.int32), np.zeros((B, P), np.int32)
    for b, n in enumerate(PROMPT_LENS):
        p_ids[b, P - n:] = rng.integers(4, VG, n)
        p_mask[b, P - n:] = 1
    gen_ids = rng.integers(4, VG, (B, T)).astype(np.int32)
    gen_mask = np.zeros((B, T), np.int32)
    for b, L in enumerate(GEN_LENS):
        gen_mask[b, :L] = 1
        if L < T:
            gen_ids[b, L] = EOS_ID  # the stop token, then tokens that must not count
    batch = dict(p_ids=p_ids, p_mask=p_mask, gen_ids=gen_ids, gen_mask=gen_mask)

    w = {
        "gen_cfg": gen_cfg, "teacher_cfg": teacher_cfg, "student_cfg": student_cfg, "batch": batch,
        "gen_state": gen_state, "teacher_state": teacher_state, "student_state": student_state,
        "gen64": {n: a.astype(np.float64) for n, a in gen_state.items()},
        "teacher": {n: a.astype(np.float64) for n, a in teacher_state.items()},
        "student": {n: a.astype(np.float64) for n, a in student_state.items()},
        "hat_t": bridge @ E_t, "hat_s": bridge @ E_s,
        "cls_t": E_t[CLS_ID], "sep_t": E_t[SEP_ID], "cls_s": E_s[CLS_ID], "sep_s": E_s[SEP_ID],
        "noise": gumbel_np(SEED, np.arange(B * T), np.arange(VG)).astype(np.float64),
    }
    # G_theta0's logits: from the perturbed copy at the kept positions, and junk where m_t = 0
    frozen = rng.normal(0.0, 3.0, (B * T, VG))
    for (b, t), lo in sample_logits({n: a.astype(np.float64) for n, a in frozen_state.items()}, gen_cfg,
                                    batch).items():
        frozen[b * T + t] = lo
    w["frozen_logits"] = frozen.astype(np.float32)
    gl0 = sample_logits(w["gen64"], gen_cfg, batch)
    w["y0"] = {k: np.exp(log_softmax((v + w["noise"][k[0] * T + k[1]]) / TAU)) for k, v in gl0.items()}
    return w


def build_cell(world, weights, dtype="float32", trunk_layers=0):
    gen = LlamaForCausalLM(LlamaConfig(**GEN_CFG, compute_dtype=dtype), seed=1)
    load_state(gen, world["gen_state"])
    if trunk_layers:
        set_trainable(gen, "top_k", trunk_layers)
    else:
        set_trainable(gen, "all")
    teacher = BertForSequenceClassification(BertConfig(**TEACHER_CFG, compute_dtype=dtype))
    student = BertForSequenceClassification(BertConfig(**STUDENT_CFG, compute_dtype=dtype))
    for model, state in ((teacher, world["teacher_state"]), (student, world["student_state"])):
        load_state(model, state)
        model.set_train(False)
        for p in model.get_parameters():
            p.requires_grad = False
    cell = GeneratorLoss(gen, teacher, student, P, T, K, weights, KD_T, TAU, trunk_layers)
    return cell, gen


def cell_inputs(world):
    bt = world["batch"]
    f32 = lambda a: ms.Tensor(np.asarray(a, np.float32))
    sel = soft_sequence_layout(bt["gen_mask"])
    return (ms.Tensor(np.concatenate([bt["p_ids"], bt["gen_ids"]], 1)),
            ms.Tensor(np.concatenate([bt["p_mask"], bt["gen_mask"]], 1)),
            ms.Tensor(bt["gen_ids"]), ms.Tensor(bt["gen_mask"]), f32(world["frozen_logits"]),
            ms.Tensor(np.array(LABELS, np.int32)), ms.Tensor(np.int64(SEED)),
            f32(world["hat_t"]), f32(world["hat_s"]), f32(world["cls_t"]), f32(world["sep_t"]),
            f32(world["cls_s"]), f32(world["sep_s"]), *[ms.Tensor(a) for a in sel])


TERMS = ("total", "spec", "div", "adv", "flu")


# ------------------------------------------------------------------ layout units

def test_soft_sequence_layout_by_hand():
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], np.int32)
    cls, tok, sep, att = soft_sequence_layout(mask)
    for a in (cls, tok, sep):
        assert a.shape == (3, 5, 1) and a.dtype == np.float32
    assert att.shape == (3, 5) and att.dtype == np.int32
    np.testing.assert_array_equal(cls[..., 0], [[1, 0, 0, 0, 0]] * 3)
    np.testing.assert_array_equal(tok[..., 0], [[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(sep[..., 0], [[0, 0, 0, 0, 1], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(att, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])


def test_place_soft_tokens_by_hand():
    e = np.arange(1, 3 * 3 * 2 + 1, dtype=np.float32).reshape(3, 3, 2)  # [B=3, T=3, H=2], no zeros
    cls, sep = np.array([100.0, 101.0], np.float32), np.array([-7.0, -8.0], np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]], np.int32)
    sel = soft_sequence_layout(mask)[:3]
    out = place_soft_tokens(ms.Tensor(e), ms.Tensor(cls), ms.Tensor(sep), *[ms.Tensor(s) for s in sel]).asnumpy()
    expected = np.zeros((3, 5, 2), np.float32)
    expected[0] = [cls, e[0, 0], e[0, 1], e[0, 2], sep]
    expected[1, :3] = [cls, e[1, 0], sep]   # the masked e[1, 1:] never enter
    expected[2, :2] = [cls, sep]
    np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------------ the loss against the reference

@pytest.mark.parametrize("weights", [WEIGHTS, LossConfig(spec=1.0, div=0.5, adv=0.0, flu=0.5), WITH_RWL],
                         ids=["four_terms", "no_student", "with_rwl"])
def test_generator_loss_matches_float64_reference(world, weights):
    cell, _ = build_cell(world, weights)
    out = cell(*cell_inputs(world))
    got = dict(zip(TERMS, (float(o.asnumpy()) for o in out[:5])))
    got["rwl"] = float(out[6].asnumpy())
    ref, zt = reference_loss(world, weights)
    if weights.rwl:
        assert abs(ref["rwl"]) > 1e-3, ref["rwl"]
        # its weights are differences of teacher probabilities (p - the label's mean), which turn the
        # float32 teacher logits' 1e-5 relative error into 1e-4 of a small weight: end to end within 1e-4,
        # and within 1e-5 given the cell's own teacher logits
        assert abs(got["rwl"] - ref["rwl"]) <= 1e-4 * abs(ref["rwl"]), (got["rwl"], ref["rwl"])
        gl = sample_logits(world["gen64"], world["gen_cfg"], world["batch"])
        same_w = reward_weighted_nll(gl, world["batch"]["gen_ids"],
                                     reward_weights(out[5].asnumpy().astype(np.float64)))
        assert abs(got["rwl"] - same_w) <= 1e-5 * abs(same_w), (got["rwl"], same_w)
    else:
        assert got["rwl"] == 0.0
    # 1e-5 relative, and an absolute floor for the KL terms: kd_loss's composite is good to ~1e-6 per row
    # before its tau^2 (MindSpore's CPU LogSoftmax; test_kernels_composite bounds it at 2e-6), which for L_adv
    # at tau_kd = 2 is measured at 3e-6 of its 5e-6 error here (1.7e-5 relative)
    floor = {"adv": 2e-6 * KD_T ** 2,
             "total": 1e-6 + weights.adv * 2e-6 * KD_T ** 2 + weights.rwl * 1e-4 * abs(ref["rwl"])}
    for k in TERMS:
        assert abs(got[k] - ref[k]) <= 1e-5 * abs(ref[k]) + floor.get(k, 1e-6), (k, got[k], ref[k])
        if k != "adv" or weights.adv:
            assert abs(ref[k]) > 1e-2, (k, ref[k])  # no vacuous term
    if not weights.adv:
        assert got["adv"] == 0.0  # the student does not run
    np.testing.assert_allclose(out[5].asnumpy(), zt, rtol=0, atol=3e-5 * np.abs(zt).max())
    # hard straight-through: the forward value is a row gather, whatever the noise
    inputs = list(cell_inputs(world))
    inputs[6] = ms.Tensor(np.int64(SEED + 1))
    np.testing.assert_allclose(float(cell(*inputs)[0].asnumpy()), got["total"], rtol=1e-6)


def test_trunk_path_equals_the_full_forward(world):
    """generator.trainable top_k: the step reads the states entering the top k layers (computed once by
    trunk_states) and runs only those layers; every term and the trained parameters' gradients are the
    full forward's (whose gradient the finite differences check)."""
    full_cell, full_gen = build_cell(world, WEIGHTS)
    cell, gen = build_cell(world, WEIGHTS, trunk_layers=1)
    params = gen.trainable_params()
    names = {id(p): n for n, p in gen.parameters_and_names()}
    trained = [names[id(p)] for p in params]
    assert sorted(trained) == sorted(n for n in world["gen_state"]
                                     if n.startswith("model.layers.1.") or n == "model.norm.weight")
    inputs = list(cell_inputs(world))
    full_out, full_grads = ms.value_and_grad(full_cell, None, full_gen.trainable_params(), has_aux=True)(*inputs)
    full_grads = dict(zip([n for n, _ in full_gen.parameters_and_names()], full_grads))
    inputs[0] = gen.trunk_states(inputs[0], inputs[1], 1)
    assert inputs[0].shape == (B, P + T, GEN_CFG["hidden_size"])
    out, grads = ms.value_and_grad(cell, None, params, has_aux=True)(*inputs)
    for a, b, name in zip(full_out, out, TERMS + ("teacher_logits",)):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    for name, g in zip(trained, grads):
        ref = full_grads[name].asnumpy()
        assert np.abs(ref).max() > 0, name
        np.testing.assert_allclose(g.asnumpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=name)


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE], ids=["pynative", "graph"])
def test_the_samplers_logits_stand_in_for_the_lm_head(world, mode):
    """sampled_logits: given the LM head's own logits of the batch, every term and the trained parameters'
    gradients are the step's without them; the given values are what the terms read (other logits, other
    terms), and the head's gradient reaches the top layer."""
    ms.set_context(mode=mode)
    cell, gen = build_cell(world, WEIGHTS, trunk_layers=1)
    given_cell = GeneratorLoss(gen, cell.teacher, cell.student, P, T, K, WEIGHTS, KD_T, TAU, 1, sampled_logits=True)
    inputs = list(cell_inputs(world))
    inputs[0] = gen.trunk_states(inputs[0], inputs[1], 1)
    hidden = gen.top_hidden_states(inputs[0], inputs[1], 1, rows=(P - 1, T))
    logits = gen.logits_from_hidden(hidden).asnumpy()
    params = gen.trainable_params()
    out, grads = ms.value_and_grad(cell, None, params, has_aux=True)(*inputs)
    given_out, given_grads = ms.value_and_grad(given_cell, None, params, has_aux=True)(*inputs, ms.Tensor(logits))
    for a, b, name in zip(out, given_out, TERMS + ("teacher_logits",)):
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-6, atol=1e-7, err_msg=name)
    for p, a, b in zip(params, grads, given_grads):
        assert np.abs(a.asnumpy()).max() > 0, p.name
        np.testing.assert_allclose(b.asnumpy(), a.asnumpy(), rtol=1e-5, atol=1e-6 * np.abs(a.asnumpy()).max(),
                                   err_msg=p.name)
    shifted = given_cell(*inputs, ms.Tensor(logits + np.random.default_rng(0).normal(0, 1, logits.shape)
                                            .astype(np.float32)))
    assert abs(float(shifted[4].asnumpy()) - float(out[4].asnumpy())) > 1e-4  # the fluency term reads them
    with pytest.raises(ValueError, match="trunk_layers"):
        GeneratorLoss(gen, cell.teacher, cell.student, P, T, K, WEIGHTS, KD_T, TAU, 0, sampled_logits=True)


def test_tokens_after_the_stop_do_not_count(world):
    """Other tokens after each row's stop (and other G_theta0 logits there) leave every term as it was."""
    cell, _ = build_cell(world, WEIGHTS)
    a = [o.asnumpy() for o in cell(*cell_inputs(world))]
    changed = dict(world, batch=dict(world["batch"]), frozen_logits=world["frozen_logits"].copy())
    ids = world["batch"]["gen_ids"].copy()
    tail = world["batch"]["gen_mask"] == 0
    ids[tail] = (ids[tail] + 17) % (VG - 4) + 4
    changed["batch"]["gen_ids"] = ids
    changed["frozen_logits"][tail.reshape(-1)] *= -1.0
    b = [o.asnumpy() for o in cell(*cell_inputs(changed))]
    for x, y, name in zip(a, b, TERMS + ("teacher_logits",)):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-7, err_msg=name)


def test_generator_gradient_matches_finite_differences(world):
    """Every term, the optional reward-weighted likelihood included."""
    cell, gen = build_cell(world, WITH_RWL)
    params = gen.trainable_params()
    names = {id(p): n for n, p in gen.parameters_and_names()}
    grads = ms.value_and_grad(cell, None, params, has_aux=True)(*cell_inputs(world))[1]
    base = world["gen64"]
    ref, zt = reference_loss(world, WITH_RWL)
    w0 = reward_weights(zt)
    assert (w0 > 0).sum() >= 2
    f0 = surrogate(world, WITH_RWL, base, w0)
    assert abs(f0 - ref["total"]) < 1e-10  # F(theta_0) is the loss
    rng = np.random.default_rng(1)
    eps, checked = 1e-5, 0
    for p, g in zip(params, grads):
        name, g = names[id(p)], g.asnumpy().astype(np.float64)
        big = np.flatnonzero(np.abs(g).ravel() > 0.1 * np.abs(g).max())
        for flat in {int(np.abs(g).argmax()), int(rng.choice(big))}:
            idx = np.unravel_index(flat, g.shape)
            fd = []
            for sign in (1, -1):
                w = dict(base)
                w[name] = base[name].copy()
                w[name][idx] += sign * eps
                fd.append(surrogate(world, WITH_RWL, w, w0))
            fd = (fd[0] - fd[1]) / (2 * eps)
            assert abs(fd - g[idx]) <= 1e-4 * np.abs(g).max() + 1e-4 * abs(fd), (name, idx, g[idx], fd)
            checked += 1
    assert len(params) == 2 * 9 + 2 and checked >= len(params)


def test_float16_step_close_to_float32(world):
    """The same step with every matmul in float16 (the driver's dynamic loss scaling, float32 master
    weights): the loss terms within 1e-2 relative (about ten float16 roundings; measured 8e-4) and the
    update (SGD at lr 1, so the update is the gradient) within 5e-2 of the float32 one per parameter
    tensor, in norm (measured 8e-3)."""
    terms, deltas = {}, {}
    for dtype in ("float32", "float16"):
        cell, gen = build_cell(world, WEIGHTS, dtype)
        params = gen.trainable_params()
        before = [p.asnumpy().copy() for p in params]
        scaler = loss_scaler_for(cell.teacher, cell.student, gen)  # the driver's: 2**16 for float16
        assert (scaler is None) == (dtype == "float32")
        step = make_train_step(cell, nn.SGD(params, learning_rate=1.0), jit=False, loss_scaler=scaler)
        out = step(*cell_inputs(world))
        terms[dtype] = np.array([float(o.asnumpy()) for o in out[:5]])
        deltas[dtype] = [b - p.asnumpy() for p, b in zip(params, before)]
        names = {id(p): n for n, p in gen.parameters_and_names()}
        names = [names[id(p)] for p in params]
        assert all(p.dtype == ms.float32 for p in params)
        if scaler is not None:
            assert float(scaler.scale_value.asnumpy()) == 2.0 ** 16  # the step was applied, not skipped
    rel = np.abs(terms["float16"] - terms["float32"]) / np.abs(terms["float32"])
    assert (rel < 1e-2).all(), dict(zip(TERMS, rel))
    assert rel.max() > 1e-7  # float16 really ran
    for d32, d16, name in zip(deltas["float32"], deltas["float16"], names):
        assert np.linalg.norm(d32) > 0, name
        err = np.linalg.norm(d16 - d32) / np.linalg.norm(d32)
        assert err < 5e-2, (name, err)
