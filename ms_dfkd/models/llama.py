"""Llama-family decoder (SmolLM2, Llama 2/3 layout; Qwen2 / Qwen2.5) in MindSpore.

Read top to bottom: config, RMSNorm, rotary embedding, grouped-query attention,
SwiGLU MLP, decoder layer, the stack, the causal-LM head, then the helper that
chooses which parameters train.

Qwen2 is this same network with three config values set: ``qkv_bias=True`` (a bias on the
q, k and v projections, none on o_proj), ``tie_word_embeddings=False`` (its own LM head, as
the Qwen2.5-Coder GGUF files have) and its rope base (``rope_theta=1e6``); HF's
modeling_qwen2.py differs from modeling_llama.py in nothing else that inference uses.

Parameter names follow Hugging Face ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj.weight``,
weights stored [out, in]) so that state dicts map one to one. Rotary embedding is the
"rotate half" form of HF; GGUF files store Q/K permuted for the adjacent-pair form and
``llama_weights.load_gguf_llama`` un-permutes them on load.

Precision: parameters are float32 (master weights). ``compute_dtype`` casts the matmul
inputs (float16/bfloat16 on GPU/Ascend); RMSNorm, the attention softmax and the logits
are always computed in float32.

Padding: prompts are left-padded in a batch. Positions come from the attention mask
(position = cumsum(mask) - 1), and padded keys are masked, so a left-padded row gives
the same logits at its real positions as the unpadded row. Logits at padded query
positions are finite but meaningless.

Two copies of the model in one graph (trained G and frozen G0) need distinct
Parameter names: call ``model.update_parameters_name("g0.")`` on one of them. State-dict
names (``parameters_and_names``) are structural and do not change.
"""
import math
from dataclasses import dataclass

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from kernels import cpu_ops

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
_MASK_VALUE = -1e9  # finite, so a fully masked (padded) query row gives no NaN
# Transposed-operand kernels: on CPU `x @ w.T` (ops.matmul / ops.dense) copies the
# transpose each call and is 10-20x slower than MatMul(transpose_b=True) on 2-D inputs.
_matmul_tb = ops.MatMul(transpose_b=True)
_bmm_tb = ops.BatchMatMul(transpose_b=True)


def cast(x, dtype):
    """astype only when needed: a same-dtype astype still copies in PyNative (whole weights per call)."""
    return x if x.dtype == dtype else x.astype(dtype)


def linear(x, w):
    """x [..., in] @ w[out, in].T -> [..., out] through one 2-D matmul."""
    return _matmul_tb(x.reshape(-1, x.shape[-1]), w).reshape(x.shape[:-1] + (w.shape[0],))


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    qkv_bias: bool = False             # Qwen2: q_proj, k_proj and v_proj have a bias
    compute_dtype: str = "float32"     # "float32" | "float16" | "bfloat16"
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 2              # SmolLM2's GGUF says pad = eos (<|im_end|>)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {self.compute_dtype!r}")

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


def _param(shape, name, std, rng):
    if std is None:  # norm weights start at one
        data = np.ones(shape, np.float32)
    elif rng is None:  # filled later by a loader: skip drawing 100M+ random numbers
        data = np.zeros(shape, np.float32)
    else:
        data = rng.normal(0.0, std, size=shape).astype(np.float32)
    return Parameter(Tensor(data), name=name)


class Linear(nn.Cell):
    """y = x @ W.T (+ b with bias=True); W is [out, in]; W and b are cast to the compute dtype.

    A random init draws the bias like the weight (HF starts it at zero), so tests see it."""

    def __init__(self, in_features, out_features, compute_dtype, std, rng, bias=False):
        super().__init__()
        self.weight = _param((out_features, in_features), "weight", std, rng)
        self.bias = _param((out_features,), "bias", std, rng) if bias else None
        self.compute_dtype = compute_dtype

    def construct(self, x):
        if self.bias is None:
            return linear(x, cast(self.weight, self.compute_dtype))
        # BiasAdd on the 2-D product, not a broadcasting add (its CPU index tables: see RMSNorm)
        y = _matmul_tb(x.reshape(-1, x.shape[-1]), cast(self.weight, self.compute_dtype))
        y = ops.bias_add(y, cast(self.bias, self.compute_dtype))
        return y.reshape(x.shape[:-1] + (y.shape[-1],))


class Embedding(nn.Cell):
    """Token table [V, H]; the model gathers rows itself (see LlamaModel.embed)."""

    def __init__(self, vocab_size, hidden_size, std, rng):
        super().__init__()
        self.weight = _param((vocab_size, hidden_size), "weight", std, rng)


class RMSNorm(nn.Cell):
    """x / sqrt(mean(x^2) + eps) * weight, in float32 (CPU has no fused RmsNorm kernel)."""

    def __init__(self, hidden_size, eps, compute_dtype):
        super().__init__()
        self.weight = _param((hidden_size,), "weight", None, None)
        self.eps = eps
        self.compute_dtype = compute_dtype

    def construct(self, x):
        x32 = cast(x, ms.float32)
        var = ops.mean(x32 * x32, -1, keep_dims=True)
        # explicit broadcast_to: MindSpore's CPU broadcasting Mul keeps index tables of about 4x
        # its output for the life of the compiled graph (2 GB per SmolLM2 forward at B=8, L=104)
        scale = ops.broadcast_to(ops.rsqrt(var + self.eps), x32.shape)
        return cast(x32 * scale * ops.broadcast_to(self.weight, x32.shape), self.compute_dtype)


def rope_angles(positions, inv_freq):
    """cos, sin [B, L, D] of integer positions [B, L] ("rotate half" layout: both halves share a frequency)."""
    angles = positions.astype(ms.float32).expand_dims(-1) * inv_freq  # [B, L, D/2]
    angles = ops.concat((angles, angles), -1)
    return ops.cos(angles), ops.sin(angles)


def rope_cos_sin(positions, inv_freq, n_heads, n_kv):
    """cos, sin for integer positions [B, L] ("rotate half" layout: both halves share a frequency),
    already broadcast to the query heads [B, n_heads, L, D] and the key heads [B, n_kv, L, D].

    Returns (cos_q, sin_q, cos_k, sin_k). They are broadcast once here and shared by every layer:
    a broadcasting multiply inside each layer costs persistent memory on MindSpore's CPU backend
    (see RMSNorm)."""
    b, l = positions.shape
    cos, sin = rope_angles(positions, inv_freq)
    cos, sin = cos.expand_dims(1), sin.expand_dims(1)                   # [B, 1, L, D]
    d = cos.shape[-1]
    q_shape, k_shape = (b, n_heads, l, d), (b, n_kv, l, d)
    return (ops.broadcast_to(cos, q_shape), ops.broadcast_to(sin, q_shape),
            ops.broadcast_to(cos, k_shape), ops.broadcast_to(sin, k_shape))


def apply_rope(x, cos, sin):
    """x [B, heads, L, D] with cos, sin of the same shape: x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1]."""
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    return cast(cast(x, ms.float32) * cos + cast(rotated, ms.float32) * sin, x.dtype)


def attention_bias(query_valid_keys, n_kv, n_rep):
    """Additive bias from a bool "may attend" mask [B, Lq, Lk] -> [B, n_kv, n_rep, Lq, Lk] (broadcast
    once per forward and shared by the layers, like the rotary tables)."""
    bias = (1.0 - query_valid_keys.astype(ms.float32)) * _MASK_VALUE
    b, lq, lk = bias.shape
    return ops.broadcast_to(bias.expand_dims(1).expand_dims(1), (b, n_kv, n_rep, lq, lk))


class LlamaAttention(nn.Cell):
    """Grouped-query attention. Query head h reads key/value head h // n_rep (HF repeat_kv order).

    The query heads of one KV group are stacked along the sequence axis, so one batched
    matmul per KV head serves the whole group and K/V are never copied n_rep times.
    """

    def __init__(self, cfg, cdt, rng):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.n_rep = self.n_heads // self.n_kv
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        h, d, std, qkv_bias = cfg.hidden_size, cfg.head_dim, cfg.initializer_range, cfg.qkv_bias
        self.q_proj = Linear(h, self.n_heads * d, cdt, std, rng, bias=qkv_bias)
        self.k_proj = Linear(h, self.n_kv * d, cdt, std, rng, bias=qkv_bias)
        self.v_proj = Linear(h, self.n_kv * d, cdt, std, rng, bias=qkv_bias)
        self.o_proj = Linear(self.n_heads * d, h, cdt, std, rng)

    def project(self, x, rope, rows=None):
        """x [B, L, H] -> q [B, n_heads, L, D], k, v [B, n_kv, L, D] with RoPE applied to q and k.
        rope = (cos_q, sin_q, cos_k, sin_k) from rope_cos_sin. rows = (start, n): queries for positions
        start .. start + n - 1 only (q [B, n_heads, n, D]); keys and values for all."""
        b, l, _ = x.shape
        cos_q, sin_q, xq, lq = rope[0], rope[1], x, l
        if rows is not None:
            s, lq = rows
            cos_q, sin_q, xq = cos_q[:, :, s:s + lq], sin_q[:, :, s:s + lq], x[:, s:s + lq]
        q = self.q_proj(xq).reshape(b, lq, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(b, l, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(b, l, self.n_kv, self.head_dim).transpose(0, 2, 1, 3)
        return apply_rope(q, cos_q, sin_q), apply_rope(k, rope[2], rope[3]), v

    def attend(self, q, k, v, bias):
        """q [B, n_heads, Lq, D]; k, v [B, n_kv, Lk, D]; bias [B, n_kv, n_rep, Lq, Lk] -> [B, Lq, n_heads*D]."""
        b, _, lq, d = q.shape
        lk = k.shape[2]
        qg = q.reshape(b, self.n_kv, self.n_rep * lq, d)
        scores = cast(_bmm_tb(qg, k), ms.float32) * self.scale
        scores = scores.reshape(b, self.n_kv, self.n_rep, lq, lk) + bias
        probs = cast(ops.softmax(scores, -1), v.dtype).reshape(b, self.n_kv, self.n_rep * lq, lk)
        out = ops.matmul(probs, v).reshape(b, self.n_heads, lq, d)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, lq, self.n_heads * d))


class LlamaMLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg, cdt, rng):
        super().__init__()
        h, i, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.gate_proj = Linear(h, i, cdt, std, rng)
        self.up_proj = Linear(h, i, cdt, std, rng)
        self.down_proj = Linear(i, h, cdt, std, rng)

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Cell):
    def __init__(self, cfg, cdt, rng):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cdt)
        self.self_attn = LlamaAttention(cfg, cdt, rng)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cdt)
        self.mlp = LlamaMLP(cfg, cdt, rng)

    def construct(self, x, rope, bias, cache_k=None, cache_v=None, write_slot=None):
        """Returns (x, k, v). Without a cache k, v are this call's keys/values [B, n_kv, L, D].

        With a cache (one-token decoding): the new key/value is written where
        ``write_slot`` ([1, 1, S, 1] bool) is true, attention reads the whole cache
        [B, n_kv, S, D], and the updated cache is returned. With a cache and no write_slot (a chunk
        after a cached prefix): the chunk's keys/values follow the cached ones, and both are returned.
        """
        q, k, v = self.self_attn.project(self.input_layernorm(x), rope)
        if cache_k is not None and write_slot is None:
            k = ops.concat((cache_k, k), 2)
            v = ops.concat((cache_v, v), 2)
        elif cache_k is not None:
            k = ops.where(write_slot, k, cache_k)
            v = ops.where(write_slot, v, cache_v)
        x = x + self.self_attn.attend(q, k, v, bias)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v

    def rows_only(self, x, rope, bias, rows):
        """``construct`` without a cache, its output only at positions rows = (start, n): [B, n, H]. The
        keys and values cover every position; the queries, the output projection and the MLP only those
        rows (the generator step needs the top layer's states at the sample's positions alone)."""
        s, n = rows
        q, k, v = self.self_attn.project(self.input_layernorm(x), rope, rows)
        x = x[:, s:s + n] + self.self_attn.attend(q, k, v, bias[:, :, :, s:s + n])
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_fused(self, x, cos, sin, key_mask, write_slot, cache_k, cache_v, blocks=None):
        """``construct``'s one-token step with a cache as one C++ op (kernels.cpu_ops.llama_decode_layer: CPU,
        float32, no gradient): x [B, H], cos/sin [B, D], key_mask [B, S] float, write_slot [S] int ->
        (x [B, H], cache_k, cache_v), the new key/value written into the caches where they are. ``blocks``:
        the 7 matrices (q, k, v, o, gate, up, down) as GGUF blocks in place of the float32 weights, or None."""
        return cpu_ops.llama_decode_layer(x, cos, sin, key_mask, write_slot, cache_k, cache_v,
                                          *self._fused_weights(blocks))

    def chunk_fused(self, x, cos, sin, key_mask, first_slot, cache_k, cache_v):
        """``construct`` over a chunk of tokens with a cache, as one C++ op (kernels.cpu_ops.llama_chunk_layer:
        CPU, float32, no gradient; the prompt's prefill): x [B, L, H], cos/sin [B, L, D], key_mask [B, S]
        float, first_slot [1] int (the chunk's first slot) -> (x [B, L, H], cache_k, cache_v). Padding
        (key_mask 0 at its slot) is skipped: its output is its input."""
        return cpu_ops.llama_chunk_layer(x, cos, sin, key_mask, first_slot, cache_k, cache_v, *self._fused_weights())

    def _fused_weights(self, blocks=None):
        """The C++ layer ops' weight arguments, from input_norm to eps."""
        attn, mlp = self.self_attn, self.mlp
        biases = tuple(ops.zeros((p.weight.shape[0],), ms.float32) if p.bias is None else p.bias
                       for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        if blocks is None:
            blocks = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                      mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
        return (self.input_layernorm.weight, blocks[0], blocks[1], blocks[2], blocks[3], biases[0], biases[1],
                biases[2], self.post_attention_layernorm.weight, blocks[4], blocks[5], blocks[6],
                self.input_layernorm.eps)


class LlamaModel(nn.Cell):
    """Embedding, decoder layers and the final norm."""

    def __init__(self, cfg, cdt, rng):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range, rng)
        self.layers = nn.CellList([LlamaDecoderLayer(cfg, cdt, rng) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cdt)
        inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
        self.inv_freq = Tensor(inv_freq.astype(np.float32))  # a constant, not a parameter
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.compute_dtype = cdt

    def embed(self, input_ids):
        return cast(ops.gather(self.embed_tokens.weight, input_ids, 0), self.compute_dtype)

    def rope_and_bias(self, attention_mask):
        """Rotary tables and the causal + padding bias of a whole (left- or right-padded) sequence."""
        mask = cast(attention_mask, ms.int32)
        positions = ops.relu(ops.cumsum(mask, 1) - 1)                  # first real token -> 0
        rope = rope_cos_sin(positions, self.inv_freq, self.n_heads, self.n_kv)
        l = mask.shape[1]
        causal = ops.tril(ops.ones((l, l), ms.int32)).expand_dims(0)    # [1, L, L]
        bias = attention_bias((causal * mask.expand_dims(1)) > 0, self.n_kv, self.n_heads // self.n_kv)
        return rope, bias

    def construct(self, inputs_embeds, attention_mask, start=0, stop=None, final_norm=True, rows=None):
        """inputs_embeds [B, L, H], attention_mask [B, L] (1 real, 0 pad) -> normed hidden [B, L, H].

        ``start``/``stop`` run only layers [start, stop) on inputs_embeds (then the states entering
        layer ``start``), and ``final_norm=False`` skips the norm: the driver runs the frozen bottom
        layers once and only the trained top ones per model (LlamaForCausalLM.trunk_states).
        ``rows`` = (start, n), python ints: the output at those positions only, [B, n, H]; the last
        layer computes nothing else (LlamaDecoderLayer.rows_only)."""
        rope, bias = self.rope_and_bias(attention_mask)
        x = cast(inputs_embeds, self.compute_dtype)
        stop = len(self.layers) if stop is None else stop
        for i, layer in enumerate(self.layers):
            if start <= i < stop:  # python ints: resolved while the graph compiles
                if rows is not None and i == stop - 1:
                    x = layer.rows_only(x, rope, bias, rows)
                else:
                    x, _, _ = layer(x, rope, bias)
        if rows is not None and start >= stop:  # no layer ran: the rows of the input
            x = x[:, rows[0]:rows[0] + rows[1]]
        return self.norm(x) if final_norm else x

    def prefill(self, input_ids, attention_mask, cache_len, steer=None, steer_layer=0, capture_layer=0, fused=False):
        """Full forward over a left-padded prompt [B, P]; returns (normed hidden [B, P, H], caches).

        caches is a tuple (k_0, v_0, k_1, v_1, ...) of [B, n_kv, cache_len, D] with the
        prompt's keys/values in slots [0, P) and zeros after. ``steer`` [B, 1, H], if given, is added
        to the states entering layer ``steer_layer`` at every position (the generator's label vectors).
        ``capture_layer`` > 0 also returns the states entering that layer, before any steer: (hidden,
        caches, states [B, P, H]), what ``LlamaForCausalLM.trunk_states`` gives for those positions.
        ``fused``: each layer as one C++ op over the real tokens only (LlamaDecoderLayer.chunk_fused; CPU,
        float32); the hidden states and captured states of padding are then the layer inputs passed through.
        """
        return self._prefill_layers(self.embed(input_ids), attention_mask, cache_len, 0, steer, steer_layer,
                                    capture_layer, fused)

    def prefill_from(self, states, attention_mask, cache_len, first_layer, steer=None, steer_layer=0, fused=False):
        """``prefill`` from the states entering layer ``first_layer`` (what its ``capture_layer`` hands out)
        rather than from token ids: only layers first_layer.. run, and the caches are theirs (k_first,
        v_first, ...). With the caches ``prefill`` gave for the layers below, they are ``prefill``'s caches to
        the bit: the sampler keeps the frozen layers' part of a shared prompt start across calls this way
        while the layers above train. ``steer`` as in ``prefill`` (steer_layer >= first_layer)."""
        return self._prefill_layers(states, attention_mask, cache_len, first_layer, steer, steer_layer, 0, fused)

    def _prefill_layers(self, x, attention_mask, cache_len, first_layer, steer, steer_layer, capture_layer, fused):
        p = x.shape[1]
        if fused:
            mask = cast(attention_mask, ms.int32)
            b = mask.shape[0]
            positions = ops.relu(ops.cumsum(mask, 1) - 1)
            key_mask = ops.concat((mask, ops.zeros((b, cache_len - p), ms.int32)), 1)
            empty = ops.zeros((b, self.n_kv, cache_len, self.head_dim), ms.float32)
            return self._chunk_fused(x, positions, key_mask, (empty,) * (2 * (len(self.layers) - first_layer)), 0,
                                     steer, steer_layer, capture_layer, first_layer)
        rope, bias = self.rope_and_bias(attention_mask)
        caches = ()
        captured = None
        for i, layer in enumerate(self.layers):
            if i < first_layer:  # python ints: resolved while the graph compiles
                continue
            if capture_layer and i == capture_layer:
                captured = x
            if steer is not None and i == steer_layer:
                x = x + cast(steer, x.dtype)
            x, k, v = layer(x, rope, bias)
            pad = ops.zeros((k.shape[0], k.shape[1], cache_len - p, k.shape[3]), k.dtype)
            caches = caches + (ops.concat((k, pad), 2), ops.concat((v, pad), 2))
        if capture_layer:
            return self.norm(x), caches, captured
        return self.norm(x), caches

    def prefill_after(self, input_ids, positions, key_mask, past, cache_len, steer=None, steer_layer=0,
                      capture_layer=0, fused=False):
        """Prefill a left-padded chunk [B, L] that follows cached keys/values ``past`` (k_0, v_0, ... of
        [B, n_kv, Lp, D]: a prompt prefix computed once for the rows that share it). positions [B, L] are
        the chunk's token positions; key_mask [B, Lp + L] (1 = real) covers prefix and chunk; ``steer`` as
        in ``prefill``. Returns (normed hidden [B, L, H], caches of [B, n_kv, cache_len, D]: the prefix in
        slots [0, Lp), the chunk in [Lp, Lp + L), zeros after), and the chunk's states entering layer
        ``capture_layer`` [B, L, H] when that is > 0 (as ``prefill``); ``fused`` as in ``prefill``."""
        l, lp = input_ids.shape[1], past[0].shape[2]
        if fused:
            b = input_ids.shape[0]
            key_mask = ops.concat((cast(key_mask, ms.int32), ops.zeros((b, cache_len - lp - l), ms.int32)), 1)
            tail = ops.zeros((b, self.n_kv, cache_len - lp, past[0].shape[3]), ms.float32)
            caches = tuple(ops.concat((cast(c, ms.float32), tail), 2) for c in past)
            return self._chunk_fused(self.embed(input_ids), positions, key_mask, caches, lp, steer, steer_layer,
                                     capture_layer)
        rope = rope_cos_sin(positions, self.inv_freq, self.n_heads, self.n_kv)
        # every chunk position may read the whole prefix and the chunk's positions up to its own
        causal = ops.concat((ops.ones((l, lp), ms.int32), ops.tril(ops.ones((l, l), ms.int32))), 1)
        bias = attention_bias((causal.expand_dims(0) * key_mask.expand_dims(1)) > 0, self.n_kv,
                              self.n_heads // self.n_kv)
        x = self.embed(input_ids)
        caches = ()
        captured = None
        for i, layer in enumerate(self.layers):
            if capture_layer and i == capture_layer:
                captured = x
            if steer is not None and i == steer_layer:
                x = x + cast(steer, x.dtype)
            x, k, v = layer(x, rope, bias, past[2 * i], past[2 * i + 1])
            pad = ops.zeros((k.shape[0], k.shape[1], cache_len - lp - l, k.shape[3]), k.dtype)
            caches = caches + (ops.concat((k, pad), 2), ops.concat((v, pad), 2))
        if capture_layer:
            return self.norm(x), caches, captured
        return self.norm(x), caches

    def _chunk_fused(self, x, positions, key_mask, caches, first_slot, steer, steer_layer, capture_layer,
                     first_layer=0):
        """Layers first_layer.. as C++ ops from x, the states entering layer first_layer [B, L, H]; caches
        (k, v per layer from first_layer) hold what the chunk attends to before first_slot."""
        cos, sin = rope_angles(positions, self.inv_freq)                   # [B, L, D]
        key_mask = key_mask.astype(ms.float32)
        first = ops.ones((1,), ms.int32) * first_slot
        new = ()
        captured = None
        for i, layer in enumerate(self.layers):
            if i < first_layer:
                continue
            if capture_layer and i == capture_layer:
                captured = x
            if steer is not None and i == steer_layer:
                x = x + cast(steer, x.dtype)
            j = 2 * (i - first_layer)
            x, k, v = layer.chunk_fused(x, cos, sin, key_mask, first, caches[j], caches[j + 1])
            new = new + (k, v)
        if capture_layer:
            return self.norm(x), new, captured
        return self.norm(x), new

    def decode_step(self, input_ids, positions, key_mask, write_slot, caches, steer=None, steer_layer=0,
                    capture_layer=0, fused=False, blocks=()):
        """One token per row: input_ids, positions [B, 1]; key_mask [B, S] (1 = readable slot,
        including the slot being written); write_slot [S] bool; ``steer`` and ``capture_layer`` as in
        ``prefill``. ``fused``: each layer as one C++ op (LlamaDecoderLayer.decode_fused; CPU, float32), the
        first len(blocks) / 7 layers with their matrices from ``blocks`` (GGUF blocks, 7 a layer); it writes
        the new keys and values into the caller's ``caches`` where they are (float32) and returns () in
        their place. Returns (hidden [B, 1, H], caches[, the states entering capture_layer [B, 1, H]])."""
        if fused:
            return self._decode_step_fused(input_ids, positions, key_mask, write_slot, caches, steer, steer_layer,
                                           capture_layer, blocks)
        rope = rope_cos_sin(positions, self.inv_freq, self.n_heads, self.n_kv)
        bias = attention_bias(key_mask.expand_dims(1) > 0, self.n_kv, self.n_heads // self.n_kv)
        slot = write_slot.reshape(1, 1, -1, 1)
        x = self.embed(input_ids)
        new = ()
        captured = None
        for i, layer in enumerate(self.layers):
            if capture_layer and i == capture_layer:
                captured = x
            if steer is not None and i == steer_layer:
                x = x + cast(steer, x.dtype)
            x, k, v = layer(x, rope, bias, caches[2 * i], caches[2 * i + 1], slot)
            new = new + (k, v)
        if capture_layer:
            return self.norm(x), new, captured
        return self.norm(x), new

    def _decode_step_fused(self, input_ids, positions, key_mask, write_slot, caches, steer, steer_layer,
                           capture_layer, blocks):
        b = input_ids.shape[0]
        cos, sin = rope_angles(positions, self.inv_freq)                   # [B, 1, D]
        cos, sin = cos.reshape(b, -1), sin.reshape(b, -1)
        key_mask = key_mask.astype(ms.float32)
        write_slot = write_slot.astype(ms.int32)
        x = self.embed(input_ids).reshape(b, -1)
        captured = None
        for i, layer in enumerate(self.layers):
            if capture_layer and i == capture_layer:
                captured = x.expand_dims(1)
            if steer is not None and i == steer_layer:
                x = x + cast(steer, x.dtype).reshape(b, -1)
            if 7 * i < len(blocks):  # python ints: resolved while the graph compiles
                x, _, _ = layer.decode_fused(x, cos, sin, key_mask, write_slot, caches[2 * i], caches[2 * i + 1],
                                             blocks[7 * i:7 * i + 7])
            else:
                x, _, _ = layer.decode_fused(x, cos, sin, key_mask, write_slot, caches[2 * i], caches[2 * i + 1])
        # the caches were written where they are: returning them would copy them out of the graph (5 ms a step)
        if capture_layer:
            return self.norm(x.expand_dims(1)), (), captured
        return self.norm(x.expand_dims(1)), ()


class LlamaForCausalLM(nn.Cell):
    """Causal LM. ``construct(input_ids=None, inputs_embeds=None, attention_mask=None)`` -> float32 logits [B, L, V].

    Give either token ids or embeddings (e.g. soft embeddings ŷ·E); attention_mask
    defaults to all ones. ``hidden_states`` returns the last normed hidden states and
    ``lm_head_weight`` the [V, H] output matrix so that a fused linear kernel can skip
    the logits. ``seed`` makes the random init reproducible; ``init_weights=False``
    leaves zeros for a loader to overwrite (fast for 100M+ parameters).
    """

    def __init__(self, config, seed=0, init_weights=True):
        super().__init__()
        self.config = config
        cdt = _DTYPES[config.compute_dtype]
        rng = np.random.default_rng(seed) if init_weights else None
        self.model = LlamaModel(config, cdt, rng)
        self.tie_word_embeddings = config.tie_word_embeddings
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, cdt, config.initializer_range, rng)
        self.compute_dtype = cdt

    def get_input_embeddings(self):
        """The [V, H] token table (a Parameter), as the encoders' get_input_embeddings."""
        return self.model.embed_tokens.weight

    def lm_head_weight(self):
        """[V, H] output projection (the embedding table itself when tied)."""
        if self.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def logits_from_hidden(self, hidden):
        return cast(linear(hidden, cast(self.lm_head_weight(), self.compute_dtype)), ms.float32)

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        """Last normed hidden states [B, L, H] (compute dtype)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.model.embed(input_ids)
        if attention_mask is None:
            attention_mask = ops.ones(inputs_embeds.shape[:2], ms.int32)
        return self.model(inputs_embeds, attention_mask)

    def trunk_states(self, input_ids, attention_mask, n_top):
        """The states entering the top ``n_top`` decoder layers [B, L, H]: what every copy of this model
        that differs only in its top layers (the trained generator and the frozen G_θ0 with
        ``generator.trainable top_k``) computes alike, so it runs once."""
        stop = self.config.num_hidden_layers - n_top
        return self.model(self.model.embed(input_ids), attention_mask, 0, stop, False)

    def top_hidden_states(self, trunk, attention_mask, n_top, rows=None):
        """The top ``n_top`` layers and the final norm over ``trunk_states``: normed hidden [B, L, H];
        equal to ``hidden_states`` of the same ids. rows = (start, n): positions start .. start + n - 1
        only, [B, n, H], with the top layer computing only those (LlamaModel.construct)."""
        return self.model(trunk, attention_mask, self.config.num_hidden_layers - n_top, rows=rows)

    def construct(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        return self.logits_from_hidden(self.hidden_states(input_ids, inputs_embeds, attention_mask))


TRAIN_MODES = ("all", "top_k", "head_norms", "norms", "none")


def set_trainable(model, mode="all", k=None):
    """Choose which generator parameters train by setting ``requires_grad``; returns them.

    mode:
      "all"        every parameter.
      "top_k"      the last ``k`` decoder layers and the final norm (the cheap, common choice).
      "head_norms" the LM head and every RMSNorm weight. With tied embeddings the LM head
                   IS the input embedding table, so that table trains too.
      "norms"      only the RMSNorm weights.
      "none"       nothing (a frozen copy such as G_θ0).
    Use the returned list (or ``model.trainable_params()``) for the optimizer and ms.grad.
    """
    if mode not in TRAIN_MODES:
        raise ValueError(f"unknown trainable mode {mode!r}; choose one of {TRAIN_MODES}")
    n_layers = model.config.num_hidden_layers
    if mode == "top_k":
        if k is None or not 1 <= k <= n_layers:
            raise ValueError(f"mode 'top_k' needs 1 <= k <= {n_layers}, got k={k!r}")
        top = {f"model.layers.{i}." for i in range(n_layers - k, n_layers)}
    head_name = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    for name, p in model.parameters_and_names():
        if mode == "all":
            on = True
        elif mode == "none":
            on = False
        elif mode == "top_k":
            on = name == "model.norm.weight" or any(name.startswith(t) for t in top)
        elif mode == "head_norms":
            on = name == head_name or name.endswith("layernorm.weight") or name == "model.norm.weight"
        else:  # norms
            on = name.endswith("layernorm.weight") or name == "model.norm.weight"
        p.requires_grad = on
    return model.trainable_params()


# the name the task brief used
trainable_parameter_filter = set_trainable
