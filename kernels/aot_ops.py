"""The ahead-of-time compiled Triton kernels as MindSpore ``aot`` custom ops with bprop (path "aot", GPU).

The shared library comes from scripts/build_kernels.sh (default kernels/build/libdfkd_kernels.so,
or the file named by MS_DFKD_KERNELS_LIB); its entry points are in kernels/aot/launcher.cu. The ops
mirror kernels/triton_ops.py (same inputs, outputs and bprops), except that tau and the temperature
travel as 1-element tensors, since aot ops take no attributes. Tables, hidden states and the LM head
go to the kernels as float32; logits as float32, float16 or bfloat16.

Nothing here has run on a GPU from this repository yet: scripts/gpu_check_kernels.sh checks the
library against the numpy references on a GPU machine.
"""
import functools
import os
import pathlib

import mindspore as ms
from mindspore import nn, ops

from kernels.triton_config import FUSED_ROWS
from kernels.utils import ids_or_argmax, scalar_tensor, scatter_rows, table_slots, zero_grad

LIB_ENV = "MS_DFKD_KERNELS_LIB"
LIB_NAME = "libdfkd_kernels.so"


def library_path():
    return pathlib.Path(os.environ.get(LIB_ENV) or pathlib.Path(__file__).with_name("build") / LIB_NAME).resolve()


def unavailable_reason():
    """None if the aot ops can run here, else why not."""
    target = ms.get_context("device_target")
    if target != "GPU":
        return f"the aot kernels run on GPU only and the MindSpore device target is {target}"
    lib = library_path()
    if not lib.is_file():
        return f"{lib} does not exist"
    white = os.environ.get("MS_CUSTOM_AOT_WHITE_LIST")
    if white and not str(lib).startswith(str(pathlib.Path(white).resolve())):
        return f"MS_CUSTOM_AOT_WHITE_LIST={white} does not contain {lib}"
    return None


def _aot(entry, out_shape, out_dtype, bprop=None):
    # MindSpore only loads aot libraries from under this folder.
    os.environ.setdefault("MS_CUSTOM_AOT_WHITE_LIST", str(library_path().parent))
    return ops.Custom(f"{library_path()}:{entry}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot",
                      bprop=bprop)


def _entry(name, two_tables):
    return name if two_tables else name + "OneTable"


def _width(t0, t1, two_tables):
    return t0[1] + (t1[1] if two_tables else 0)


class SoftEmbeddingOp(nn.Cell):
    """(logits, t0, t1, ids, seed [1] i64, tau [1] f32, row_offset [1] i64) -> (soft, hard, lse, k)."""

    def __init__(self, hard, grad_tables, two_tables):
        super().__init__()
        backward_op = _aot(_entry("MsDfkdSeBackward", two_tables), lambda lg, *rest: lg, lambda lg, *rest: lg)
        tables_op = _aot(_entry("MsDfkdSeBackwardTables", two_tables),
                         lambda lg, s, tau, ro, lse, d, t0, t1: (t0, t1),
                         lambda lg, s, tau, ro, lse, d, t0, t1: (ms.float32, ms.float32))

        def bprop(logits, t0, t1, ids, seed, tau, row_offset, out, dout):
            soft, _, lse, k = out
            dtotal = dout[0] + dout[1]  # straight-through: the hard value's gradient goes through y
            dlogits = backward_op(logits, t0, t1, seed, tau, row_offset, lse, soft, dtotal)
            if grad_tables and not hard:
                dt0, dt1 = tables_op(logits, seed, tau, row_offset, lse, dtotal, t0, t1)
                if not two_tables:
                    dt1 = zero_grad(t1)
            elif grad_tables:
                h0 = t0.shape[1]
                dt0 = scatter_rows(t0, k, dout[1][:, :h0])
                dt1 = scatter_rows(t1, k, dout[1][:, h0:]) if two_tables else zero_grad(t1)
            else:
                dt0, dt1 = zero_grad(t0), zero_grad(t1)
            return (dlogits, dt0, dt1, zero_grad(ids), zero_grad(seed), zero_grad(tau),
                    zero_grad(row_offset))

        self.op = _aot(_entry("MsDfkdSeForward", two_tables),
                       lambda lg, t0, t1, *rest: ([lg[0], _width(t0, t1, two_tables)],
                                                  [lg[0], _width(t0, t1, two_tables)], [lg[0]], [lg[0]]),
                       lambda *dtypes: (ms.float32, ms.float32, ms.float32, ms.int32), bprop)

    def construct(self, logits, t0, t1, ids, seed, tau, row_offset):
        return self.op(logits, t0, t1, ids, seed, tau, row_offset)


class FusedLinearSoftEmbeddingOp(nn.Cell):
    """(hidden f32, lm_head f32, t0, t1, ids, seed, tau, row_offset) -> (soft, hard, lse, k, workspace)."""

    def __init__(self, two_tables, chunk_rows):
        super().__init__()
        backward_op = _aot(_entry("MsDfkdFusedBackward", two_tables),
                           lambda h, w, *rest: (h, w, [min(h[0], chunk_rows), w[0]]),
                           lambda *dtypes: (ms.float32, ms.float32, ms.float32))

        def bprop(hidden, lm_head, t0, t1, ids, seed, tau, row_offset, out, dout):
            soft, _, lse, _, _ = out
            dhidden, dlm_head, _ = backward_op(hidden, lm_head, t0, t1, seed, tau, row_offset, lse, soft,
                                               dout[0] + dout[1])
            return (dhidden, dlm_head, zero_grad(t0), zero_grad(t1), zero_grad(ids),
                    zero_grad(seed), zero_grad(tau), zero_grad(row_offset))

        def out_shape(h, w, t0, t1, *rest):
            width = _width(t0, t1, two_tables)
            return [h[0], width], [h[0], width], [h[0]], [h[0]], [min(h[0], chunk_rows), w[0]]

        self.op = _aot(_entry("MsDfkdFusedForward", two_tables), out_shape,
                       lambda *dtypes: (ms.float32, ms.float32, ms.float32, ms.int32, ms.float32), bprop)

    def construct(self, hidden, lm_head, t0, t1, ids, seed, tau, row_offset):
        return self.op(hidden, lm_head, t0, t1, ids, seed, tau, row_offset)


class KDLossRowsOp(nn.Cell):
    """(student, teacher, temperature [1] f32) -> (loss_row, lse_s, lse_t) float32 [N]."""

    def __init__(self):
        super().__init__()
        backward_op = _aot("MsDfkdKdBackward", lambda s, t, *rest: (s, t), lambda s, t, *rest: (s, t))

        def bprop(student, teacher, temperature, out, dout):
            loss, lse_s, lse_t = out
            dstudent, dteacher = backward_op(student, teacher, temperature, lse_s, lse_t, loss, dout[0])
            return dstudent, dteacher, zero_grad(temperature)

        self.op = _aot("MsDfkdKdForward", lambda s, t, temp: ([s[0]], [s[0]], [s[0]]),
                       lambda s, t, temp: (ms.float32, ms.float32, ms.float32), bprop)

    def construct(self, student, teacher, temperature):
        return self.op(student, teacher, temperature)


# ---- entry points called by kernels.soft_embedding_op / kernels.kd_loss_op (parsed in graph mode) -----

@functools.lru_cache(maxsize=None)
def _soft_op(hard, grad_tables, two_tables):
    return SoftEmbeddingOp(hard, grad_tables, two_tables)


@functools.lru_cache(maxsize=None)
def _fused_op(two_tables):
    return FusedLinearSoftEmbeddingOp(two_tables, FUSED_ROWS)


@functools.lru_cache(maxsize=None)
def _kd_op():
    return KDLossRowsOp()


def soft_embedding(logits, tables, seed, tau, hard, ids, row_offset, grad_tables):
    t0, t1, two = table_slots(tables)
    soft, hard_value, _, _ = _soft_op(bool(hard), bool(grad_tables), two)(
        logits, t0, t1, ids_or_argmax(ids, logits.shape[0]), scalar_tensor(seed, ms.int64),
        scalar_tensor(float(tau), ms.float32), scalar_tensor(row_offset, ms.int64))
    return (hard_value if hard else soft).astype(tables[0].dtype)


def fused_linear_soft_embedding(hidden, lm_head, tables, seed, tau, hard, ids, row_offset):
    t0, t1, two = table_slots(tables)
    soft, hard_value, _, _, _ = _fused_op(two)(
        hidden.astype(ms.float32), lm_head.astype(ms.float32), t0, t1, ids_or_argmax(ids, hidden.shape[0]),
        scalar_tensor(seed, ms.int64), scalar_tensor(float(tau), ms.float32), scalar_tensor(row_offset, ms.int64))
    return (hard_value if hard else soft).astype(tables[0].dtype)


def kd_loss_rows(student, teacher, temperature):
    if student.dtype != teacher.dtype:
        student, teacher = student.astype(ms.float32), teacher.astype(ms.float32)
    return _kd_op()(student, teacher, scalar_tensor(float(temperature), ms.float32))[0]
