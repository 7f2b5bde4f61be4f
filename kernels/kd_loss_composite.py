"""Temperature-scaled KD loss as MindSpore ops, chunked over the vocabulary.

Per row, with zt = teacher / T, zs = student / T, p = softmax(zt), q = softmax(zs):
    KL = sum p (zt - zs) - lse(zt) + lse(zs),   loss_row = T^2 * KL
The forward walks the vocabulary once with running maxima and sums for both sides (and the running
p-weighted sum of zt - zs), so only an [N, chunk] slice exists at a time. The backward recomputes
p and q chunk by chunk from the saved log-sum-exps:
    d/dstudent = c * T * (q - p),   d/dteacher = c * T * p * (zt - lse_t - zs + lse_s - KL)
with c the upstream gradient of loss_row. Both inputs get their gradient: the fluency term trains
the side that plays the teacher here.
"""
import mindspore as ms
from mindspore import nn, ops

from kernels.soft_embedding_composite import log_f64, vocab_chunks


class KDLossRows(nn.Cell):
    """(student [N, V], teacher [N, V]) -> (loss_row [N], lse_s [N, 1], lse_t [N, 1]), float32."""

    def __init__(self, temperature):
        super().__init__()
        self.temperature = float(temperature)

    def construct(self, student, teacher):
        n, vocab = student.shape
        inv_t = 1.0 / self.temperature
        max_s = ops.full((n, 1), float("-inf"), dtype=ms.float32)
        max_t = ops.full((n, 1), float("-inf"), dtype=ms.float32)
        sum_s = ops.zeros((n, 1), ms.float32)
        sum_t = ops.zeros((n, 1), ms.float32)
        cross = ops.zeros((n, 1), ms.float32)  # sum exp(zt - max_t) * (zt - zs)
        for start, stop in vocab_chunks(n, vocab):
            zs = student[:, start:stop].astype(ms.float32) * inv_t
            zt = teacher[:, start:stop].astype(ms.float32) * inv_t
            new_s = ops.maximum(max_s, zs.max(axis=1, keepdims=True))
            new_t = ops.maximum(max_t, zt.max(axis=1, keepdims=True))
            sum_s = sum_s * ops.exp(max_s - new_s) + ops.exp(zs - new_s).sum(axis=1, keepdims=True)
            rescale_t = ops.exp(max_t - new_t)
            et = ops.exp(zt - new_t)
            sum_t = sum_t * rescale_t + et.sum(axis=1, keepdims=True)
            cross = cross * rescale_t + (et * (zt - zs)).sum(axis=1, keepdims=True)
            max_s, max_t = new_s, new_t
        lse_s = max_s + log_f64(sum_s)
        lse_t = max_t + log_f64(sum_t)
        kl = cross / sum_t - lse_t + lse_s
        return (self.temperature * self.temperature) * kl.reshape(-1), lse_s, lse_t

    def bprop(self, student, teacher, out, dout):
        rows, lse_s, lse_t = out
        n, vocab = student.shape
        inv_t = 1.0 / self.temperature
        kl = (rows * (inv_t * inv_t)).reshape(-1, 1)
        coef = dout[0].reshape(-1, 1) * self.temperature
        dstudent, dteacher = [], []
        for start, stop in vocab_chunks(n, vocab):
            log_q = student[:, start:stop].astype(ms.float32) * inv_t - lse_s
            log_p = teacher[:, start:stop].astype(ms.float32) * inv_t - lse_t
            p = ops.exp(log_p)
            dstudent.append((coef * (ops.exp(log_q) - p)).astype(student.dtype))
            dteacher.append((coef * p * (log_p - log_q - kl)).astype(teacher.dtype))
        return ops.concat(dstudent, 1), ops.concat(dteacher, 1)
