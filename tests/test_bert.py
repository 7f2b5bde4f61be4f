"""BERT in MindSpore against independent references: a float64 numpy forward written
here, finite differences, onnx's own ReferenceEvaluator, and known MiniLM similarities."""
import json
import math
import shutil

import numpy as np
import pytest
import mindspore as ms
from safetensors.numpy import save_file

from ms_dfkd.models.bert import BertConfig, mean_pool
from ms_dfkd.models.bert_weights import load_hf_bert, load_hf_weights, load_onnx_bert
from ms_dfkd.models.checkpoint_io import CheckpointError, state_of
from ms_dfkd.tokenization import wordpiece_tokenizer

V, H, NL, NH, FF, P, NLAB = 50, 32, 2, 4, 64, 16, 3


# --- independent numpy reference (HF BertForSequenceClassification semantics) -------------

def _ln(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def np_bert(sd, embeds, mask, types=None):
    """Last hidden states [B, L, H] in float64. sd: HF names with the 'bert.' prefix."""
    g = lambda k: sd["bert." + k].astype(np.float64)
    B, L, _ = embeds.shape
    types = np.zeros((B, L), int) if types is None else types
    x = embeds + g("embeddings.position_embeddings.weight")[:L] + g("embeddings.token_type_embeddings.weight")[types]
    x = _ln(x, g("embeddings.LayerNorm.weight"), g("embeddings.LayerNorm.bias"))
    bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9)
    dh = H // NH
    for i in range(NL):
        p = f"encoder.layer.{i}."
        lin = lambda t, n: t @ g(p + n + ".weight").T + g(p + n + ".bias")
        split = lambda t: t.reshape(B, L, NH, dh).transpose(0, 2, 1, 3)
        q, k, v = (split(lin(x, "attention.self." + n)) for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + bias
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        ctx = (a @ v).transpose(0, 2, 1, 3).reshape(B, L, H)
        x = _ln(lin(ctx, "attention.output.dense") + x,
                g(p + "attention.output.LayerNorm.weight"), g(p + "attention.output.LayerNorm.bias"))
        f = lin(x, "intermediate.dense")
        f = 0.5 * f * (1.0 + _erf(f / np.sqrt(2.0)))
        x = _ln(lin(f, "output.dense") + x, g(p + "output.LayerNorm.weight"), g(p + "output.LayerNorm.bias"))
    return x


def np_logits(sd, embeds, mask, types=None, pooling="cls_pooler"):
    h = np_bert(sd, embeds, mask, types)
    if pooling == "mean":
        m = mask[..., None].astype(np.float64)
        pooled = (h * m).sum(1) / m.sum(1)
    else:
        pooled = np.tanh(h[:, 0] @ sd["bert.pooler.dense.weight"].T + sd["bert.pooler.dense.bias"])
    return pooled @ sd["classifier.weight"].T.astype(np.float64) + sd["classifier.bias"]


# --- a tiny random HF-format checkpoint on disk ---------------------------------------------

def _random_state(seed=0):
    r = np.random.default_rng(seed)
    mat = lambda *s: (r.standard_normal(s) * 0.3).astype(np.float32)
    sd = {"bert.embeddings.word_embeddings.weight": mat(V, H),
          "bert.embeddings.position_embeddings.weight": mat(P, H),
          "bert.embeddings.token_type_embeddings.weight": mat(2, H),
          "bert.embeddings.position_ids": np.arange(P, dtype=np.int64)[None],   # HF buffer
          "bert.pooler.dense.weight": mat(H, H), "bert.pooler.dense.bias": mat(H),
          "classifier.weight": mat(NLAB, H), "classifier.bias": mat(NLAB)}
    lns = ["embeddings.LayerNorm"]
    for i in range(NL):
        p = f"encoder.layer.{i}."
        for n, (o, k) in {"attention.self.query": (H, H), "attention.self.key": (H, H),
                          "attention.self.value": (H, H), "attention.output.dense": (H, H),
                          "intermediate.dense": (FF, H), "output.dense": (H, FF)}.items():
            sd[f"bert.{p}{n}.weight"], sd[f"bert.{p}{n}.bias"] = mat(o, k), mat(o)
        lns += [p + "attention.output.LayerNorm", p + "output.LayerNorm"]
    for n in lns:
        sd[f"bert.{n}.weight"] = (1 + r.standard_normal(H) * 0.1).astype(np.float32)
        sd[f"bert.{n}.bias"] = mat(H)
    return sd


def _hf_config(**edit):
    cfg = {"architectures": ["BertForSequenceClassification"], "model_type": "bert",
           "vocab_size": V, "hidden_size": H, "num_hidden_layers": NL, "num_attention_heads": NH,
           "intermediate_size": FF, "max_position_embeddings": P, "type_vocab_size": 2,
           "layer_norm_eps": 1e-12, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, "id2label": {str(i): f"l{i}" for i in range(NLAB)}}
    cfg.update(edit)
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_bert")
    sd = _random_state()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(_hf_config()))
    return d, sd


@pytest.fixture(scope="module")
def batch():
    r = np.random.default_rng(1)
    ids = r.integers(0, V, (2, 7)).astype(np.int32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3], np.int32)     # row 1 padded
    types = np.array([[0] * 4 + [1] * 3, [0] * 7], np.int32)
    return ids, mask, types


def test_forward_matches_numpy_pynative(tiny, batch):
    d, sd = tiny
    ids, mask, types = batch
    model = load_hf_bert(d, head="sequence", allow_fresh_head=False)
    assert model.config.num_labels == NLAB and not model.training
    emb = sd["bert.embeddings.word_embeddings.weight"].astype(np.float64)[ids]
    ref = np_logits(sd, emb, mask, types)
    out = model(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(types)).asnumpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # the soft-embedding path gives the same logits as the id path
    out_e = model(inputs_embeds=ms.Tensor(emb.astype(np.float32)), attention_mask=ms.Tensor(mask),
                  token_type_ids=ms.Tensor(types)).asnumpy()
    np.testing.assert_allclose(out_e, ref, atol=1e-4, rtol=0)
    # padded positions do not matter: change their ids
    ids2 = ids.copy()
    ids2[1, 4:] = (ids2[1, 4:] + 1) % V
    np.testing.assert_allclose(model(ms.Tensor(ids2), ms.Tensor(mask), ms.Tensor(types)).asnumpy()[1],
                               ref[1], atol=1e-4, rtol=0)
    assert tuple(model.get_input_embeddings().shape) == (V, H)


def test_padding_columns_leave_the_logits(tiny, batch):
    """The student step and the teacher's labelling pad a batch to a bucket of 16, not to max_length: extra
    masked columns must not change the logits (the numpy reference sees only the real ones)."""
    d, sd = tiny
    ids, mask, types = batch
    model = load_hf_bert(d, head="sequence", allow_fresh_head=False)
    ref = np_logits(sd, sd["bert.embeddings.word_embeddings.weight"].astype(np.float64)[ids], mask, types)
    for extra in (0, 5, P - ids.shape[1]):
        pad = lambda a: np.pad(a, ((0, 0), (0, extra)))
        out = model(ms.Tensor(pad(ids)), ms.Tensor(pad(mask)), ms.Tensor(pad(types))).asnumpy()
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0, err_msg=f"{extra} padding columns")


def test_mean_pooling_and_token_head(tiny, batch):
    d, sd = tiny
    ids, mask, _ = batch
    emb = sd["bert.embeddings.word_embeddings.weight"].astype(np.float64)[ids]
    seq = load_hf_bert(d, head="sequence", pooling="mean", allow_fresh_head=False)   # pooler dropped
    logits, feats = seq(ms.Tensor(ids), ms.Tensor(mask), return_features=True)
    np.testing.assert_allclose(logits.asnumpy(), np_logits(sd, emb, mask, pooling="mean"), atol=1e-4, rtol=0)
    h = np_bert(sd, emb, mask)
    np.testing.assert_allclose(feats.asnumpy(), (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True),
                               atol=1e-4, rtol=0)
    tok = load_hf_bert(d, head="token", allow_fresh_head=False)
    ref = h @ sd["classifier.weight"].T + sd["classifier.bias"]
    real = mask.astype(bool)  # padded positions are not computed (the module docstring); nothing reads them
    np.testing.assert_allclose(tok(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()[real], ref[real], atol=1e-4, rtol=0)


def test_graph_mode_forward_and_grad_vs_finite_differences(tiny, batch):
    d, sd = tiny
    _, mask, types = batch
    model = load_hf_bert(d, head="sequence", allow_fresh_head=False)
    r = np.random.default_rng(2)
    emb = r.standard_normal((2, 7, H))
    w = r.standard_normal((2, NLAB))

    @ms.jit
    def loss(e, m, t, wt):
        return (model(inputs_embeds=e, attention_mask=m, token_type_ids=t) * wt).sum()

    args = (ms.Tensor(mask), ms.Tensor(types), ms.Tensor(w.astype(np.float32)))
    grad = ms.jit(ms.grad(loss, grad_position=0))(ms.Tensor(emb.astype(np.float32)), *args).asnumpy()

    f = lambda e: (np_logits(sd, e, mask, types) * w).sum()
    assert abs(float(loss(ms.Tensor(emb.astype(np.float32)), *args)) - f(emb)) < 1e-4
    eps, fd = 1e-5, np.zeros_like(emb)
    for idx in np.ndindex(emb.shape):
        ep, em = emb.copy(), emb.copy()
        ep[idx] += eps
        em[idx] -= eps
        fd[idx] = (f(ep) - f(em)) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=2e-4, rtol=1e-3)
    assert np.abs(grad[1, 4:]).max() < 1e-6          # padded inputs cannot reach the logits
    assert np.abs(fd).max() > 1e-2                   # the check is not vacuous

    ms.set_context(mode=ms.GRAPH_MODE)              # the Cell compiled as a whole
    try:
        out = model(inputs_embeds=ms.Tensor(emb.astype(np.float32)), attention_mask=args[0],
                    token_type_ids=args[1]).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(out, np_logits(sd, emb, mask, types), atol=1e-4, rtol=0)


def test_mixed_precision_close_to_float32(tiny, batch):
    d, sd = tiny
    ids, mask, types = batch
    model = load_hf_bert(d, head="sequence", allow_fresh_head=False, compute_dtype="float16")
    emb = sd["bert.embeddings.word_embeddings.weight"].astype(np.float64)[ids]
    out = model(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(types))
    assert out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), np_logits(sd, emb, mask, types), atol=3e-2, rtol=0)


def test_save_bert_round_trip(tmp_path, tiny, batch):
    from ms_dfkd.models.bert_weights import save_bert
    d, _ = tiny
    ids, mask, _ = batch
    model = load_hf_bert(d, head="sequence", pooling="mean", allow_fresh_head=False)
    save_bert(model, tmp_path / "saved")
    again = load_hf_bert(tmp_path / "saved", head="sequence", allow_fresh_head=False)
    assert again.config.pooling == "mean" and again.config.num_labels == NLAB
    np.testing.assert_array_equal(again(ms.Tensor(ids), ms.Tensor(mask)).asnumpy(),
                                  model(ms.Tensor(ids), ms.Tensor(mask)).asnumpy())


# --- bad inputs --------------------------------------------------------------------------

def test_missing_files(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_hf_bert(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps(_hf_config()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_bert(tmp_path)
    with pytest.raises(FileNotFoundError, match="none.onnx"):
        load_onnx_bert(tmp_path / "none.onnx")
    with pytest.raises(FileNotFoundError, match="vocab"):
        wordpiece_tokenizer(tmp_path / "vocab.txt")


def test_truncated_safetensors(tmp_path, tiny):
    d, _ = tiny
    shutil.copy(d / "config.json", tmp_path / "config.json")
    data = (d / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_bert(tmp_path)


@pytest.mark.parametrize("edit", [{"hidden_size": 16}, {"intermediate_size": 48}, {"num_hidden_layers": 3}])
def test_config_weight_mismatch_loads_nothing(tmp_path, tiny, edit):
    d, _ = tiny
    shutil.copy(d / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(_hf_config(**edit)))
    with pytest.raises(CheckpointError) as err:
        load_hf_bert(tmp_path, allow_fresh_head=False)
    msg = str(err.value)
    if "hidden_size" in edit:
        assert "bert.embeddings.word_embeddings.weight: checkpoint (50, 32) vs model (50, 16)" in msg
    if "intermediate_size" in edit:   # only the FFN mismatches; the rest would fit but must not load
        assert "intermediate.dense.weight: checkpoint (64, 32) vs model (48, 32)" in msg
    if "num_hidden_layers" in edit:
        assert "missing keys" in msg and "bert.encoder.layer.2." in msg
    # an existing model given the bad checkpoint keeps every parameter
    from ms_dfkd.models.bert import BertForSequenceClassification
    model = BertForSequenceClassification(BertConfig.from_hf_json(tmp_path / "config.json"))
    before = state_of(model)
    with pytest.raises(CheckpointError):
        load_hf_weights(model, tmp_path / "model.safetensors", allow_fresh_head=False)
    after = state_of(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_unknown_key_is_an_error(tmp_path, tiny):
    d, sd = tiny
    bad = dict(sd, **{"bert.encoder.layer.0.extra.weight": np.zeros(3, np.float32)})
    save_file(bad, str(tmp_path / "model.safetensors"))
    shutil.copy(d / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="unexpected keys.*extra"):
        load_hf_bert(tmp_path)


# --- tokenizer ---------------------------------------------------------------------------

@pytest.mark.real
@pytest.mark.parametrize("name", ["vocab.txt", "tokenizer.json"])
def test_wordpiece(name):
    from ms_dfkd.assets import asset_path
    tok = wordpiece_tokenizer(asset_path("minilm_l6_dir") / name)
    assert tok.encode("hello world") == [101, 7592, 2088, 102]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (0, 101, 102, 100, 30522)
    ids, mask = tok.encode_batch(["hello world", "a b c d e f g h", "hi"], max_length=6)
    assert ids.shape == (3, 6)                 # tokenizer.json's own fixed padding (128) is off
    assert ids[0].tolist() == [101, 7592, 2088, 102, 0, 0] and mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert ids[1, 0] == 101 and ids[1, -1] == 102 and mask[1].all()   # truncated, [SEP] kept
    assert tok.decode(tok.encode("Hello, World!")) == "hello, world!"


# --- real weights --------------------------------------------------------------------------

SENTS = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


@pytest.mark.real
def test_minilm_l6_similarities():
    from ms_dfkd.assets import asset_path
    d = asset_path("minilm_l6_dir")
    tok = wordpiece_tokenizer(d / "vocab.txt")
    model = load_hf_bert(d, head="model")      # pooler and every encoder weight, strictly
    ids, mask = tok.encode_batch(SENTS)
    h, pooled = model(ms.Tensor(ids), ms.Tensor(mask))
    assert pooled.shape == (3, 384)
    e = mean_pool(h, ms.Tensor(mask)).asnumpy()
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    assert abs(e[0] @ e[1] - 0.755) < 0.01
    assert abs(e[0] @ e[2] + 0.10) < 0.05
    clf = load_hf_bert(d, head="sequence", num_labels=2)     # only the head is fresh
    assert clf(ms.Tensor(ids), ms.Tensor(mask)).shape == (3, 2)


@pytest.mark.real
def test_onnx_l3_matches_onnx_reference_evaluator():
    import onnx
    from onnx.reference import ReferenceEvaluator
    from ms_dfkd.assets import asset_path
    path = asset_path("minilm_l3_onnx")
    tok = wordpiece_tokenizer(asset_path("minilm_l6_dir") / "vocab.txt")
    ids, mask = tok.encode_batch(SENTS)
    # graph outputs: "onnx::Shape_422" = last hidden states, "461" = masked mean pooling
    h_ref, pooled_ref = ReferenceEvaluator(onnx.load(str(path))).run(
        ["onnx::Shape_422", "461"], {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)})
    clf = load_onnx_bert(path, head="sequence", num_labels=2)
    cfg = clf.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.pooling) == (3, 384, 12, "mean")
    h, _ = clf.bert(ms.Tensor(ids), ms.Tensor(mask))
    valid = mask[..., None].astype(bool)
    np.testing.assert_allclose(np.where(valid, h.asnumpy(), 0), np.where(valid, h_ref, 0), atol=1e-4, rtol=0)
    logits, feats = clf(ms.Tensor(ids), ms.Tensor(mask), return_features=True)
    np.testing.assert_allclose(feats.asnumpy(), pooled_ref, atol=1e-4, rtol=0)
    assert logits.shape == (3, 2)
