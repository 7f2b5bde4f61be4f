"""Gumbel-softmax soft embedding as MindSpore ops, in slabs of rows so that no N x V temporary exists
(path "composite").

    soft_embedding(logits, tables, seed, tau, hard, ids, row_offset, grad_tables)
    fused_linear_soft_embedding(hidden, lm_head, tables, seed, tau, hard, ids, row_offset)

take the arguments every path takes (kernels/soft_embedding_op.py has the contract); they derive the
per-row noise keys from (seed, row_offset) with kernels.utils.row_keys and run the Cells below.

Both ops walk the tokens in slabs of [rows, V] (about kernels.utils.CHUNK_ELEMENTS values each): a
slab's noise, probabilities and gradients live only while it is processed. Every output is at most
[N, V] (the logits' gradient, which the op must return) or [N, sum H].

soft_embedding: forward, per slab, x = logits + g, then k = argmax(x) (hard mode: the value is the
gathered rows, no softmax is needed) or y = softmax(x / tau) and soft = y @ T. The backward regenerates
the noise from the seed (it is never stored) and recomputes y:
    dlogits = y * (dout @ T^T - rowsum(soft * dout)) / tau
(in hard mode, where soft is not kept, rowsum(soft * dout) = rowsum(y * (dout @ T^T)): no y @ T).
fused_linear_soft_embedding: the same, with each slab's logits computed from the hidden states and the
LM head and recomputed in the backward, so the N x V logits and their gradient never exist at all.

Why slabs of rows rather than of columns: full-width rows let MindSpore's fused softmax do the
normalisation, and on CPU MindSpore is slow at what column chunks need (concatenating along the
vocabulary axis costs ~10x an add, as does broadcasting a [rows, 1] column across a row); per-row
values are therefore tiled to full width before use.

Both are ``nn.Cell`` with a ``bprop`` method, which is how MindSpore takes a custom backward in
GRAPH_MODE as well as PyNative. The slab loops are Python loops over static shapes (unrolled in graph
mode, hence kernels.utils.MAX_CHUNKS). Forward and backward compute in float32 whatever the input dtype.
"""
import functools

import mindspore as ms
from mindspore import nn, ops

from kernels import cpu_ops, dispatch
from kernels.utils import gumbel, no_bfloat16, per_row, row_chunks, row_keys, scatter_rows, zero_grad

# The fused-linear op's point is memory, so its slabs are smaller than the CHUNK_ELEMENTS of kernels.utils;
# on CPU each slab also re-reads the LM head in matmuls with few rows, so its time grows as slabs shrink.
# Measured at N=4096, V=49152, Hg=576 on 2 cores before the grouped backward below (peak above inputs /
# time, against 2864 MB / 23 s for logits + the composite): 1M values 268 MB / 66 s, 2M 334 MB / 40 s,
# 4M 509 MB / 30 s, 8M 785 MB / 26 s (times vary by a third between runs).
FUSED_CHUNK_ELEMENTS = 1 << 20
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
_softmax = ops.Softmax(axis=-1)


@functools.lru_cache(maxsize=None)
def _vocab_blocks(vocab, n_blocks=16):
    size = -(-vocab // n_blocks)
    return tuple((start, min(start + size, vocab)) for start in range(0, vocab, size))


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
        grads.append(scatter_rows(tbl, k, d).astype(tbl.dtype))
    return grads


def _noise(keys, vocab):
    """The slab's Gumbel noise [R, V]: a C++ op on CPU, MindSpore's ops elsewhere (kernels.dispatch; the same
    values either way)."""
    if dispatch.resolve_encoder_path("gumbel_noise") == "cpu":
        return cpu_ops.gumbel_noise(keys, 0, vocab)
    return gumbel(keys, 0, vocab)


def _probs(logits, keys, inv_tau):
    """y = softmax((logits + g) / tau) for one slab, float32."""
    x = logits.astype(ms.float32) + _noise(keys, logits.shape[1])
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
    x = logits.astype(ms.float32) + _noise(keys, logits.shape[1])
    # argmax of logits + g itself, not of its tau-scaled copy, so that ties break as in the reference
    k = ops.argmax(x, dim=1).astype(ms.int32) if ids is None else ids.astype(ms.int32)
    if hard:
        return _gather_rows(tables, k), k
    return _soft_value(_softmax(x * inv_tau), tables), k


def _slab_backward(logits, keys, tables, inv_tau, soft, dout):
    """One slab: (dlogits [R, V] float32, y [R, V]). soft may be None (hard mode): then
    rowsum(soft * dout) is taken as rowsum(y * (dout @ T^T)), the same number without the [R, V] x [V, H]
    product that would recompute soft = y @ T (80 of a 1255 ms generator step at the default config)."""
    y = _probs(logits, keys, inv_tau)
    vocab = logits.shape[1]
    scaled = dout * inv_tau
    dy = None
    for tbl, d in zip(tables, _split_columns(scaled, tables)):
        part = _matmul_tb(d, tbl.astype(ms.float32))
        dy = part if dy is None else dy + part
    if soft is None:
        delta = (y * dy).sum(axis=1, keepdims=True)
    else:
        delta = (soft * scaled).sum(axis=1, keepdims=True)
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


# ---- entry points called by kernels.soft_embedding_op (parsed in graph mode) ---------------------------

@functools.lru_cache(maxsize=None)
def _soft_cell(tau, hard, grad_tables):
    return SoftEmbedding(tau, hard, grad_tables)


@functools.lru_cache(maxsize=None)
def _fused_cell(tau, hard):
    return FusedLinearSoftEmbedding(tau, hard)


def soft_embedding(logits, tables, seed, tau, hard, ids, row_offset, grad_tables):
    keys = row_keys(seed, logits.shape[0], row_offset)
    out = _soft_cell(float(tau), bool(hard), bool(grad_tables))(
        no_bfloat16(logits), keys, tuple(no_bfloat16(t) for t in tables), ids)[0]
    return out.astype(ms.bfloat16) if ms.bfloat16 in (logits.dtype, *[t.dtype for t in tables]) else out


def fused_linear_soft_embedding(hidden, lm_head, tables, seed, tau, hard, ids, row_offset):
    keys = row_keys(seed, hidden.shape[0], row_offset)
    return _fused_cell(float(tau), bool(hard))(hidden, lm_head, keys, tuple(tables), ids)[0]
