"""Numpy reference of the Gumbel-softmax soft embedding (forward and backward). Tests only.

Everything is computed in float64 from float32 inputs, except the two places
where the fast paths must agree bit for bit with it: the Gumbel noise (float32,
``gumbel_np``) and the hard-mode argmax, taken over ``float32(logits) + g`` in
float32 so that a near-tie is broken the same way by every path.

Definitions (N tokens, V vocabulary, T = concat(tables, axis=1) of shape [V, sum H_i]):
    g      = gumbel_np(seed, row_offset + arange(N), arange(V))
    y      = softmax((logits + g) / tau)                   [N, V]
    soft   = y @ T                                          [N, sum H]
    k      = ids if given else argmax(logits + g)           [N]
    hard   = T[k]                                           [N, sum H]
    value  = hard if hard mode else soft
Backward for an upstream gradient dout [N, sum H]:
    dlogits = y * (dout @ T^T - rowsum(soft * dout)) / tau      (both modes: straight-through)
    dT      = y^T @ dout (soft mode) or one_hot(k)^T @ dout (hard mode, the gradient of the
              gathered value itself)
"""
import numpy as np

from kernels.gumbel_noise import gumbel_np


def _as64(x):
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def gumbel_for(seed, n_rows, vocab, row_offset=0):
    return gumbel_np(seed, np.arange(n_rows) + row_offset, np.arange(vocab))


def sample_ids(logits, seed, row_offset=0):
    """Gumbel-max token ids, argmax over float32(logits) + g (computed in float32)."""
    logits = np.asarray(logits, dtype=np.float32)
    g = gumbel_for(seed, logits.shape[0], logits.shape[1], row_offset)
    return np.argmax(logits + g, axis=1)


def soft_probs(logits, seed, tau, row_offset=0):
    logits = _as64(logits)
    g = gumbel_for(seed, logits.shape[0], logits.shape[1], row_offset).astype(np.float64)
    z = (logits + g) / tau
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def soft_embedding_forward(logits, tables, seed, tau, hard=True, ids=None, row_offset=0):
    """Returns (value, soft, k); value is [N, sum H] float64."""
    table = np.concatenate([_as64(t) for t in tables], axis=1)
    y = soft_probs(logits, seed, tau, row_offset)
    soft = y @ table
    k = np.asarray(ids) if ids is not None else sample_ids(logits, seed, row_offset)
    value = table[k] if hard else soft
    return value, soft, k


def soft_embedding_backward(logits, tables, seed, tau, dout, hard=True, ids=None, row_offset=0):
    """Returns (dlogits [N, V], [dtable_i [V, H_i]]) in float64."""
    table = np.concatenate([_as64(t) for t in tables], axis=1)
    dout = np.asarray(dout, dtype=np.float64)
    y = soft_probs(logits, seed, tau, row_offset)
    soft = y @ table
    dy = dout @ table.T
    dlogits = y * (dy - (soft * dout).sum(axis=1, keepdims=True)) / tau
    if hard:
        k = np.asarray(ids) if ids is not None else sample_ids(logits, seed, row_offset)
        dtable = np.zeros_like(table)
        np.add.at(dtable, k, dout)
    else:
        dtable = y.T @ dout
    splits = np.cumsum([np.shape(t)[1] for t in tables])[:-1]
    return dlogits, np.split(dtable, splits, axis=1)


def fused_linear_forward(hidden, lm_head, tables, seed, tau, hard=True, ids=None, row_offset=0):
    logits = _as64(hidden) @ _as64(lm_head).T
    # The fast paths compute the logits in float32; the argmax must see float32 logits too.
    return soft_embedding_forward(logits.astype(np.float32), tables, seed, tau, hard, ids, row_offset)


def fused_linear_backward(hidden, lm_head, tables, seed, tau, dout, hard=True, ids=None, row_offset=0):
    """Returns (dhidden [N, Hg], dlm_head [V, Hg]); the tables get no gradient on this path."""
    h, w = _as64(hidden), _as64(lm_head)
    logits = (h @ w.T).astype(np.float32)
    dlogits, _ = soft_embedding_backward(logits, tables, seed, tau, dout, hard, ids, row_offset)
    return dlogits @ w, dlogits.T @ h
