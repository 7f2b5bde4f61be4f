"""Llama generator: numpy reference forward, finite-difference gradients, KV-cache decoding,
Gumbel-max contract, GGUF loading, byte-level BPE tokenizer, and the real SmolLM2."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from kernels.gumbel_noise import gumbel_np
from ms_dfkd.models.checkpoint_io import CheckpointError, state_of
from ms_dfkd.models.llama import LlamaConfig, LlamaForCausalLM, set_trainable
from ms_dfkd.models.llama_sampling import sample

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=128, initializer_range=0.2)


@pytest.fixture(scope="module")
def tiny():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = LlamaConfig(**TINY)
    model = LlamaForCausalLM(cfg, seed=3)
    return cfg, model, {k: v.astype(np.float64) for k, v in state_of(model).items()}


# --- independent numpy reference (float64), one unpadded sequence ---------------------------------

def np_forward(w, cfg, ids=None, embeds=None, steer=None, steer_layer=0, states_at=None):
    """Hugging Face Llama math written out per head: returns logits [L, V]. ``steer`` [H] is added to the
    states entering layer ``steer_layer`` (the generator's label vectors). ``states_at`` k: returns the
    states entering layer k instead [L, H], before any steer there."""
    x = w["model.embed_tokens.weight"][ids] if embeds is None else np.asarray(embeds, np.float64)
    L, D = x.shape[0], cfg.hidden_size // cfg.num_attention_heads
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    angle = np.arange(L)[:, None] / cfg.rope_theta ** (np.arange(0, D, 2) / D)[None, :]
    cos, sin = np.cos(angle), np.sin(angle)

    def rope(v):  # pairs (i, i + D/2) rotated by the angle of frequency i
        a, b = v[:, : D // 2], v[:, D // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], 1)

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.rms_norm_eps) * g

    for i in range(cfg.num_hidden_layers):
        if i == states_at:
            return x
        if steer is not None and i == steer_layer:
            x = x + np.asarray(steer, np.float64)[None, :]
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (h @ w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        heads = []
        for hd in range(cfg.num_attention_heads):
            kv = hd // group
            s = rope(q[:, hd * D:(hd + 1) * D]) @ rope(k[:, kv * D:(kv + 1) * D]).T / np.sqrt(D)
            s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
            e = np.exp(s - s.max(1, keepdims=True))
            heads.append((e / e.sum(1, keepdims=True)) @ v[:, kv * D:(kv + 1) * D])
        x = x + np.concatenate(heads, 1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T


ROWS = [[5, 9, 2, 33, 17, 40, 8], [11, 3, 60, 7], [21]]   # left-padded into one batch


def left_pad(rows, pad=0):
    L = max(map(len, rows))
    ids = np.full((len(rows), L), pad, np.int32)
    mask = np.zeros((len(rows), L), np.int32)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    return ids, mask


@pytest.mark.parametrize("graph", [False, True])
def test_logits_match_numpy_with_left_padding(tiny, graph):
    cfg, model, w = tiny
    ids, mask = left_pad(ROWS)

    def fwd(i, m):
        return model(i, attention_mask=m)

    out = (ms.jit(fwd) if graph else fwd)(Tensor(ids), Tensor(mask)).asnumpy()
    assert out.shape == (3, ids.shape[1], cfg.vocab_size) and out.dtype == np.float32
    for b, r in enumerate(ROWS):
        ref = np_forward(w, cfg, ids=np.array(r))
        np.testing.assert_allclose(out[b, ids.shape[1] - len(r):], ref, atol=1e-4, rtol=1e-4)
    assert np.isfinite(out).all()  # padded query rows too


def test_inputs_embeds_path_and_hidden_states(tiny):
    cfg, model, w = tiny
    ids = np.array([ROWS[0]], np.int32)
    emb = w["model.embed_tokens.weight"][ids[0]]
    out = model(inputs_embeds=Tensor(emb[None].astype(np.float32))).asnumpy()[0]
    np.testing.assert_allclose(out, np_forward(w, cfg, ids=ids[0]), atol=1e-4, rtol=1e-4)
    hid = model.hidden_states(Tensor(ids)).asnumpy()
    head = model.lm_head_weight().asnumpy()
    assert hid.shape == (1, 7, cfg.hidden_size) and head.shape == (cfg.vocab_size, cfg.hidden_size)
    np.testing.assert_allclose(hid[0] @ head.T, out, atol=1e-4, rtol=1e-4)


def test_float16_compute_close_to_numpy(tiny):
    """run.precision=float16 through build.set_compute_dtype: every matmul in float16, logits float32."""
    from types import SimpleNamespace
    from ms_dfkd.build import set_compute_dtype
    cfg, _, w = tiny
    model = LlamaForCausalLM(LlamaConfig(**TINY), seed=3)  # same weights as the fixture's
    set_compute_dtype(model, SimpleNamespace(run=SimpleNamespace(precision="float16")))
    assert model.config.compute_dtype == "float16"
    assert all(c.compute_dtype == ms.float16 for _, c in model.cells_and_names() if hasattr(c, "compute_dtype"))
    out = model(Tensor(np.array([ROWS[0]], np.int32)))
    assert out.dtype == ms.float32
    ref = np_forward(w, cfg, ids=np.array(ROWS[0]))
    err = np.abs(out.asnumpy()[0] - ref).max()
    assert err < 2e-2 * np.abs(ref).max(), err
    assert err > 1e-6  # float16 really ran: a float32 path would match to ~1e-6


@pytest.mark.parametrize("graph", [False, True])
def test_embedding_gradient_matches_finite_differences(tiny, graph):
    cfg, model, w = tiny
    rng = np.random.default_rng(0)
    L = 5
    emb = rng.normal(0, 1, (L, cfg.hidden_size))
    R = rng.normal(0, 1, (L, cfg.vocab_size))

    def loss(e):
        return (model(inputs_embeds=e) * Tensor(R[None].astype(np.float32))).sum()

    g = (ms.jit(ms.grad(loss)) if graph else ms.grad(loss))(Tensor(emb[None].astype(np.float32))).asnumpy()[0]
    fd = np.zeros_like(emb)
    eps = 1e-5
    for i in range(L):
        for j in range(cfg.hidden_size):
            d = np.zeros_like(emb)
            d[i, j] = eps
            fd[i, j] = ((np_forward(w, cfg, embeds=emb + d) * R).sum()
                        - (np_forward(w, cfg, embeds=emb - d) * R).sum()) / (2 * eps)
    np.testing.assert_allclose(g, fd, atol=2e-3 * np.abs(fd).max(), rtol=1e-3)


def test_parameter_gradients_and_trainable_modes(tiny):
    cfg, model, _ = tiny
    ids, mask = left_pad(ROWS)
    try:
        params = set_trainable(model, "top_k", 1)
        names = {n for n, p in model.parameters_and_names() if p.requires_grad}
        assert len(params) == 10 and all("layers.0." not in n for n in names) and "model.norm.weight" in names

        def loss(i, m):
            return model(i, attention_mask=m).mean()

        grads = ms.jit(ms.value_and_grad(loss, None, params))(Tensor(ids), Tensor(mask))[1]
        assert len(grads) == len(params) and all(np.abs(g.asnumpy()).max() > 0 for g in grads)
        # tied head: training the head trains the embedding table
        set_trainable(model, "head_norms")
        assert model.model.embed_tokens.weight.requires_grad
        assert len(set_trainable(model, "norms")) == 2 * cfg.num_hidden_layers + 1
        assert set_trainable(model, "none") == []
        with pytest.raises(ValueError, match="top_k"):
            set_trainable(model, "top_k", 0)
    finally:
        set_trainable(model, "all")


# --- KV-cache decoding -------------------------------------------------------------------------

def full_reforward_greedy(model, rows, steps):
    """Argmax of a full forward over prompt + tokens so far, each step (static shape, left-padded)."""
    seqs = [list(r) for r in rows]
    width = max(map(len, rows)) + steps

    def fwd(i, m):
        return model(i, attention_mask=m)[:, -1]

    f = ms.jit(fwd)  # one compile: the width is fixed
    for _ in range(steps):
        ids, mask = left_pad(seqs)
        pad = width - ids.shape[1]
        ids = np.concatenate([np.zeros((len(rows), pad), np.int32), ids], 1)
        mask = np.concatenate([np.zeros((len(rows), pad), np.int32), mask], 1)
        z = f(Tensor(ids), Tensor(mask)).asnumpy().argmax(-1)
        for s, t in zip(seqs, z):
            s.append(int(t))
    return np.array([s[len(r):] for s, r in zip(seqs, rows)])


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_kv_cache_greedy_equals_full_reforward(tiny, graph, fused):
    _, model, _ = tiny
    ids, mask = left_pad(ROWS)
    new, new_mask = sample(model, ids, mask, 20, greedy=True, eos_id=-1, graph=graph, fused_decode=fused,
                           fused_prefill=fused)
    ref = full_reforward_greedy(model, ROWS, 20)
    np.testing.assert_array_equal(new, ref)
    assert new.dtype == np.int32 and new_mask.dtype == np.int32 and new_mask.all()
    assert len(set(ref.ravel())) > 3  # the tiny model does not just repeat one token


def test_gumbel_max_follows_the_noise_contract(tiny):
    cfg, model, _ = tiny
    ids, mask = left_pad(ROWS)
    T, temp, seed = 12, 0.7, 1234
    new, _, logits = sample(model, ids, mask, T, seed=seed, temperature=temp, eos_id=-1,
                            return_logits=True, graph=True)
    V = cfg.vocab_size
    for b in range(len(ROWS)):
        g = gumbel_np(seed, b * T + np.arange(T), np.arange(V))
        np.testing.assert_array_equal(new[b], np.argmax(logits[b] / temp + g, -1))
    # the logits it drew from are the model's: step 0 equals the prompt's last-position logits
    full = model(Tensor(ids), attention_mask=Tensor(mask)).asnumpy()[:, -1]
    np.testing.assert_allclose(logits[:, 0], full, atol=1e-4)
    again = sample(model, ids, mask, T, seed=seed, temperature=temp, eos_id=-1, graph=True)[0]
    other = sample(model, ids, mask, T, seed=seed + 1, temperature=temp, eos_id=-1, graph=True)[0]
    np.testing.assert_array_equal(again, new)
    assert (other != new).mean() > 0.3


def full_sort_pick(logits, temp, top_p, seed, row):
    """The reference token: the nucleus from a float64 sort of the whole row, Gumbel-max within it with the
    noise of (seed, row, column). Returns (token, nucleus size)."""
    s = logits.astype(np.float64) / temp
    p = np.exp(s - s.max())
    p /= p.sum()
    order = np.argsort(-p)
    n_keep = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)  # smallest set with mass >= p
    nucleus = order[:n_keep]
    g = gumbel_np(seed, [row], np.arange(len(s)))[0]
    return nucleus[np.argmax(s[nucleus] + g[nucleus])], n_keep


def test_top_p_nucleus(tiny):
    cfg, model, _ = tiny
    ids, mask = left_pad(ROWS)
    T, temp, top_p, seed = 10, 1.3, 0.6, 7
    new, _, logits = sample(model, ids, mask, T, seed=seed, temperature=temp, top_p=top_p, eos_id=-1,
                            return_logits=True, graph=True)
    for b in range(len(ROWS)):
        for t in range(T):
            assert new[b, t] == full_sort_pick(logits[b, t], temp, top_p, seed, b * T + t)[0]


def test_stop_tokens_and_mask(tiny):
    _, model, _ = tiny
    ids, mask = left_pad(ROWS)
    free = sample(model, ids, mask, 10, seed=5, eos_id=-1, graph=True)[0]
    stop = int(free[0, 3])
    t0 = int(np.argmax(free[0] == stop))  # first occurrence in row 0 (<= 3)
    new, new_mask = sample(model, ids, mask, 10, seed=5, eos_id=-1, stop_ids=(stop,), pad_id=63, graph=True)
    for b in range(len(ROWS)):
        hits = np.flatnonzero(free[b] == stop)
        if len(hits) == 0:
            np.testing.assert_array_equal(new[b], free[b])
            assert new_mask[b].all()
            continue
        s = hits[0]
        np.testing.assert_array_equal(new[b, :s + 1], free[b, :s + 1])  # stop token kept
        assert (new[b, s + 1:] == 63).all()
        np.testing.assert_array_equal(new_mask[b], (np.arange(10) < s).astype(np.int32))
    assert new_mask[0, t0] == 0


def test_sample_rejects_right_padding(tiny):
    _, model, _ = tiny
    with pytest.raises(ValueError, match="left-padded"):
        sample(model, np.array([[5, 6, 0]]), np.array([[1, 1, 0]]), 3, graph=False)


# --- GGUF loading ------------------------------------------------------------------------------

def llama_cpp_permute(w, n_head):
    """What llama.cpp's converter does to Q/K rows (HF rotate-half -> adjacent pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, w, cfg, drop=None, bad_type_for=None):
    import gguf
    hf_to_gguf = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                  "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                  "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                  "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    wr = gguf.GGUFWriter(str(path), arch="llama")
    wr.add_block_count(cfg.num_hidden_layers)
    wr.add_context_length(cfg.max_position_embeddings)
    wr.add_embedding_length(cfg.hidden_size)
    wr.add_feed_forward_length(cfg.intermediate_size)
    wr.add_head_count(cfg.num_attention_heads)
    wr.add_head_count_kv(cfg.num_key_value_heads)
    wr.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    wr.add_rope_freq_base(cfg.rope_theta)
    wr.add_vocab_size(cfg.vocab_size)
    for name, arr in w.items():
        arr = arr.astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            gname = f"blk.{i}.{hf_to_gguf[rest[:-len('.weight')]]}.weight"
            if rest.startswith("self_attn.q_proj"):
                arr = llama_cpp_permute(arr, cfg.num_attention_heads)
            elif rest.startswith("self_attn.k_proj"):
                arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        if gname == drop:
            continue
        if gname == bad_type_for:  # Q8_1: 32 values in 40 bytes; gguf has no dequantiser for it
            raw = np.zeros((arr.shape[0], arr.shape[1] // 32 * 40), np.uint8)
            wr.add_tensor(gname, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            wr.add_tensor(gname, arr)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def test_gguf_roundtrip_unpermutes_qk(tiny, tmp_path):
    from ms_dfkd.models.llama_weights import load_gguf_llama
    cfg, _, w = tiny
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, w, cfg)
    cfg2, model = load_gguf_llama(path)
    assert (cfg2.num_key_value_heads, cfg2.rope_theta, cfg2.tie_word_embeddings) == (2, 10000.0, True)
    got = state_of(model)
    for k, v in w.items():
        np.testing.assert_array_equal(got[k], v.astype(np.float32), err_msg=k)
    out = model(Tensor(np.array([ROWS[0]], np.int32))).asnumpy()[0]
    np.testing.assert_allclose(out, np_forward(w, cfg, ids=np.array(ROWS[0])), atol=1e-4, rtol=1e-4)


def test_gguf_bad_inputs(tiny, tmp_path):
    from ms_dfkd.models.llama_weights import GGUFError, load_gguf_llama
    cfg, _, w = tiny
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf_llama(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    write_tiny_gguf(bad, w, cfg, bad_type_for="blk.1.ffn_up.weight")
    with pytest.raises(GGUFError, match=r"blk\.1\.ffn_up\.weight.*Q8_1"):
        load_gguf_llama(bad)
    short = tmp_path / "short.gguf"
    write_tiny_gguf(short, w, cfg, drop="blk.0.attn_k.weight")
    with pytest.raises(CheckpointError, match=r"missing keys.*model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_gguf_llama(short)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="junk.gguf"):
        load_gguf_llama(junk)


def test_gguf_reader_names_a_truncated_file(tiny, tmp_path):
    from ms_dfkd.models.gguf_file import GGUFError, read_gguf
    cfg, _, w = tiny
    whole = tmp_path / "whole.gguf"
    write_tiny_gguf(whole, w, cfg)
    data = whole.read_bytes()
    for cut, what in ((60, "truncated or corrupt"), (len(data) - 8, "runs past the end of the file")):
        part = tmp_path / f"cut{cut}.gguf"
        part.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=f"cut{cut}.gguf.*({what})"):
            read_gguf(part)
    version9 = tmp_path / "v9.gguf"
    version9.write_bytes(data[:4] + (9).to_bytes(4, "little") + data[8:])
    with pytest.raises(GGUFError, match="v9.gguf.*version 9"):
        read_gguf(version9)


# --- real SmolLM2-135M-Instruct ----------------------------------------------------------------

@pytest.mark.real
def test_gguf_reader_matches_the_gguf_package_on_smollm2():
    """ms_dfkd's own reader (fast) against gguf.GGUFReader (the reference): every metadata value,
    every tensor's name, shape, type and bytes."""
    import gguf
    from ms_dfkd.assets import asset_path
    from ms_dfkd.models.gguf_file import read_gguf
    path = asset_path("smollm2_gguf")
    ours, ref = read_gguf(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]
    for k, f in ref.fields.items():
        if not k.startswith("GGUF."):  # the reference also lists the header as pseudo-fields
            assert ours.fields[k] == f.contents(), k
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152
    assert len(ours.tensors) == len(ref.tensors) == 272
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.shape, a.tensor_type) == (b.name, tuple(int(n) for n in b.shape), b.tensor_type)
        np.testing.assert_array_equal(a.data.reshape(-1), np.asarray(b.data).view(np.uint8).reshape(-1),
                                      err_msg=a.name)


@pytest.fixture(scope="module")
def smollm2():
    from ms_dfkd.assets import asset_path
    from ms_dfkd.models.llama_weights import load_gguf_llama
    from ms_dfkd.tokenization import bpe_tokenizer_from_gguf
    path = asset_path("smollm2_gguf")
    cfg, model = load_gguf_llama(path)
    return cfg, model, bpe_tokenizer_from_gguf(path)


@pytest.mark.real
def test_smollm2_config_and_paris_with_kv_cache(smollm2):
    cfg, model, tok = smollm2
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (30, 576, 9, 3, 1536, 49152, 100000.0)
    assert sum(int(np.prod(p.shape)) for p in model.get_parameters()) == 134_515_008
    prompts = ["The capital of France is", "One, two, three, four,"]
    ids, mask = tok.encode_batch(prompts, padding_side="left")
    new, new_mask = sample(model, ids, mask, 20, greedy=True, graph=True)
    assert tok.decode(new[0]).startswith(" Paris")
    rows = [[int(i) for i, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]
    ref = full_reforward_greedy(model, rows, 20)
    np.testing.assert_array_equal(new * new_mask, ref * new_mask)


@pytest.mark.real
def test_bpe_roundtrip_and_specials(smollm2):
    from ms_dfkd.tokenization import smollm2_chat_prompt
    _, _, tok = smollm2
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == ("bpe", 49152, 1, 2, 2)
    for s in ["Hello, world!", "  two  spaces\tand a tab", "digits 2024 and 3.14159", "line one\nline two\n\n",
              "café, naïve, Ærøskøbing", "中文字符测试", "emoji 😀🎉 done", "it's a \"quote\" (x) [y] {z} #1!", ""]:
        assert tok.decode(tok.encode(s)) == s, s
    assert len(tok.encode("2024")) == 4                     # digits are split one by one
    assert tok.encode("<|im_start|>user") [0] == 1           # special tokens are never split
    assert tok.id_to_token(2) == "<|im_end|>"
    assert "<|im_start|>" in tok.chat_template
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert smollm2_chat_prompt("Hi there") == expected
    assert smollm2_chat_prompt("Q", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    chat = tok.encode(expected)
    assert chat.count(1) == 3 and chat.count(2) == 2


def test_trunk_then_top_layers_equal_the_whole_model(tiny):
    """trunk_states (the layers below the top k, no final norm) then top_hidden_states (the top k and the
    norm) give the hidden states of one full forward, for every k, with left padding."""
    cfg, model, w = tiny
    rng = np.random.default_rng(3)
    ids = rng.integers(0, cfg.vocab_size, (2, 7)).astype(np.int32)
    mask = np.ones((2, 7), np.int32)
    mask[1, :3] = 0
    ids_t, mask_t = ms.Tensor(ids), ms.Tensor(mask)
    whole = model.hidden_states(input_ids=ids_t, attention_mask=mask_t).asnumpy()
    for k in range(1, cfg.num_hidden_layers + 1):
        trunk = model.trunk_states(ids_t, mask_t, k)
        assert trunk.shape == (2, 7, cfg.hidden_size)
        top = model.top_hidden_states(trunk, mask_t, k)
        got = top.asnumpy()
        np.testing.assert_allclose(got[mask == 1], whole[mask == 1], rtol=1e-5, atol=1e-6, err_msg=f"k={k}")
        # and the unpadded row's logits against the float64 numpy reference
        np.testing.assert_allclose(model.logits_from_hidden(top).asnumpy()[0], np_forward(w, cfg, ids[0]),
                                   rtol=1e-4, atol=1e-4, err_msg=f"k={k}")
        # rows=(start, n): those positions only, the top layer computing no others (the generator step's
        # sample positions), against the numpy reference and the whole output
        for start, n in ((3, 4), (0, 2), (6, 1)):
            rows = model.top_hidden_states(trunk, mask_t, k, rows=(start, n))
            assert rows.shape == (2, n, cfg.hidden_size)
            np.testing.assert_allclose(model.logits_from_hidden(rows).asnumpy()[0],
                                       np_forward(w, cfg, ids[0])[start:start + n], rtol=1e-4, atol=1e-4,
                                       err_msg=f"k={k} rows={start, n}")
            np.testing.assert_allclose(rows.asnumpy()[1], got[1, start:start + n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cuts", [(0.5,), (0.2, 0.05), (1e-3, 1e-4, 1e-5)])
def test_top_p_candidate_floors_give_the_nucleus_of_a_full_sort(tiny, cuts):
    """The nucleus found among the tokens above probability floors (whole-row fallback when their mass is
    below top_p) picks the same tokens as the full-sort reference of test_top_p_nucleus."""
    cfg, model, _ = tiny
    ids, mask = left_pad(ROWS)
    T, temp, top_p, seed = 10, 1.3, 0.6, 7
    new, _, logits = sample(model, ids, mask, T, seed=seed, temperature=temp, top_p=top_p, eos_id=-1,
                            return_logits=True, graph=True, nucleus_cuts=cuts)
    fallbacks = 0
    for b in range(len(ROWS)):
        for t in range(T):
            token, n_keep = full_sort_pick(logits[b, t], temp, top_p, seed, b * T + t)
            s = logits[b, t].astype(np.float64) / temp
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            fallbacks += n_keep >= (p >= min(cuts)).sum()  # the nucleus needs the last candidate or more
            assert new[b, t] == token
    if cuts == (0.5,):
        assert fallbacks > 0  # the whole-row fallback ran


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("steer_layer", [0, 1])
@pytest.mark.parametrize("fused", [True, False])
def test_kv_cache_sampling_with_label_vectors_matches_numpy(tiny, graph, steer_layer, fused):
    """sample(steer=v, steer_layer=s): the logits each token was drawn from equal the float64 numpy forward
    of [prompt; tokens so far] with v added to the states entering layer s, per row, with left padding;
    with the decode steps' layers as one C++ op each (fused) and as MindSpore's ops."""
    cfg, model, w = tiny
    rng = np.random.default_rng(5)
    steer = (rng.normal(size=(len(ROWS), cfg.hidden_size)) * 0.5).astype(np.float32)
    ids, mask = left_pad(ROWS)
    T = 6
    new, _, logits = sample(model, ids, mask, T, greedy=True, eos_id=-1, graph=graph, return_logits=True,
                            steer=steer, steer_layer=steer_layer, fused_decode=fused, fused_prefill=fused)
    plain, _ = sample(model, ids, mask, T, greedy=True, eos_id=-1, graph=graph, fused_decode=fused,
                      fused_prefill=fused)
    assert (new != plain).any()  # the vectors change what is written
    for b, row in enumerate(ROWS):
        for t in range(T):
            ref = np_forward(w, cfg, np.array(row + list(new[b, :t])), steer=steer[b], steer_layer=steer_layer)[-1]
            np.testing.assert_allclose(logits[b, t], ref, rtol=1e-4, atol=1e-4, err_msg=f"row {b} step {t}")


# rows that begin alike, as the generator's prompts do (template and label first, then the passage)
SHARED_ROWS = [[5, 9, 2, 33, 17, 40, 8, 1], [5, 9, 2, 33, 17, 12], [11, 3, 60, 7, 21, 30, 44, 2, 9],
               [5, 9, 2, 33, 17, 6, 19, 50, 23, 4], [11, 3, 60, 7, 21, 13], [11, 3, 60, 7, 21, 55, 2]]


@pytest.fixture
def any_shared_start(monkeypatch):
    """The sampler shares a prompt start however few positions that saves (SHARED_ROWS save fewer than its
    default asks)."""
    from ms_dfkd.models import llama_sampling
    real = llama_sampling.shared_prefix
    monkeypatch.setattr(llama_sampling, "shared_prefix", lambda *a, **k: real(*a, **{**k, "min_saved_per_row": 1}))


def test_shared_prefix_picks_the_start_rows_share():
    from ms_dfkd.models.llama_sampling import shared_prefix
    ids, mask = left_pad(SHARED_ROWS)
    n, group, first = shared_prefix(ids, mask, min_saved_per_row=1)
    assert n == 5  # (6 - 2) * 5 positions saved; at 6 every row is its own group
    assert list(group) in ([0, 0, 1, 0, 1, 1], [1, 1, 0, 1, 0, 0])
    assert all(group[i] == g for g, i in enumerate(first))  # first[g]: a row of group g
    assert len({tuple(SHARED_ROWS[i][:5]) for i in first}) == 2
    steer = np.zeros((6, 4), np.float32)
    steer[1] = 1.0  # another label vector: row 1 can no longer share with rows 0 and 3
    n, group, _ = shared_prefix(ids, mask, steer, min_saved_per_row=1)
    assert n == 5 and group[1] not in (group[0], group[2]) and group[0] == group[3] and group[2] == group[4]
    assert shared_prefix(*left_pad(ROWS)) is None  # nothing shared: the plain prefill
    assert shared_prefix(ids, mask, min_saved_per_row=4) is None  # 20 positions saved < 4 a row


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("with_steer", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_kv_cache_sampling_with_a_shared_prefix_matches_numpy(tiny, graph, with_steer, fused, monkeypatch):
    """With a prompt start that rows share computed once per group, the logits each token was drawn from
    still equal the float64 numpy forward of [prompt; tokens so far], per row; label vectors included;
    the prefill and decode steps as C++ layer ops (fused) and as MindSpore's ops."""
    from ms_dfkd.models import llama_sampling
    cfg, model, w = tiny
    chosen, real = [], llama_sampling.shared_prefix
    monkeypatch.setattr(llama_sampling, "shared_prefix",
                        lambda *a, **k: chosen.append(real(*a, **{**k, "min_saved_per_row": 1})) or chosen[-1])
    steer = None
    if with_steer:  # one vector per group, as the label vectors are per label
        v = (np.random.default_rng(2).normal(size=(2, cfg.hidden_size)) * 0.5).astype(np.float32)
        steer = v[[0, 0, 1, 0, 1, 1]]
    ids, mask = left_pad(SHARED_ROWS)
    T = 5
    new, _, logits = sample(model, ids, mask, T, greedy=True, eos_id=-1, graph=graph, return_logits=True,
                            steer=steer, steer_layer=1, fused_decode=fused, fused_prefill=fused)
    assert chosen[-1] is not None and chosen[-1][0] == 5  # the shared path ran
    for b, row in enumerate(SHARED_ROWS):
        for t in range(T):
            ref = np_forward(w, cfg, np.array(row + list(new[b, :t])),
                             steer=None if steer is None else steer[b], steer_layer=1)[-1]
            np.testing.assert_allclose(logits[b, t], ref, rtol=1e-4, atol=1e-4, err_msg=f"row {b} step {t}")
    plain, _ = sample(model, ids, mask, T, greedy=True, eos_id=-1, graph=graph, steer=steer, steer_layer=1,
                      share_prefix=False, fused_decode=fused, fused_prefill=fused)
    np.testing.assert_array_equal(new, plain)


def test_a_prefix_cache_reuses_the_shared_start_and_changes_nothing(tiny, any_shared_start, monkeypatch):
    """prefix_cache: the second call with the same prompt starts takes them from the cache (no prefill of the
    prefix), and both calls give the tokens, logits and states of calls without a cache; other label
    vectors are another key."""
    from ms_dfkd.models import llama_sampling
    cfg, model, _ = tiny
    ids, mask = left_pad(SHARED_ROWS)
    v = (np.random.default_rng(4).normal(size=(2, cfg.hidden_size)) * 0.5).astype(np.float32)
    kw = dict(greedy=False, temperature=1.0, seed=7, eos_id=-1, return_logits=True, steer=v[[0, 0, 1, 0, 1, 1]],
              steer_layer=1, capture_layer=1)
    want = sample(model, ids, mask, 4, **kw)
    dec = llama_sampling._decoder(model, True)
    calls, real_prefill = [], dec.prefill
    monkeypatch.setattr(dec, "prefill", lambda *a: calls.append(a[0].shape) or real_prefill(*a))
    cache = {}
    first = sample(model, ids, mask, 4, prefix_cache=cache, **kw)
    second = sample(model, ids, mask, 4, prefix_cache=cache, **kw)
    assert len(calls) == 1 and len(cache) == 1  # the prefix was computed once
    for got in (first, second):
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    sample(model, ids, mask, 4, prefix_cache=cache, **{**kw, "steer": v[[1, 1, 0, 1, 0, 0]]})
    assert len(calls) == 2 and len(cache) == 2


@pytest.mark.parametrize("fused", [True, False])
def test_a_prefix_cache_of_the_frozen_layers_follows_the_training_layers_above(tiny, fused, any_shared_start,
                                                                             monkeypatch):
    """prefix_cache_layers=k: the cache keeps the shared start's layers below k only; after the layers
    above change (as the trained generator's top layers do between steps), a call with the cache runs
    those layers again from the kept states and gives the tokens, logits and states of a call without a
    cache, to the bit; the layers below are computed once."""
    from ms_dfkd.models import llama_sampling
    cfg, model, _ = tiny
    ids, mask = left_pad(SHARED_ROWS)
    v = (np.random.default_rng(5).normal(size=(2, cfg.hidden_size)) * 0.5).astype(np.float32)
    kw = dict(greedy=False, temperature=1.0, seed=3, eos_id=-1, return_logits=True, steer=v[[0, 0, 1, 0, 1, 1]],
              steer_layer=1, capture_layer=1, fused_decode=fused, fused_prefill=fused)
    dec = llama_sampling._decoder(model, True)
    calls, real_prefill, real_from = [], dec.prefill, dec.prefill_from
    monkeypatch.setattr(dec, "prefill", lambda *a: calls.append("prefill") or real_prefill(*a))
    monkeypatch.setattr(dec, "prefill_from", lambda *a: calls.append("from") or real_from(*a))
    top = model.model.layers[1].mlp.down_proj.weight
    before = top.asnumpy().copy()
    cache = {}
    try:
        for step in range(3):
            if step:  # the top layer trains
                top.set_data(ms.Tensor(before * (1.0 + 0.3 * step), ms.float32))
            del calls[:]
            want = sample(model, ids, mask, 4, **kw)
            del calls[:]
            got = sample(model, ids, mask, 4, prefix_cache=cache, prefix_cache_layers=1, **kw)
            assert calls == (["prefill"] if step == 0 else ["from"]) and len(cache) == 1
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w)
    finally:
        top.set_data(ms.Tensor(before, ms.float32))
    with pytest.raises(ValueError, match="prefix_cache_layers 1"):
        sample(model, ids, mask, 4, prefix_cache=cache, prefix_cache_layers=1, **{**kw, "steer_layer": 0})


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_sampling_hands_out_the_states_entering_a_layer(tiny, graph, share, fused, any_shared_start):
    """capture_layer=k: the states entering layer k over [prompt; new tokens], in the prompt's own left
    padding, equal the float64 numpy forward's where the sequence is real (the last token's state is
    never computed: zeros, as the padding); label vectors (added at layer k, after) do not enter them but
    do steer the tokens; the tokens are those sampled without capturing."""
    cfg, model, w = tiny
    rows = SHARED_ROWS
    ids, mask = left_pad(rows)
    v = (np.random.default_rng(5).normal(size=(2, cfg.hidden_size)) * 0.5).astype(np.float32)
    steer = v[[0, 0, 1, 0, 1, 1]]
    T, P = 4, ids.shape[1]
    kw = dict(greedy=True, eos_id=-1, graph=graph, steer=steer, steer_layer=1, share_prefix=share, fused_decode=fused,
              fused_prefill=fused)
    new, new_mask, states = sample(model, ids, mask, T, capture_layer=1, **kw)
    assert states.shape == (len(rows), P + T, cfg.hidden_size)
    for b, row in enumerate(rows):
        seq = np.array(row + list(new[b]))
        ref = np_forward(w, cfg, seq, steer=steer[b], steer_layer=1, states_at=1)   # [len(row) + T, H]
        got = states[b, P - len(row):]
        np.testing.assert_allclose(got[:-1], ref[:-1], rtol=1e-4, atol=1e-5, err_msg=f"row {b}")
        assert not got[-1].any() and not states[b, :P - len(row)].any()
    plain, plain_mask = sample(model, ids, mask, T, **kw)
    np.testing.assert_array_equal(new, plain)
    np.testing.assert_array_equal(new_mask, plain_mask)
    with pytest.raises(ValueError, match="capture_layer 2"):
        sample(model, ids, mask, T, capture_layer=cfg.num_hidden_layers, **kw)


def test_the_decode_steps_say_which_path_ran_and_run_it(tiny, monkeypatch, caplog):
    """On CPU at float32 each decoder layer of a decode step and of the prefill is one C++ op (logged, and
    called once per layer and step); fused_decode=False / fused_prefill=False, or a compute dtype the ops do
    not take, runs MindSpore's ops and says why."""
    import logging
    from kernels import cpu_ops
    from ms_dfkd.models.llama_sampling import fused_decode_problem
    cfg, model, _ = tiny
    calls = []
    real = cpu_ops.llama_decode_layer
    monkeypatch.setattr(cpu_ops, "llama_decode_layer", lambda *a: calls.append(1) or real(*a))
    chunk_calls, real_chunk = [], cpu_ops.llama_chunk_layer
    monkeypatch.setattr(cpu_ops, "llama_chunk_layer", lambda *a: chunk_calls.append(1) or real_chunk(*a))
    ids, mask = left_pad(ROWS)
    T = 4
    with caplog.at_level(logging.INFO, logger="ms_dfkd"):
        fused = sample(model, ids, mask, T, greedy=True, eos_id=-1, graph=False)[0]
    assert len(calls) == cfg.num_hidden_layers * (T - 1)  # PyNative: every call runs
    assert len(chunk_calls) == cfg.num_hidden_layers  # one prefill (nothing shared among ROWS)
    assert "decode steps: each decoder layer as one C++ op" in caplog.text
    assert "prefill: each decoder layer as one C++ op over the real tokens" in caplog.text
    calls.clear()
    chunk_calls.clear()
    with caplog.at_level(logging.INFO, logger="ms_dfkd"):
        plain = sample(model, ids, mask, T, greedy=True, eos_id=-1, graph=False, fused_decode=False,
                       fused_prefill=False)[0]
    assert not calls and "decode steps: MindSpore's ops (fused_decode is off)" in caplog.text
    assert not chunk_calls and "prefill: MindSpore's ops (fused_prefill is off)" in caplog.text
    np.testing.assert_array_equal(fused, plain)
    assert fused_decode_problem(model) is None
    half = LlamaForCausalLM(LlamaConfig(**{**TINY, "compute_dtype": "float16"}), seed=3)
    assert "float16" in fused_decode_problem(half)


def test_fused_decode_steps_read_frozen_weights_from_gguf_blocks(monkeypatch, caplog):
    """A model whose weights came from GGUF blocks (here random Q4_1 / Q8_0 blocks, the weights set to their
    dequantisation): the fused decode steps read the frozen layers and the LM head from the blocks, the
    trained layer from its float32 weights; the logits equal the float64 numpy forward, and the tokens
    those of the float32 weights."""
    import logging
    from kernels import cpu_ops
    from kernels.gguf_blocks_reference import BLOCK_BYTES, dequantize
    from ms_dfkd.models.llama_sampling import LAYER_MATRICES
    if cpu_ops.gguf_loops() == "portable":
        pytest.skip("this CPU runs only the portable block loops, so the sampler keeps float32 weights (next test)")
    cfg = LlamaConfig(**{**TINY, "intermediate_size": 64})
    model = LlamaForCausalLM(cfg, seed=4)
    rng = np.random.default_rng(0)
    params = dict(model.parameters_and_names())
    names = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in LAYER_MATRICES] + ["model.embed_tokens.weight"]
    model.gguf_blocks = {}
    for j, name in enumerate(names):
        n, k = params[name].shape
        kind = ("Q4_1", "Q8_0")[j % 2]
        blocks = rng.integers(0, 256, (n, k // 32, BLOCK_BYTES[kind]), dtype=np.uint8)
        blocks[..., 0:2] = (rng.standard_normal((n, k // 32)) * 0.02).astype(np.float16).view(np.uint8).reshape(
            n, k // 32, 2)
        if kind == "Q4_1":
            blocks[..., 2:4] = (rng.standard_normal((n, k // 32)) * 0.1).astype(np.float16).view(np.uint8).reshape(
                n, k // 32, 2)
        params[name].set_data(Tensor(dequantize(blocks)))
        model.gguf_blocks[name] = Tensor(blocks)
    set_trainable(model, "top_k", 1)
    w = {k: v.astype(np.float64) for k, v in state_of(model).items()}
    kinds, block_bytes = [], set()
    real_layer, real_head = cpu_ops.llama_decode_layer, cpu_ops.gguf_linear
    monkeypatch.setattr(cpu_ops, "llama_decode_layer", lambda *a: kinds.append(str(a[8].dtype)) or block_bytes.add(
        a[8].shape[-1]) or real_layer(*a))
    monkeypatch.setattr(cpu_ops, "gguf_linear", lambda *a: kinds.append("head") or real_head(*a))
    ids, mask = left_pad(ROWS)
    T = 5
    with caplog.at_level(logging.INFO, logger="ms_dfkd"):
        new, _, logits = sample(model, ids, mask, T, greedy=True, eos_id=-1, graph=False, return_logits=True)
    interleaved = cpu_ops.gguf_loops() == "avx2"  # the layout the AVX2 loops read fastest
    assert f"each decoder layer as one C++ op, layers 0-0 and the LM head from the GGUF blocks " \
           f"({cpu_ops.gguf_loops()} loops{', interleaved by 8 rows' if interleaved else ''}); layers 1-1 from " \
           f"float32 weights" in caplog.text
    assert kinds[:3] == ["UInt8", "Float32", "head"] and len(kinds) == 3 * (T - 1)
    assert block_bytes == ({192, TINY["hidden_size"]} if interleaved else {20, TINY["hidden_size"]})  # wq: Q4_1
    for b, row in enumerate(ROWS):
        for t in range(T):
            ref = np_forward(w, cfg, np.array(row + list(new[b, :t])))[-1]
            np.testing.assert_allclose(logits[b, t], ref, rtol=1e-4, atol=1e-4, err_msg=f"row {b} step {t}")
    monkeypatch.undo()  # graph mode cannot parse the counting lambdas
    for graph in (False, True):
        floats = sample(model, ids, mask, T, greedy=True, eos_id=-1, graph=graph, gguf_blocks=False)[0]
        np.testing.assert_array_equal(sample(model, ids, mask, T, greedy=True, eos_id=-1, graph=graph)[0], floats)
    np.testing.assert_array_equal(new, floats)


def test_the_sampler_keeps_float32_weights_where_the_block_loops_are_slower():
    """The portable block loops are slower than float32 weights, and the AVX2 ones are not measured above 32 rows:
    there the fused steps read no blocks, and the reason is given."""
    from kernels import cpu_ops
    from ms_dfkd.models.llama_sampling import decode_blocks
    model = LlamaForCausalLM(LlamaConfig(**TINY), seed=4)
    model.gguf_blocks = {"model.embed_tokens.weight": Tensor(np.zeros((TINY["vocab_size"], 1, 34), np.uint8))}
    cpu_ops.use_gguf_loops("portable")
    try:
        blocks, head, message = decode_blocks(model)
    finally:
        cpu_ops.use_gguf_loops(None)
    assert blocks == () and head is None and "portable loops" in message
    if "avx2" in cpu_ops.available_gguf_loops():  # and the AVX2 loops above 32 rows
        cpu_ops.use_gguf_loops("avx2")
        try:
            assert "rows" not in decode_blocks(model, rows=32)[2]
            blocks, head, message = decode_blocks(model, rows=33)
        finally:
            cpu_ops.use_gguf_loops(None)
        assert blocks == () and head is None and "33 rows" in message
