"""Temperature-scaled KD loss as MindSpore ops, in slabs of rows so that no N x V temporary exists
(path "composite"). ``kd_loss_rows(student, teacher, temperature)`` -> loss_row [N] float32 takes the
arguments every path takes (kernels/kd_loss_op.py reduces the rows).

Per row, with p = softmax(teacher / T), q = softmax(student / T):
    loss_row = T^2 * KL(p || q) = T^2 * sum p (log p - log q)
The forward and the backward each walk the rows in [rows, V] slabs (see soft_embedding_composite for
why rows), with MindSpore's fused log_softmax; the backward recomputes the slab's log-probabilities:
    d/dstudent = c * T * (q - p),   d/dteacher = c * T * p * (log p - log q - KL)
with c the upstream gradient of loss_row. Both inputs get their gradient: the fluency term trains the
side that plays the teacher here. The per-row KL is computed from the same log-probabilities as the
gradient, so an error in a row's log-sum-exp (MindSpore's CPU log is good to ~5e-6) cancels out of
log p - log q - KL.
"""
import functools

import mindspore as ms
from mindspore import nn, ops

from kernels.utils import no_bfloat16, per_row, row_chunks

_log_softmax = ops.LogSoftmax(axis=-1)  # a primitive: see kernels.utils


class KDLossRows(nn.Cell):
    """(student [N, V], teacher [N, V]) -> loss_row [N] float32."""

    def __init__(self, temperature):
        super().__init__()
        self.temperature = float(temperature)

    def _log_probs(self, student, teacher):
        inv_t = 1.0 / self.temperature
        log_q = _log_softmax(student.astype(ms.float32) * inv_t)
        log_p = _log_softmax(teacher.astype(ms.float32) * inv_t)
        return log_q, log_p

    def construct(self, student, teacher):
        n, vocab = student.shape
        rows = []
        for start, stop in row_chunks(n, vocab):
            log_q, log_p = self._log_probs(student[start:stop], teacher[start:stop])
            rows.append((ops.exp(log_p) * (log_p - log_q)).sum(axis=1))
        return ops.concat(rows, 0) * (self.temperature * self.temperature)

    def bprop(self, student, teacher, out, dout):
        n, vocab = student.shape
        scale = 1.0 / (self.temperature * self.temperature)
        kl = (out * scale).reshape(-1, 1)
        coef = (dout * self.temperature).reshape(-1, 1)
        dstudent, dteacher = [], []
        for start, stop in row_chunks(n, vocab):
            log_q, log_p = self._log_probs(student[start:stop], teacher[start:stop])
            p = ops.exp(log_p)
            c = per_row(coef[start:stop], vocab)
            dstudent.append((c * (ops.exp(log_q) - p)).astype(student.dtype))
            dteacher.append((c * p * (log_p - log_q - per_row(kl[start:stop], vocab))).astype(teacher.dtype))
        return ops.concat(dstudent, 0), ops.concat(dteacher, 0)


# ---- entry point called by kernels.kd_loss_op (parsed in graph mode) -------------------------------------

@functools.lru_cache(maxsize=None)
def _rows_cell(temperature):
    return KDLossRows(temperature)


def kd_loss_rows(student, teacher, temperature):
    return _rows_cell(float(temperature))(no_bfloat16(student), no_bfloat16(teacher))
