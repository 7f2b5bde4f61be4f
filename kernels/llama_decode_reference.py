"""Numpy reference of kernels.cpu_ops.llama_decode_layer and llama_chunk_layer, in float64. Tests only.

One Llama decoder layer (models/llama.py) for one new token per row against a KV cache (each weight
matrix float32, or GGUF blocks, dequantised by gguf_blocks_reference):
    h = rms_norm(x) * input_norm;   q, k, v = h Wq^T + bq, h Wk^T + bk, h Wv^T + bv
    q, k = rope(q), rope(k)          rope(t) = t * cos + [-t2, t1] * sin per head of D (t1, t2 its halves)
    cache[:, :, slot] = k, v;        query head j reads key/value head j // (n_heads / n_kv)
    a = softmax(q . keys / sqrt(D) over the readable slots) . values
    x1 = x + a Wo^T;                 x_out = x1 + (silu(h2 Wg^T) * (h2 Wu^T)) Wd^T,  h2 = rms_norm(x1) * post_norm
"""
import numpy as np

from kernels.gguf_blocks_reference import dequantize


def _rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(t, cos, sin):
    """t [B, heads, D]; cos, sin [B, D]."""
    half = t.shape[-1] // 2
    rotated = np.concatenate([-t[..., half:], t[..., :half]], -1)
    return t * cos[:, None] + rotated * sin[:, None]


def llama_decode_layer(x, cos, sin, key_mask, write_slot, cache_k, cache_v, input_norm, wq, wk, wv, wo, bq, bk, bv,
                       post_norm, w_gate, w_up, w_down, eps):
    def f(a):  # float64; GGUF blocks (uint8 [out, in / 32, bytes], either layout) as the weights they stand for
        a = np.asarray(a)
        return dequantize(a).astype(np.float64) if a.dtype == np.uint8 and a.ndim == 3 else a.astype(np.float64)

    x, cos, sin, cache_k, cache_v = f(x), f(cos), f(sin), f(cache_k).copy(), f(cache_v).copy()
    b, n_kv, s, d = cache_k.shape
    n_heads = f(wq).shape[0] // d
    h = _rms_norm(x, f(input_norm), eps)
    q = (h @ f(wq).T + f(bq)).reshape(b, n_heads, d)
    k = (h @ f(wk).T + f(bk)).reshape(b, n_kv, d)
    v = (h @ f(wv).T + f(bv)).reshape(b, n_kv, d)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    slot = int(np.flatnonzero(np.asarray(write_slot))[0])
    cache_k[:, :, slot], cache_v[:, :, slot] = k, v
    readable = np.asarray(key_mask) > 0                                        # [B, S]
    keys = np.repeat(cache_k, n_heads // n_kv, 1)                              # [B, n_heads, S, D]
    values = np.repeat(cache_v, n_heads // n_kv, 1)
    scores = np.einsum("bhd,bhsd->bhs", q, keys) / np.sqrt(d)
    scores = np.where(readable[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    a = np.einsum("bhs,bhsd->bhd", weights, values).reshape(b, n_heads * d)
    x1 = x + a @ f(wo).T
    h2 = _rms_norm(x1, f(post_norm), eps)
    g, u = h2 @ f(w_gate).T, h2 @ f(w_up).T
    return x1 + (g / (1.0 + np.exp(-g)) * u) @ f(w_down).T, cache_k, cache_v


def llama_chunk_layer(x, cos, sin, key_mask, first_slot, cache_k, cache_v, input_norm, wq, wk, wv, wo, bq, bk, bv,
                      post_norm, w_gate, w_up, w_down, eps):
    """The layer for L tokens per row: x [B, L, H], cos/sin [B, L, D]; token j writes slot first_slot + j and
    reads the readable slots (key_mask) up to its own. Padding (key_mask 0 at its slot): its output is its
    input and its slots keep the cache's values, as the C++ kernel does."""
    def f(a):
        a = np.asarray(a)
        return dequantize(a).astype(np.float64) if a.dtype == np.uint8 and a.ndim == 3 else a.astype(np.float64)

    x, cos, sin, cache_k, cache_v = f(x), f(cos), f(sin), f(cache_k).copy(), f(cache_v).copy()
    b, n_kv, s, d = cache_k.shape
    length = x.shape[1]
    w0 = int(np.asarray(first_slot).reshape(-1)[0])
    n_heads = f(wq).shape[0] // d
    real = np.asarray(key_mask)[:, w0:w0 + length] > 0                          # [B, L]
    h = _rms_norm(x, f(input_norm), eps)
    q = (h @ f(wq).T + f(bq)).reshape(b, length, n_heads, d)
    k = (h @ f(wk).T + f(bk)).reshape(b, length, n_kv, d)
    v = (h @ f(wv).T + f(bv)).reshape(b, length, n_kv, d)
    for j in range(length):
        q[:, j], k[:, j] = _rope(q[:, j], cos[:, j], sin[:, j]), _rope(k[:, j], cos[:, j], sin[:, j])
        cache_k[:, :, w0 + j] = np.where(real[:, j, None, None], k[:, j], cache_k[:, :, w0 + j])
        cache_v[:, :, w0 + j] = np.where(real[:, j, None, None], v[:, j], cache_v[:, :, w0 + j])
    keys = np.repeat(cache_k, n_heads // n_kv, 1)                              # [B, n_heads, S, D]
    values = np.repeat(cache_v, n_heads // n_kv, 1)
    scores = np.einsum("blhd,bhsd->blhs", q, keys) / np.sqrt(d)
    up_to_own = np.arange(s)[None, None, :] <= w0 + np.arange(length)[None, :, None]   # [1, L, S]
    readable = (np.asarray(key_mask)[:, None, :] > 0) & up_to_own
    scores = np.where(readable[:, :, None], scores, -np.inf)
    scores = np.where(real[:, :, None, None], scores, 0.0)                      # padding: no row to normalise
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    a = np.einsum("blhs,bhsd->blhd", weights, values).reshape(b, length, n_heads * d)
    x1 = x + a @ f(wo).T
    h2 = _rms_norm(x1, f(post_norm), eps)
    g, u = h2 @ f(w_gate).T, h2 @ f(w_up).T
    out = x1 + (g / (1.0 + np.exp(-g)) * u) @ f(w_down).T
    return np.where(real[..., None], out, x), cache_k, cache_v
