"""The Triton kernels inside MindSpore graphs on CPU (path "triton_interpret").

Each op is an ``ops.Custom(func_type="pyfunc")`` whose function runs the Triton forward kernels under
Triton's interpreter on the numpy views of its inputs, and whose bprop is another pyfunc custom op that
runs the backward kernels. This is slow (the interpreter walks every program of the grid in Python);
it exists to check the GPU kernels, and their wiring as MindSpore custom ops with bprop, without a GPU.
The aot path (kernels/aot_ops.py) has the same structure with compiled kernels.

Needs TRITON_INTERPRET=1 before MindSpore is imported (see kernels.triton_runtime.interpreter_problem).
"""
import functools

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from kernels import triton_runtime as rt
from kernels.utils import ids_or_argmax, scalar_tensor, scatter_rows, table_slots, zero_grad


def _custom(fn, out_shape, out_dtype, bprop=None):
    return ops.Custom(fn, out_shape=out_shape, out_dtype=out_dtype, func_type="pyfunc", bprop=bprop)


def _tables_of(t0, t1, two_tables):
    return (t0, t1) if two_tables else (t0,)


class SoftEmbeddingOp(nn.Cell):
    """(logits f32/f16, t0, t1 (f32), ids int32 (-1: argmax), seed int64[1], row_offset int64[1])
    -> (soft, hard, lse, k). With one table, t1 is t0 again and is ignored."""

    def __init__(self, tau, hard, grad_tables, two_tables):
        super().__init__()
        tau = float(tau)

        def forward(logits, t0, t1, ids, seed, row_offset):
            return rt.se_forward(logits, _tables_of(t0, t1, two_tables), ids, seed[0], tau, row_offset[0])

        def backward(logits, t0, t1, seed, row_offset, lse, soft, dout):
            out = np.empty(logits.shape, logits.dtype)
            return rt.se_backward_logits(logits, _tables_of(t0, t1, two_tables), seed[0], tau, row_offset[0],
                                         lse, soft, dout, out=out)

        def backward_tables(logits, t0, t1, seed, row_offset, lse, dout):
            widths = [t0.shape[1], t1.shape[1]] if two_tables else [t0.shape[1]]
            grads = rt.se_backward_tables(logits, widths, seed[0], tau, row_offset[0], lse, dout)
            return grads[0], (grads[1] if two_tables else np.zeros_like(t1))

        def width(t0, t1):
            return t0[1] + (t1[1] if two_tables else 0)

        backward_op = _custom(backward, lambda lg, *rest: lg, lambda lg, *rest: lg)
        tables_op = _custom(backward_tables, lambda lg, t0, t1, *rest: (t0, t1),
                            lambda lg, t0, t1, *rest: (t0, t1))
        def bprop(logits, t0, t1, ids, seed, row_offset, out, dout):
            soft, _, lse, k = out
            dtotal = dout[0] + dout[1]  # straight-through: the hard value's gradient goes through y
            dlogits = backward_op(logits, t0, t1, seed, row_offset, lse, soft, dtotal)
            if grad_tables and not hard:
                dt0, dt1 = tables_op(logits, t0, t1, seed, row_offset, lse, dtotal)
            elif grad_tables:
                h0 = t0.shape[1]
                dt0 = scatter_rows(t0, k, dout[1][:, :h0])
                dt1 = scatter_rows(t1, k, dout[1][:, h0:]) if two_tables else zero_grad(t1)
            else:
                dt0, dt1 = zero_grad(t0), zero_grad(t1)
            return (dlogits, dt0, dt1, zero_grad(ids), zero_grad(seed), zero_grad(row_offset))

        self.op = _custom(forward,
                          lambda lg, t0, t1, *rest: ([lg[0], width(t0, t1)], [lg[0], width(t0, t1)], [lg[0]], [lg[0]]),
                          lambda *dtypes: (ms.float32, ms.float32, ms.float32, ms.int32), bprop)

    def construct(self, logits, t0, t1, ids, seed, row_offset):
        return self.op(logits, t0, t1, ids, seed, row_offset)


class FusedLinearSoftEmbeddingOp(nn.Cell):
    """(hidden f32, lm_head f32, t0, t1, ids, seed, row_offset) -> (soft, hard, lse, k); the tables
    get no gradient."""

    def __init__(self, tau, two_tables):
        super().__init__()
        tau = float(tau)

        def forward(hidden, lm_head, t0, t1, ids, seed, row_offset):
            return rt.fused_forward(hidden, lm_head, _tables_of(t0, t1, two_tables), ids, seed[0], tau,
                                    row_offset[0])

        def backward(hidden, lm_head, t0, t1, seed, row_offset, lse, soft, dout):
            return rt.fused_backward(hidden, lm_head, _tables_of(t0, t1, two_tables), seed[0], tau,
                                     row_offset[0], lse, soft, dout)

        def width(t0, t1):
            return t0[1] + (t1[1] if two_tables else 0)

        backward_op = _custom(backward, lambda h, w, *rest: (h, w), lambda h, w, *rest: (h, w))

        def bprop(hidden, lm_head, t0, t1, ids, seed, row_offset, out, dout):
            soft, _, lse, _ = out
            dhidden, dlm_head = backward_op(hidden, lm_head, t0, t1, seed, row_offset, lse, soft, dout[0] + dout[1])
            return (dhidden, dlm_head, zero_grad(t0), zero_grad(t1), zero_grad(ids),
                    zero_grad(seed), zero_grad(row_offset))

        self.op = _custom(forward,
                          lambda h, w, t0, t1, *rest: ([h[0], width(t0, t1)], [h[0], width(t0, t1)], [h[0]], [h[0]]),
                          lambda *dtypes: (ms.float32, ms.float32, ms.float32, ms.int32), bprop)

    def construct(self, hidden, lm_head, t0, t1, ids, seed, row_offset):
        return self.op(hidden, lm_head, t0, t1, ids, seed, row_offset)


class KDLossRowsOp(nn.Cell):
    """(student, teacher) f32/f16 -> (loss_row, lse_s, lse_t) float32 [N]."""

    def __init__(self, temperature):
        super().__init__()
        temperature = float(temperature)

        def forward(student, teacher):
            return rt.kd_forward(student, teacher, temperature)

        def backward(student, teacher, lse_s, lse_t, loss, dloss):
            return rt.kd_backward(student, teacher, temperature, lse_s, lse_t, loss, dloss, out_dtype=student.dtype)

        backward_op = _custom(backward, lambda s, t, *rest: (s, t), lambda s, t, *rest: (s, t))

        def bprop(student, teacher, out, dout):
            loss, lse_s, lse_t = out
            return backward_op(student, teacher, lse_s, lse_t, loss, dout[0])

        self.op = _custom(forward, lambda s, t: ([s[0]], [s[0]], [s[0]]),
                          lambda s, t: (ms.float32, ms.float32, ms.float32), bprop)

    def construct(self, student, teacher):
        return self.op(student, teacher)


# ---- entry points called by kernels.soft_embedding_op / kernels.kd_loss_op (parsed in graph mode) -----

@functools.lru_cache(maxsize=None)
def _soft_op(tau, hard, grad_tables, two_tables):
    return SoftEmbeddingOp(tau, hard, grad_tables, two_tables)


@functools.lru_cache(maxsize=None)
def _fused_op(tau, two_tables):
    return FusedLinearSoftEmbeddingOp(tau, two_tables)


@functools.lru_cache(maxsize=None)
def _kd_op(temperature):
    return KDLossRowsOp(temperature)


def kernel_float(x):
    """float32 and float16 go to the kernels as they are; bfloat16 (no numpy dtype) as float32."""
    if x.dtype == ms.float32 or x.dtype == ms.float16:
        return x
    return x.astype(ms.float32)


def soft_embedding(logits, tables, seed, tau, hard, ids, row_offset, grad_tables):
    t0, t1, two = table_slots(tables)
    op = _soft_op(float(tau), bool(hard), bool(grad_tables), two)
    soft, hard_value, _, _ = op(kernel_float(logits), t0, t1, ids_or_argmax(ids, logits.shape[0]),
                                scalar_tensor(seed, ms.int64), scalar_tensor(row_offset, ms.int64))
    return (hard_value if hard else soft).astype(tables[0].dtype)


def fused_linear_soft_embedding(hidden, lm_head, tables, seed, tau, hard, ids, row_offset):
    t0, t1, two = table_slots(tables)
    op = _fused_op(float(tau), two)
    soft, hard_value, _, _ = op(hidden.astype(ms.float32), lm_head.astype(ms.float32), t0, t1,
                                ids_or_argmax(ids, hidden.shape[0]), scalar_tensor(seed, ms.int64),
                                scalar_tensor(row_offset, ms.int64))
    return (hard_value if hard else soft).astype(tables[0].dtype)


def kd_loss_rows(student, teacher, temperature):
    if student.dtype != teacher.dtype:
        student, teacher = student.astype(ms.float32), teacher.astype(ms.float32)
    return _kd_op(float(temperature))(kernel_float(student), kernel_float(teacher))[0]
