"""The four generator losses of DFKD-T3 and the student KD loss (METHOD.md).

The KL terms go through ``kernels.kd_loss`` (tau^2 * KL(p_teacher || p_student)),
so a fused kernel can replace the composite without touching this file.
"""
import mindspore as ms
from mindspore import ops

# Imported by name: MindSpore's graph parser reads module __dict__s and does not see the lazy
# module-level __getattr__ of the kernels package.
from kernels import kd_loss


def specificity_loss(teacher_logits, target_labels):
    """CE(T(e), y~): the sample should carry the label it was asked for."""
    logp = ops.log_softmax(teacher_logits.astype(ms.float32), -1)
    onehot = ops.one_hot(target_labels, teacher_logits.shape[-1], 1.0, 0.0).astype(ms.float32)
    return -(onehot * logp).sum(-1).mean()


def diversity_loss(features, target_labels, num_labels):
    """Mean pairwise cosine similarity of pooled teacher features over same-label pairs (i != j)."""
    f = features.astype(ms.float32)
    f = f / ops.sqrt((f * f).sum(-1, keepdims=True) + 1e-12)
    sim = ops.matmul(f, f.T)
    onehot = ops.one_hot(target_labels, num_labels, 1.0, 0.0).astype(ms.float32)
    same = ops.matmul(onehot, onehot.T) * (1.0 - ops.eye(f.shape[0], f.shape[0], ms.float32))
    return (sim * same).sum() / ops.maximum(same.sum(), 1.0)


def adversarial_loss(student_logits, teacher_logits, kd_temperature):
    """-tau^2 KL(p_T || p_S): seek samples the student still gets wrong."""
    return -kd_loss(student_logits, teacher_logits, kd_temperature)


def fluency_loss(gen_logits, frozen_logits, mask):
    """sum_t m_t KL(G_theta || G_theta0) / sum_t m_t over the generator vocabulary.

    gen_logits / frozen_logits: [N, V]; mask: [N] float. The trainable side is the
    first argument of the KL, which is the *teacher* side of kd_loss (it returns
    gradients for both sides).
    """
    return kd_loss(frozen_logits, gen_logits, 1.0, row_weights=mask)


def student_kd_loss(student_logits, teacher_logits, kd_temperature):
    """tau^2 KL(softmax(z_T/tau) || softmax(z_S/tau)); teacher logits carry no gradient."""
    return kd_loss(student_logits, ops.stop_gradient(teacher_logits), kd_temperature)
