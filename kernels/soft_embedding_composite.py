"""Gumbel-softmax soft embedding as MindSpore ops, chunked so that no N x V temporary exists.

soft_embedding: the vocabulary is walked in chunks with an online softmax (running max, running sum,
running y @ T), so the forward holds an [N, chunk] slice at a time. The backward regenerates the Gumbel
noise of each chunk from the seed (it is never stored) and needs only the soft output and the
log-sum-exp saved by the forward:
    dlogits = y * (dout @ T^T - rowsum(soft * dout)) / tau.

fused_linear_soft_embedding: the tokens are walked in chunks; each chunk computes its [rows, V] logits
from the hidden states and the LM head, embeds them, and drops them. The backward recomputes them, so
the N x V logits and their gradient never exist in full.

Both are ``nn.Cell`` with a ``bprop`` method, which is how MindSpore takes a custom backward in
GRAPH_MODE as well as PyNative. The chunk loops are Python loops over static shapes (unrolled in graph
mode). Forward and backward compute in float32 whatever the input dtype.
"""
import functools

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ms_dfkd.gumbel import MASK32, MIX_MULT, U_MAX, U_MIN, mix32_np

# The upper clamp bound as a float32 value, as gumbel_np applies it.
_U_MAX32 = float(np.float32(U_MAX))
assert U_MIN < 2.0 ** -24
# One chunk holds about this many elements ([rows, cols]); the loop is unrolled in graph mode, so the
# number of chunks is also capped.
CHUNK_ELEMENTS = 1 << 22
MAX_CHUNKS = 32


# The chunkers are lru_cache objects, which graph mode runs in Python (their shapes are constants).
@functools.lru_cache(maxsize=None)
def vocab_chunks(n_rows, vocab):
    """((start, stop), ...) over the vocabulary: about CHUNK_ELEMENTS per chunk, at most MAX_CHUNKS chunks."""
    size = min(vocab, max(CHUNK_ELEMENTS // max(n_rows, 1), -(-vocab // MAX_CHUNKS), 1))
    return tuple((start, min(start + size, vocab)) for start in range(0, vocab, size))


@functools.lru_cache(maxsize=None)
def row_chunks(n_rows, vocab):
    """((start, stop), ...) over the tokens, for the fused-linear op: [rows, V] logits per chunk."""
    size = min(n_rows, max(CHUNK_ELEMENTS // max(vocab, 1), -(-n_rows // (4 * MAX_CHUNKS)), 1))
    return tuple((start, min(start + size, n_rows)) for start in range(0, n_rows, size))


def mix32(x):
    """The hash of ms_dfkd.gumbel.mix32_ms. The noise below is this module's own rather than gumbel_ms
    for two reasons: its logs run in float64 (1 float32 ulp from gumbel_np instead of about 4e-6), and
    the column hashes are constants (graph mode's arange over constant bounds fails to compile inside a
    bprop). x: int64 tensor of values in [0, 2**32)."""
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, 16))
    x = ops.bitwise_and(x * MIX_MULT, MASK32)
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, 16))
    x = ops.bitwise_and(x * MIX_MULT, MASK32)
    return ops.bitwise_xor(x, ops.bitwise_right_shift(x, 16))


@functools.lru_cache(maxsize=128)
def _column_hashes(start, stop):
    """mix32(col) for col in start..stop-1, as a constant [1, C] int64 tensor (graph mode's arange with
    constant bounds fails to compile, and the hash of a column never changes)."""
    return ms.Tensor(mix32_np(np.arange(start, stop)).reshape(1, -1), ms.int64)


@functools.lru_cache(maxsize=64)
def _row_ids(n_rows, row_offset):
    return ms.Tensor((np.arange(n_rows, dtype=np.int64) + row_offset) & MASK32, ms.int64)


def gumbel(keys, start, stop):
    """Gumbel noise [N, stop - start] of ms_dfkd.gumbel for row keys [N] and columns start..stop-1.

    The logs run in float64: MindSpore's float32 log on CPU in graph mode is off by up to 5e-6 and
    returns 0 just below 1, which turns into errors of 5e-3 in -log(-log u). The float64 result rounded
    to float32 is within one float32 ulp of gumbel_np. The lower clamp of gumbel_np (U_MIN = 1e-10)
    never binds, since u >= 2**-24, so only the upper one is applied."""
    h = mix32(ops.bitwise_xor(keys.reshape(-1, 1), _column_hashes(start, stop)))
    u = (ops.bitwise_right_shift(h, 9).astype(ms.float64) + 0.5) * (2.0 ** -23)
    u = ops.minimum(u, _U_MAX32)
    return (-ops.log(-ops.log(u))).astype(ms.float32)


def log_f64(x):
    """Accurate log of a float32 tensor (see gumbel)."""
    return ops.log(x.astype(ms.float64)).astype(ms.float32)


def row_keys(seed, n_rows, row_offset=0):
    """int64 [N]: the per-row hash mix(mix(seed) ^ row) of ms_dfkd.gumbel.row_keys_np."""
    if isinstance(seed, int):
        seed = ms.Tensor(seed & MASK32, ms.int64)
    seed = ops.bitwise_and(seed.astype(ms.int64).reshape(1), MASK32)
    return mix32(ops.bitwise_xor(mix32(seed), _row_ids(n_rows, row_offset)))


def _table_slice(tables, start, stop):
    return ops.concat([t[start:stop].astype(ms.float32) for t in tables], 1)


def _split_columns(x, tables):
    parts, start = [], 0
    for tbl in tables:
        parts.append(x[:, start:start + tbl.shape[1]])
        start += tbl.shape[1]
    return parts


def _gather_rows(tables, k):
    return ops.concat([ops.gather(t, k, 0).astype(ms.float32) for t in tables], 1)


def _scatter_rows(tables, k, dvalue):
    """one_hot(k)^T @ dvalue, split per table: the gradient of the gathered rows."""
    grads = []
    for tbl, d in zip(tables, _split_columns(dvalue, tables)):
        zero = ops.zeros(tbl.shape, ms.float32)
        grads.append(ops.tensor_scatter_add(zero, k.reshape(-1, 1), d).astype(tbl.dtype))
    return grads


def _embed_forward(logits, keys, tables, tau, want_argmax):
    """Online softmax over vocabulary chunks. Returns (soft [N, sum H], lse [N, 1], argmax [N] int32)."""
    n, vocab = logits.shape
    width = sum([t.shape[1] for t in tables])
    inv_tau = 1.0 / tau
    run_max = ops.full((n, 1), float("-inf"), dtype=ms.float32)
    run_sum = ops.zeros((n, 1), ms.float32)
    acc = ops.zeros((n, width), ms.float32)
    best = ops.full((n,), float("-inf"), dtype=ms.float32)
    best_k = ops.zeros((n,), ms.int32)
    for start, stop in vocab_chunks(n, vocab):
        x = logits[:, start:stop].astype(ms.float32) + gumbel(keys, start, stop)
        if want_argmax:
            # Argmax of logits + g itself (not of its tau-scaled copy) so ties break as in the reference.
            chunk_best, chunk_k = ops.max(x, axis=1)
            better = chunk_best > best
            best = ops.where(better, chunk_best, best)
            best_k = ops.where(better, chunk_k.astype(ms.int32) + start, best_k)
        z = x * inv_tau
        new_max = ops.maximum(run_max, z.max(axis=1, keepdims=True))
        rescale = ops.exp(run_max - new_max)
        p = ops.exp(z - new_max)
        run_sum = run_sum * rescale + p.sum(axis=1, keepdims=True)
        acc = acc * rescale + ops.matmul(p, _table_slice(tables, start, stop))
        run_max = new_max
    return acc / run_sum, run_max + log_f64(run_sum), best_k


def _embed_backward(logits, keys, tables, tau, lse, soft, dout, want_table_grad):
    """dlogits [N, V] (float32) and, if asked, y^T @ dout [V, sum H]."""
    n, vocab = logits.shape
    inv_tau = 1.0 / tau
    delta = (soft * dout).sum(axis=1, keepdims=True)
    dlogits, dtable = [], []
    for start, stop in vocab_chunks(n, vocab):
        x = logits[:, start:stop].astype(ms.float32) + gumbel(keys, start, stop)
        y = ops.exp(x * inv_tau - lse)
        table = _table_slice(tables, start, stop)
        dy = ops.matmul(dout, table.T)
        dlogits.append((y * (dy - delta) * inv_tau).astype(logits.dtype))
        if want_table_grad:
            dtable.append(ops.matmul(y.T, dout))
    return ops.concat(dlogits, 1), (ops.concat(dtable, 0) if want_table_grad else None)


class SoftEmbedding(nn.Cell):
    """(logits [N, V], row keys [N], tables (tuple of [V, H_i]), ids [N] or None) -> (value, soft, lse, k)."""

    def __init__(self, tau, hard, grad_tables):
        super().__init__()
        self.tau = float(tau)
        self.hard = hard
        self.grad_tables = grad_tables

    def construct(self, logits, keys, tables, ids):
        want_argmax = self.hard and ids is None
        soft, lse, k = _embed_forward(logits, keys, tables, self.tau, want_argmax)
        if ids is not None:
            k = ids.astype(ms.int32)
        value = _gather_rows(tables, k) if self.hard else soft
        return value.astype(tables[0].dtype), soft, lse, k

    def bprop(self, logits, keys, tables, ids, out, dout):
        _, soft, lse, k = out
        # Straight-through: in hard mode the value's gradient is taken as that of the soft y.
        dvalue = dout[0].astype(ms.float32) + dout[1]
        want_soft_table_grad = self.grad_tables and not self.hard
        dlogits, dtable = _embed_backward(logits, keys, tables, self.tau, lse, soft, dvalue, want_soft_table_grad)
        dtables = []
        if want_soft_table_grad:
            for tbl, d in zip(tables, _split_columns(dtable, tables)):
                dtables.append(d.astype(tbl.dtype))
        elif self.grad_tables:
            dtables = _scatter_rows(tables, k, dout[0].astype(ms.float32))
        else:
            for tbl in tables:
                dtables.append(ops.zeros_like(tbl))
        dids = None if ids is None else ops.zeros_like(ids)
        return dlogits, ops.zeros_like(keys), tuple(dtables), dids


class FusedLinearSoftEmbedding(nn.Cell):
    """(hidden [N, Hg], lm_head [V, Hg], row keys, tables, ids or None) -> (value, soft, lse, k).

    The tables get no gradient on this path (they are frozen where it is used)."""

    def __init__(self, tau, hard):
        super().__init__()
        self.tau = float(tau)
        self.hard = hard

    def construct(self, hidden, lm_head, keys, tables, ids):
        n = hidden.shape[0]
        vocab = lm_head.shape[0]
        weight = lm_head.astype(ms.float32)
        want_argmax = self.hard and ids is None
        softs, lses, ks = [], [], []
        for start, stop in row_chunks(n, vocab):
            logits = ops.matmul(hidden[start:stop].astype(ms.float32), weight.T)
            soft, lse, k = _embed_forward(logits, keys[start:stop], tables, self.tau, want_argmax)
            softs.append(soft)
            lses.append(lse)
            ks.append(k)
        soft, lse, k = ops.concat(softs, 0), ops.concat(lses, 0), ops.concat(ks, 0)
        if ids is not None:
            k = ids.astype(ms.int32)
        value = _gather_rows(tables, k) if self.hard else soft
        return value.astype(tables[0].dtype), soft, lse, k

    def bprop(self, hidden, lm_head, keys, tables, ids, out, dout):
        _, soft, lse, _ = out
        dvalue = dout[0].astype(ms.float32) + dout[1]
        n = hidden.shape[0]
        vocab = lm_head.shape[0]
        weight = lm_head.astype(ms.float32)
        dhidden, dweight = [], None
        for start, stop in row_chunks(n, vocab):
            h = hidden[start:stop].astype(ms.float32)
            logits = ops.matmul(h, weight.T)
            dlogits, _ = _embed_backward(logits, keys[start:stop], tables, self.tau, lse[start:stop],
                                         soft[start:stop], dvalue[start:stop], False)
            dhidden.append(ops.matmul(dlogits, weight))
            dw = ops.matmul(dlogits.T, h)
            dweight = dw if dweight is None else dweight + dw
        dtables = []
        for tbl in tables:
            dtables.append(ops.zeros_like(tbl))
        dids = None if ids is None else ops.zeros_like(ids)
        return (ops.concat(dhidden, 0).astype(hidden.dtype), dweight.astype(lm_head.dtype),
                ops.zeros_like(keys), tuple(dtables), dids)
