"""Public KD loss: kd_loss(student_logits, teacher_logits, temperature, reduction="mean", row_weights=None).

    loss_n = T^2 * KL(softmax(teacher_n / T) || softmax(student_n / T))      per row n of [N, V]
    "none" -> [N];  "sum" -> sum_n w_n loss_n;  "mean" -> sum_n w_n loss_n / sum_n w_n  (w = 1 without
    row_weights; an all-zero mask gives 0, not NaN)
Gradients reach both inputs. The per-row op, kd_loss_rows(student, teacher, temperature), runs on the
path chosen by kernels.dispatch; the reduction is plain MindSpore arithmetic on [N] values, so its
gradient comes from autodiff. Returns float32.
"""
import mindspore as ms
from mindspore import ops

from kernels import dispatch

REDUCTIONS = ("mean", "sum", "none")


@ops.constexpr
def _check(student_shape, teacher_shape, temperature, reduction, weights_shape):
    if len(student_shape) != 2 or tuple(student_shape) != tuple(teacher_shape):
        raise ValueError(f"kd_loss: student and teacher logits must both be [N, V], got {tuple(student_shape)} "
                         f"and {tuple(teacher_shape)}")
    if not temperature > 0:
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"kd_loss: reduction {reduction!r} is not one of {REDUCTIONS}")
    if weights_shape is not None and tuple(weights_shape) != (student_shape[0],):
        raise ValueError(f"kd_loss: row_weights has shape {tuple(weights_shape)}, expected [N={student_shape[0]}]")
    return True


def kd_loss(student_logits, teacher_logits, temperature, reduction="mean", row_weights=None):
    """T^2-scaled KL(teacher || student) per row, reduced; see the module docstring."""
    weights_shape = None if row_weights is None else tuple(row_weights.shape)
    _check(tuple(student_logits.shape), tuple(teacher_logits.shape), float(temperature), reduction, weights_shape)
    path = dispatch.resolve_backend("kd_loss")
    rows = dispatch.path_module(path, "kd_loss").kd_loss_rows(student_logits, teacher_logits, float(temperature))
    if reduction == "none":
        return rows
    if row_weights is None:
        return rows.sum() if reduction == "sum" else rows.mean()
    weights = row_weights.astype(ms.float32)
    total = (rows * weights).sum()
    if reduction == "sum":
        return total
    return total / ops.maximum(weights.sum(), 1e-12)
