"""Qwen2-family generator (llama.py with qkv_bias, an untied head, rope base 1e6): a numpy reference
forward, KV-cache decoding, GGUF loading of a tiny qwen2 file, and the real Qwen2.5-Coder-0.5B-Instruct
(mark `real`; skipped, naming the install command, when the opt-in asset is not installed)."""
import dataclasses
import time
from types import SimpleNamespace

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from ms_dfkd.models.checkpoint_io import CheckpointError, state_of
from ms_dfkd.models.llama import LlamaConfig, LlamaForCausalLM, set_trainable
from ms_dfkd.models.llama_sampling import sample

TINY_QWEN2 = dict(vocab_size=80, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                  max_position_embeddings=256, tie_word_embeddings=False, qkv_bias=True,
                  initializer_range=0.2, bos_token_id=70, eos_token_id=72, pad_token_id=70)


@pytest.fixture(scope="module")
def tiny():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = LlamaConfig(**TINY_QWEN2)
    model = LlamaForCausalLM(cfg, seed=5)
    return cfg, model, {k: v.astype(np.float64) for k, v in state_of(model).items()}


def np_qwen2_forward(w, cfg, ids):
    """HF modeling_qwen2 written out per head in float64, one unpadded sequence: logits [L, V]."""
    x = w["model.embed_tokens.weight"][ids]
    L, D = x.shape[0], cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    angle = np.arange(L)[:, None] * cfg.rope_theta ** (-np.arange(0, D, 2) / D)[None, :]
    cos, sin = np.cos(angle), np.sin(angle)

    def rope(v):  # "rotate half": pairs (i, i + D/2)
        a, b = v[:, :D // 2], v[:, D // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], 1)

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.rms_norm_eps) * g

    causal = np.tril(np.ones((L, L), bool))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[p + f"self_attn.{n}_proj.weight"].T + w[p + f"self_attn.{n}_proj.bias"] for n in "qkv")
        heads = []
        for hd in range(cfg.num_attention_heads):
            kv = hd // group
            s = rope(q[:, hd * D:(hd + 1) * D]) @ rope(k[:, kv * D:(kv + 1) * D]).T / np.sqrt(D)
            e = np.exp(np.where(causal, s, -np.inf) - s.max(1, keepdims=True))
            heads.append((e / e.sum(1, keepdims=True)) @ v[:, kv * D:(kv + 1) * D])
        x = x + np.concatenate(heads, 1) @ w[p + "self_attn.o_proj.weight"].T     # o_proj: no bias
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T                 # untied head


ROWS = [[5, 9, 2, 33, 17, 40, 8, 61], [11, 3, 60, 7], [21, 4]]


def left_pad(rows, pad=0):
    L = max(map(len, rows))
    ids = np.full((len(rows), L), pad, np.int32)
    mask = np.zeros((len(rows), L), np.int32)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    return ids, mask


def test_config_has_the_qwen2_parameters(tiny):
    cfg, model, w = tiny
    names = set(w)
    for i in range(cfg.num_hidden_layers):
        for n in "qkv":
            assert f"model.layers.{i}.self_attn.{n}_proj.bias" in names
        assert f"model.layers.{i}.self_attn.o_proj.bias" not in names
    assert "lm_head.weight" in names and w["model.layers.0.self_attn.q_proj.bias"].shape == (32,)
    assert w["model.layers.0.self_attn.k_proj.bias"].shape == (16,)           # 2 KV heads x 8
    assert np.abs(w["model.layers.1.self_attn.v_proj.bias"]).max() > 0       # drawn, so the tests see it
    assert model.get_input_embeddings() is model.model.embed_tokens.weight
    assert model.lm_head_weight() is model.lm_head.weight


@pytest.mark.parametrize("graph", [False, True])
def test_logits_match_numpy_with_left_padding(tiny, graph):
    cfg, model, w = tiny
    ids, mask = left_pad(ROWS)

    def fwd(i, m):
        return model(i, attention_mask=m)

    out = (ms.jit(fwd) if graph else fwd)(Tensor(ids), Tensor(mask)).asnumpy()
    for b, r in enumerate(ROWS):
        ref = np_qwen2_forward(w, cfg, np.array(r))
        np.testing.assert_allclose(out[b, -len(r):], ref, atol=1e-4, rtol=1e-4, err_msg=f"row {b}")


def test_hidden_states_and_head_are_the_forward(tiny):
    _, model, _ = tiny
    ids, mask = left_pad(ROWS)
    hidden = model.hidden_states(input_ids=Tensor(ids), attention_mask=Tensor(mask))
    np.testing.assert_allclose(model.logits_from_hidden(hidden).asnumpy(),
                               model(Tensor(ids), attention_mask=Tensor(mask)).asnumpy(), rtol=1e-6, atol=1e-6)
    embeds = model.model.embed(Tensor(ids))
    np.testing.assert_allclose(model(inputs_embeds=embeds, attention_mask=Tensor(mask)).asnumpy(),
                               model(Tensor(ids), attention_mask=Tensor(mask)).asnumpy(), rtol=1e-6, atol=1e-6)


def test_top_k_trains_the_biases_and_the_untied_head_alone(tiny):
    cfg, model, _ = tiny
    ids, mask = left_pad(ROWS)
    try:
        params = set_trainable(model, "top_k", 1)
        names = {n for n, p in model.parameters_and_names() if p.requires_grad}
        assert {"model.layers.1.self_attn.q_proj.bias", "model.layers.1.self_attn.v_proj.bias",
                "model.norm.weight"} <= names
        assert not any(n.startswith("model.layers.0.") for n in names) and len(params) == 13

        def loss(i, m):
            return model(i, attention_mask=m).mean()

        grads = ms.jit(ms.value_and_grad(loss, None, params))(Tensor(ids), Tensor(mask))[1]
        assert all(np.abs(g.asnumpy()).max() > 0 for g in grads)
        set_trainable(model, "head_norms")  # untied: the head trains, the input table does not
        assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    finally:
        set_trainable(model, "all")


def full_reforward_greedy(model, rows, steps):
    """Greedy tokens from a full forward over prompt + tokens so far at every step (no cache)."""
    seqs = [list(r) for r in rows]
    width = max(map(len, rows)) + steps

    def last_logits(i, m):
        return model(i, attention_mask=m)[:, -1]

    f = ms.jit(last_logits)  # one compile: the width is fixed
    for _ in range(steps):
        ids, mask = left_pad(seqs)
        pad = width - ids.shape[1]
        ids = np.concatenate([np.zeros((len(rows), pad), np.int32), ids], 1)
        mask = np.concatenate([np.zeros((len(rows), pad), np.int32), mask], 1)
        for s, t in zip(seqs, f(Tensor(ids), Tensor(mask)).asnumpy().argmax(-1)):
            s.append(int(t))
    return np.array([s[len(r):] for s, r in zip(seqs, rows)])


@pytest.mark.parametrize("graph", [False, True])
def test_kv_cache_greedy_equals_full_reforward(tiny, graph):
    _, model, _ = tiny
    ids, mask = left_pad(ROWS)
    new, new_mask = sample(model, ids, mask, 16, greedy=True, eos_id=-1, graph=graph)
    np.testing.assert_array_equal(new, full_reforward_greedy(model, ROWS, 16))
    assert new_mask.all() and len(set(new.ravel())) > 3


def test_kv_cache_logits_equal_full_forward(tiny):
    """Gumbel-max sampling through the cache: the logits of every drawn token equal a full forward's."""
    _, model, _ = tiny
    ids, mask = left_pad(ROWS)
    new, _, logits = sample(model, ids, mask, 6, seed=3, eos_id=-1, return_logits=True, graph=True)
    full_ids = np.concatenate([ids, new], 1)
    full_mask = np.concatenate([mask, np.ones_like(new)], 1)
    ref = model(Tensor(full_ids), attention_mask=Tensor(full_mask)).asnumpy()[:, ids.shape[1] - 1:-1]
    np.testing.assert_allclose(logits, ref, atol=2e-4, rtol=2e-4)


# --- GGUF (architecture qwen2) -----------------------------------------------------------------

_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
            "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight", "self_attn.o_proj.weight": "attn_output.weight",
            **{f"self_attn.{n}_proj.{kind}": f"attn_{n}.{kind}" for n in "qkv" for kind in ("weight", "bias")}}


def write_tiny_qwen2_gguf(path, w, cfg, drop=None, q8_1=None):
    """A qwen2 GGUF as llama.cpp's converter writes one: HF row order (no Q/K permutation), biases, output.weight.
    ``q8_1`` names a tensor stored as Q8_1 (no numpy dequantiser in gguf)."""
    import gguf
    wr = gguf.GGUFWriter(str(path), arch="qwen2")
    wr.add_block_count(cfg.num_hidden_layers)
    wr.add_context_length(cfg.max_position_embeddings)
    wr.add_embedding_length(cfg.hidden_size)
    wr.add_feed_forward_length(cfg.intermediate_size)
    wr.add_head_count(cfg.num_attention_heads)
    wr.add_head_count_kv(cfg.num_key_value_heads)
    wr.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    wr.add_rope_freq_base(cfg.rope_theta)
    wr.add_eos_token_id(cfg.eos_token_id)
    wr.add_bos_token_id(cfg.bos_token_id)
    wr.add_pad_token_id(cfg.pad_token_id)
    for name, arr in w.items():
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
        if name in top:
            gname = top[name]
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{_TO_GGUF[rest]}"
        if gname == drop:
            continue
        if gname == q8_1:
            raw = np.zeros((arr.shape[0], arr.shape[1] // 32 * 40), np.uint8)  # 32 values in 40 bytes
            wr.add_tensor(gname, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            wr.add_tensor(gname, arr.astype(np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def test_gguf_qwen2_loads_without_permutation(tiny, tmp_path):
    from ms_dfkd.models.llama_weights import load_gguf_llama
    cfg, _, w = tiny
    path = tmp_path / "tiny_qwen2.gguf"
    write_tiny_qwen2_gguf(path, w, cfg)
    cfg2, model = load_gguf_llama(path)
    assert dataclasses.replace(cfg2, rms_norm_eps=1e-6, initializer_range=0.2) == cfg  # eps: float32 in GGUF
    assert (cfg2.qkv_bias, cfg2.tie_word_embeddings, cfg2.rope_theta, cfg2.eos_token_id) == (True, False, 1e6, 72)
    got = state_of(model)
    assert set(got) == set(w)
    for k, v in w.items():
        np.testing.assert_array_equal(got[k], v.astype(np.float32), err_msg=k)
    out = model(Tensor(np.array([ROWS[0]], np.int32))).asnumpy()[0]
    np.testing.assert_allclose(out, np_qwen2_forward(w, cfg, np.array(ROWS[0])), atol=1e-4, rtol=1e-4)


def test_gguf_qwen2_bad_inputs_load_nothing(tiny, tmp_path, monkeypatch):
    """A missing bias or an unsupported quantisation type is named, and found before any tensor is
    dequantised (so before any parameter is assigned)."""
    from ms_dfkd.models import llama_weights
    from ms_dfkd.models.gguf_file import GGUFError
    cfg, _, w = tiny
    calls = []
    real = llama_weights._dequantize
    monkeypatch.setattr(llama_weights, "_dequantize", lambda t, p: calls.append(t.name) or real(t, p))
    short = tmp_path / "nobias.gguf"
    write_tiny_qwen2_gguf(short, w, cfg, drop="blk.1.attn_k.bias")
    with pytest.raises(CheckpointError, match=r"missing keys.*model\.layers\.1\.self_attn\.k_proj\.bias"):
        llama_weights.load_gguf_llama(short)
    bad = tmp_path / "q81.gguf"
    write_tiny_qwen2_gguf(bad, w, cfg, q8_1="blk.1.ffn_up.weight")  # written after most tensors
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_up\.weight.*Q8_1.*nothing was loaded"):
        llama_weights.load_gguf_llama(bad)
    assert calls == []


# --- the real Qwen2.5-Coder-0.5B-Instruct ---------------------------------------------------------

@pytest.fixture(scope="module")
def qwen05(asset_or_skip):
    from ms_dfkd.models.llama_weights import load_gguf_llama
    from ms_dfkd.tokenization import bpe_tokenizer_from_gguf
    path = asset_or_skip("qwen2.5-coder-0.5b")
    cfg, model = load_gguf_llama(path)
    return cfg, model, bpe_tokenizer_from_gguf(path), path


@pytest.mark.real
def test_qwen05_config_paris_and_kv_cache(qwen05):
    """Greedy "The capital of France is" names Paris, and the KV cache decodes what full re-forwards do.
    (Checked once against HF transformers 4.57 on the same GGUF: logits within 3e-5 of 22.)"""
    cfg, model, tok, _ = qwen05
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == \
        (24, 896, 4864, 14, 2, 151936, 1e6, pytest.approx(1e-6))
    assert (cfg.qkv_bias, cfg.tie_word_embeddings, cfg.eos_token_id, cfg.pad_token_id) == (True, False, 151645, 151643)
    assert sum(int(np.prod(p.shape)) for p in model.get_parameters()) == 630_167_424
    prompts = ["The capital of France is", "Write one sentence of a positive movie review:"]
    ids, mask = tok.encode_batch(prompts, padding_side="left")
    new, new_mask = sample(model, ids, mask, 12, greedy=True, eos_id=tok.eos_id, graph=True)
    assert tok.decode(new[0]).startswith(" Paris"), tok.decode(new[0])
    rows = [[int(i) for i, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]
    ref = full_reforward_greedy(model, rows, 4)
    np.testing.assert_array_equal(new[:, :4], ref)


@pytest.mark.real
def test_qwen05_chat_prompt_and_stops_in_the_driver(qwen05):
    """Distiller's prompt builder wraps the template in Qwen2.5's ChatML (the GGUF's own Jinja template,
    rendered) and its stop set holds <|im_end|> and <|endoftext|>."""
    jinja2 = pytest.importorskip("jinja2")
    from ms_dfkd.config import load_config
    from ms_dfkd.train import Distiller
    _, _, tok, _ = qwen05
    rendered = jinja2.Template(tok.chat_template).render(
        messages=[{"role": "user", "content": "Hi there"}], add_generation_prompt=True, tools=None)
    assert tok.chat_prompt("Hi there") == rendered
    assert rendered.startswith("<|im_start|>system\nYou are Qwen") and rendered.endswith("<|im_start|>assistant\n")
    cfg = load_config("configs/sentiment_qwen.yaml")
    fake = SimpleNamespace(cfg=cfg, g_tok=tok, P=cfg.generator.prompt_max_length)
    ids, mask = Distiller._prompt_ids(fake, ["The markets fell on Monday after the news."], [1])
    text = tok.decode(ids[0][mask[0] == 1], skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nRewrite the text below as a short positive" in text
    assert "The markets fell on Monday" in text and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    fake.cfg.generator.stop_at_newline = False
    assert Distiller._stop_ids(fake) == (151643, 151645)


@pytest.mark.real
def test_qwen05_vocab_bridge_coverage_and_cost(qwen05):
    """The 151,936-token bridge into WordPiece: special and filler rows empty, every other row sums to 1;
    the English-text tokens covered (the CJK, Thai, Hangul ones map to [UNK]); built in seconds."""
    from ms_dfkd import build
    from ms_dfkd.vocab_bridge import build_vocab_bridge
    _, _, tok, _ = qwen05
    t_tok = build.teacher_tokenizer()
    t0 = time.time()
    bridge = build_vocab_bridge(tok, t_tok)
    seconds = time.time() - t0
    print(bridge.summary(), f"in {seconds:.1f} s")
    assert bridge.shape == (151936, t_tok.vocab_size)
    sums = np.asarray(bridge.matrix.sum(1)).ravel()
    assert np.allclose(sums[sums > 0], 1.0, atol=1e-5)
    for special in (151643, 151644, 151645, 151665, 151935):   # control tokens, [PAD151665] fillers
        assert sums[special] == 0
    assert sums[tok.encode(" great")[0]] == 1
    assert bridge.ascii_coverage > 0.99 and bridge.coverage > 0.8 and bridge.unk_rows < 30_000
    assert seconds < 60


@pytest.mark.real
def test_qwen15_config_and_tokenizer_from_its_gguf(asset_or_skip):
    """The 1.5B sibling through the same code, without loading its 1.5B weights (that takes about a minute
    and 8.8 GB; done once by hand: greedy "The capital of France is" -> " Paris. Paris is the largest city
    in France..."): its config from the metadata, every tensor accounted for, the 0.5B's vocabulary."""
    from ms_dfkd.models.gguf_file import read_gguf
    from ms_dfkd.models.llama_weights import config_from_gguf, gguf_name_to_hf
    from ms_dfkd.tokenization import bpe_tokenizer_from_gguf
    path = asset_or_skip("qwen2.5-coder-1.5b")
    reader = read_gguf(path)
    cfg = config_from_gguf(reader, path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.qkv_bias, cfg.tie_word_embeddings) == \
        (28, 1536, 8960, 12, 2, 151936, True, False)
    model = LlamaForCausalLM(dataclasses.replace(cfg, num_hidden_layers=1, vocab_size=8), init_weights=False)
    per_layer = {n.split(".", 3)[3] for n, _ in model.parameters_and_names() if n.startswith("model.layers.0.")}
    names = {gguf_name_to_hf(t.name) for t in reader.tensors}
    assert names == {f"model.layers.{i}.{n}" for i in range(28) for n in per_layer} | {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    tok = bpe_tokenizer_from_gguf(path)
    assert tok.encode("Hello world") == [9707, 1879] and tok.chat_format == "qwen2" and tok.eos_id == 151645
