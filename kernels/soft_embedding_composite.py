"""Gumbel-softmax soft embedding as MindSpore ops, in slabs of rows so that no N x V temporary exists.

Both ops walk the tokens in slabs of [rows, V] (about CHUNK_ELEMENTS values each): a slab's noise,
probabilities and gradients live only while it is processed. Every output is at most [N, V] (the
logits' gradient, which the op must return) or [N, sum H].

soft_embedding: forward, per slab, x = logits + g, then k = argmax(x) (hard mode: the value is the
gathered rows, no softmax is needed) or y = softmax(x / tau) and soft = y @ T. The backward regenerates
the noise from the seed (it is never stored) and recomputes y:
    dlogits = y * (dout @ T^T - rowsum(soft * dout)) / tau
fused_linear_soft_embedding: the same, with each slab's logits computed from the hidden states and the
LM head and recomputed in the backward, so the N x V logits and their gradient never exist at all.

Why slabs of rows rather than of columns: full-width rows let MindSpore's fused softmax do the
normalisation, and on CPU MindSpore is slow at what column chunks need (concatenating along the
vocabulary axis costs ~10x an add, as does broadcasting a [rows, 1] column across a row); per-row
values are therefore tiled to full width before use.

Both are ``nn.Cell`` with a ``bprop`` method, which is how MindSpore takes a custom backward in
GRAPH_MODE as well as PyNative. The slab loops are Python loops over static shapes (unrolled in graph
mode, hence MAX_CHUNKS). Forward and backward compute in float32 whatever the input dtype.
"""
import functools

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from ms_dfkd.gumbel import MASK32, MIX_MULT, U_MAX, U_MIN, mix32_np

# The upper clamp bound as a float32 value, as gumbel_np applies it.
_U_MAX32 = float(np.float32(U_MAX))
assert U_MIN < 2.0 ** -24
# One slab holds about this many values. The fused-linear op's point is memory, so its slabs are
# small; on CPU each slab also re-reads the LM head in matmuls with few rows, so its time grows
# as slabs shrink. Measured at N=4096, V=49152, Hg=576 on 2 cores before the grouped backward below
# (peak above inputs / time, against 2864 MB / 23 s for logits + the composite): 1M values 268 MB /
# 66 s, 2M 334 MB / 40 s, 4M 509 MB / 30 s, 8M 785 MB / 26 s (times vary by a third between runs).
# The slab loops are unrolled in graph mode, so their number is capped.
CHUNK_ELEMENTS = 1 << 22
FUSED_CHUNK_ELEMENTS = 1 << 20
MAX_CHUNKS = 256
# The fused backward computes dhidden = dlogits @ lm_head and dlm_head += dlogits^T @ h once per this
# many slabs, not once per slab: with slabs of ~20 rows those GEMMs and the read-modify-write of the
# [V, Hg] sum are memory-bound, and per slab they took about half the backward. A group's dlogits
# (FUSED_CHUNK_ELEMENTS values a slab) are held in one buffer, so 8 adds about 32 MB; the dlm_head sum
# then goes in 16 vocabulary blocks, not 8, to stay under the 10% memory target (286 MB at N=4096,
# V=49152, Hg=576: 298 MB with 8 blocks, 274-277 MB with 16). Times: kernels/README.md.
FUSED_DWEIGHT_GROUP = 8

# Primitive instances: inside a bprop, graph mode fails to compile some functional wrappers
# (ops.tile, ops.clamp, ops.arange: "The func graph is empty").
_matmul = ops.MatMul()
_matmul_tb = ops.MatMul(transpose_b=True)
_matmul_ta = ops.MatMul(transpose_a=True)
_tile = ops.Tile()
_softmax = ops.Softmax(axis=-1)


# The chunker is an lru_cache object, which graph mode runs in Python (its arguments are constants).
@functools.lru_cache(maxsize=None)
def row_chunks(n_rows, vocab, elements=None):
    """((start, stop), ...) over the tokens: slabs of about ``elements`` values (CHUNK_ELEMENTS by
    default), at most MAX_CHUNKS of them."""
    elements = elements or CHUNK_ELEMENTS
    size = min(n_rows, max(elements // max(vocab, 1), -(-n_rows // MAX_CHUNKS), 1))
    return tuple((start, min(start + size, n_rows)) for start in range(0, n_rows, size))


_MIX = ms.Tensor(np.uint32(MIX_MULT))
_SHIFT16 = ms.Tensor(np.uint32(16))
_SHIFT9 = ms.Tensor(np.uint32(9))


@functools.lru_cache(maxsize=None)
def _vocab_blocks(vocab, n_blocks=16):
    size = -(-vocab // n_blocks)
    return tuple((start, min(start + size, vocab)) for start in range(0, vocab, size))


def mix32(x):
    """The hash of ms_dfkd.gumbel on uint32 lanes, whose products wrap mod 2**32 like the numpy
    version's int64 & 0xFFFFFFFF (half the memory of int64 lanes, and no masking).

    The noise below is this module's own rather than gumbel_ms for three reasons: uint32 lanes; logs
    in float64 (1 float32 ulp from gumbel_np instead of about 4e-6); constant column hashes (graph
    mode's arange over constant bounds fails to compile inside a bprop)."""
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, _SHIFT16))
    x = x * _MIX
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, _SHIFT16))
    x = x * _MIX
    return ops.bitwise_xor(x, ops.bitwise_right_shift(x, _SHIFT16))


@functools.lru_cache(maxsize=128)
def _column_hashes(start, stop):
    """mix32(col) for col in start..stop-1, as a constant [1, C] uint32 tensor (graph mode's arange
    with constant bounds fails to compile, and the hash of a column never changes)."""
    return ms.Tensor(mix32_np(np.arange(start, stop)).astype(np.uint32).reshape(1, -1))


@functools.lru_cache(maxsize=64)
def _row_ids(n_rows, row_offset):
    return ms.Tensor(((np.arange(n_rows, dtype=np.int64) + row_offset) & MASK32).astype(np.uint32))


def per_row(column, width):
    """[R, 1] -> [R, width], materialised: MindSpore's CPU kernels are ~10x slower on a broadcast
    operand than on two same-shape ones, and tiling costs less than an add."""
    return _tile(column, (1, width))


def gumbel(keys, start, stop):
    """Gumbel noise [R, stop - start] of ms_dfkd.gumbel for uint32 row keys [R] and columns start..stop-1.

    The logs run in float64: MindSpore's float32 log on CPU in graph mode is off by up to 5e-6 and
    returns 0 just below 1, which turns into errors of 5e-3 in -log(-log u). The float64 result rounded
    to float32 is within one float32 ulp of gumbel_np. The lower clamp of gumbel_np (U_MIN = 1e-10)
    never binds, since u >= 2**-24, so only the upper one is applied."""
    cols = _column_hashes(start, stop)
    h = mix32(ops.bitwise_xor(per_row(keys.reshape(-1, 1), stop - start), _tile(cols, (keys.shape[0], 1))))
    u = (ops.bitwise_right_shift(h, _SHIFT9).astype(ms.float64) + 0.5) * (2.0 ** -23)
    u = ops.minimum(u, _U_MAX32)
    return (-ops.log(-ops.log(u))).astype(ms.float32)


def row_keys(seed, n_rows, row_offset=0):
    """uint32 [N]: the per-row hash mix(mix(seed) ^ row) of ms_dfkd.gumbel.row_keys_np."""
    if isinstance(seed, int):
        seed = ms.Tensor(seed & MASK32, ms.int64)
    seed = ops.bitwise_and(seed.astype(ms.int64).reshape(1), MASK32).astype(ms.uint32)
    return mix32(ops.bitwise_xor(mix32(seed), _row_ids(n_rows, row_offset)))


def zero_grad(x):
    """A zero gradient for an input that gets none: a broadcast view, which in PyNative allocates
    nothing (ops.zeros_like of a [V, H] table would allocate 113 MB at SmolLM2's size)."""
    return ops.broadcast_to(ops.zeros((1,) * len(x.shape), x.dtype), x.shape)


def _split_columns(x, tables):
    parts, start = [], 0
    for tbl in tables:
        parts.append(x[:, start:start + tbl.shape[1]])
        start += tbl.shape[1]
    return parts


def _gather_rows(tables, k):
    rows = []
    for tbl in tables:
        rows.append(ops.gather(tbl, k, 0).astype(ms.float32))
    return ops.concat(rows, 1)


def _scatter_rows(tables, k, dvalue):
    """one_hot(k)^T @ dvalue, split per table: the gradient of the gathered rows."""
    grads = []
    for tbl, d in zip(tables, _split_columns(dvalue, tables)):
        zero = ops.zeros(tbl.shape, ms.float32)
        grads.append(ops.tensor_scatter_add(zero, k.reshape(-1, 1), d).astype(tbl.dtype))
    return grads


def _probs(logits, keys, inv_tau):
    """y = softmax((logits + g) / tau) for one slab, float32."""
    x = logits.astype(ms.float32) + gumbel(keys, 0, logits.shape[1])
    return _softmax(x * inv_tau)


def _soft_value(y, tables):
    parts = []
    for tbl in tables:
        parts.append(ops.matmul(y, tbl.astype(ms.float32)))
    return ops.concat(parts, 1)


def _slab_forward(logits, keys, tables, inv_tau, hard, ids):
    """One slab: (value [R, sum H] float32, k [R] int32)."""
    if hard and ids is not None:  # given tokens: a plain gather, no noise needed
        return _gather_rows(tables, ids.astype(ms.int32)), ids.astype(ms.int32)
    x = logits.astype(ms.float32) + gumbel(keys, 0, logits.shape[1])
    # argmax of logits + g itself, not of its tau-scaled copy, so that ties break as in the reference
    k = ops.argmax(x, dim=1).astype(ms.int32) if ids is None else ids.astype(ms.int32)
    if hard:
        return _gather_rows(tables, k), k
    return _soft_value(_softmax(x * inv_tau), tables), k


def _slab_backward(logits, keys, tables, inv_tau, soft, dout):
    """One slab: (dlogits [R, V] float32, y [R, V]). soft may be None (then recomputed from y)."""
    y = _probs(logits, keys, inv_tau)
    if soft is None:
        soft = _soft_value(y, tables)
    vocab = logits.shape[1]
    scaled = dout * inv_tau
    delta = (soft * scaled).sum(axis=1, keepdims=True)
    dy = None
    for tbl, d in zip(tables, _split_columns(scaled, tables)):
        part = _matmul_tb(d, tbl.astype(ms.float32))
        dy = part if dy is None else dy + part
    return y * (dy - per_row(delta, vocab)), y


class SoftEmbedding(nn.Cell):
    """(logits [N, V], row keys [N], tables (tuple of [V, H_i]), ids [N] or None) -> (value, k)."""

    def __init__(self, tau, hard, grad_tables):
        super().__init__()
        self.inv_tau = 1.0 / float(tau)
        self.hard = hard
        self.grad_tables = grad_tables

    def construct(self, logits, keys, tables, ids):
        n, vocab = logits.shape
        values, ks = [], []
        for start, stop in row_chunks(n, vocab):
            slab_ids = None if ids is None else ids[start:stop]
            value, k = _slab_forward(logits[start:stop], keys[start:stop], tables, self.inv_tau, self.hard, slab_ids)
            values.append(value)
            ks.append(k)
        return ops.concat(values, 0).astype(tables[0].dtype), ops.concat(ks, 0)

    def bprop(self, logits, keys, tables, ids, out, dout):
        value, k = out
        # Straight-through: in hard mode the value's gradient is taken as that of the soft y @ T.
        dvalue = dout[0].astype(ms.float32)
        want_soft_table_grad = self.grad_tables and not self.hard
        n, vocab = logits.shape
        dlogits, table_grads = [], None
        for start, stop in row_chunks(n, vocab):
            soft = None if self.hard else value[start:stop].astype(ms.float32)
            dl, y = _slab_backward(logits[start:stop], keys[start:stop], tables, self.inv_tau, soft,
                                   dvalue[start:stop])
            dlogits.append(dl.astype(logits.dtype))
            if want_soft_table_grad:
                # y^T @ dout; a plain sum (an in-place one, as for the fused op's dlm_head, fails to
                # compile in this bprop's graph), so table gradients cost two [V, H] buffers
                grads = []
                for d in _split_columns(dvalue[start:stop], tables):
                    grads.append(_matmul_ta(y, d))
                table_grads = grads if table_grads is None else [a + g for a, g in zip(table_grads, grads)]
        dtables = []
        if want_soft_table_grad:
            for tbl, grad in zip(tables, table_grads):
                dtables.append(grad.astype(tbl.dtype))
        elif self.grad_tables:
            dtables = _scatter_rows(tables, k, dvalue)
        else:
            for tbl in tables:
                dtables.append(zero_grad(tbl))
        dids = None if ids is None else zero_grad(ids)
        return ops.concat(dlogits, 0), zero_grad(keys), tuple(dtables), dids


class FusedLinearSoftEmbedding(nn.Cell):
    """(hidden [N, Hg], lm_head [V, Hg], row keys, tables, ids or None) -> (value, k).

    The tables get no gradient on this path (they are frozen where it is used)."""

    def __init__(self, tau, hard):
        super().__init__()
        self.inv_tau = 1.0 / float(tau)
        self.hard = hard

    def construct(self, hidden, lm_head, keys, tables, ids):
        if self.hard and ids is not None:
            # DFKD-T3's case (the sampled tokens are given): the value is a row gather, so the forward
            # needs no logits at all; only the backward computes them, slab by slab
            k = ids.astype(ms.int32)
            return _gather_rows(tables, k).astype(tables[0].dtype), k
        n, vocab = hidden.shape[0], lm_head.shape[0]
        weight = lm_head.astype(ms.float32)
        values, ks = [], []
        for start, stop in row_chunks(n, vocab, FUSED_CHUNK_ELEMENTS):
            logits = _matmul_tb(hidden[start:stop].astype(ms.float32), weight)
            slab_ids = None if ids is None else ids[start:stop]
            value, k = _slab_forward(logits, keys[start:stop], tables, self.inv_tau, self.hard, slab_ids)
            values.append(value)
            ks.append(k)
        return ops.concat(values, 0).astype(tables[0].dtype), ops.concat(ks, 0)

    def bprop(self, hidden, lm_head, keys, tables, ids, out, dout):
        value, _ = out
        dvalue = dout[0].astype(ms.float32)
        n, vocab = hidden.shape[0], lm_head.shape[0]
        weight = lm_head.astype(ms.float32)
        dhidden = []
        # dlm_head is summed over groups in place, a block of vocabulary rows at a time: a whole-matrix
        # sum would hold two more [V, Hg] buffers (113 MB each at SmolLM2's size), a block holds 1/16.
        # (In PyNative slice assignment writes in place; graph mode plans its own buffers.)
        blocks = _vocab_blocks(vocab)
        dweight = ops.zeros(weight.shape, ms.float32)
        chunks = row_chunks(n, vocab, FUSED_CHUNK_ELEMENTS)
        # A group's dlogits go into one buffer, written slab by slab, so that they are held once.
        group_rows = min(n, (chunks[0][1] - chunks[0][0]) * FUSED_DWEIGHT_GROUP)
        dl_group = ops.zeros((group_rows, vocab), ms.float32)
        for g0 in range(0, len(chunks), FUSED_DWEIGHT_GROUP):
            group = chunks[g0:g0 + FUSED_DWEIGHT_GROUP]
            first, last = group[0][0], group[-1][1]
            h = hidden[first:last].astype(ms.float32)
            for start, stop in group:
                soft = None if self.hard else value[start:stop].astype(ms.float32)
                dlogits, _ = _slab_backward(_matmul_tb(h[start - first:stop - first], weight), keys[start:stop],
                                            tables, self.inv_tau, soft, dvalue[start:stop])
                dl_group[start - first:stop - first] = dlogits
            dl = dl_group if last - first == group_rows else dl_group[:last - first]
            dhidden.append(_matmul(dl, weight))
            for v0, v1 in blocks:
                dweight[v0:v1] += _matmul_ta(dl[:, v0:v1], h)
        dtables = []
        for tbl in tables:
            dtables.append(zero_grad(tbl))
        dids = None if ids is None else zero_grad(ids)
        return (ops.concat(dhidden, 0).astype(hidden.dtype), dweight.astype(lm_head.dtype),
                zero_grad(keys), tuple(dtables), dids)
