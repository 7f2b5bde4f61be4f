"""The generator losses of DFKD-T3 (the four of the method and an optional reward-weighted likelihood)
and the student KD loss (docs/METHOD.md), and their per-token forms for token classification (NER).

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


def token_nll(logits, ids):
    """-log softmax(logits)[id] per position, float32 [B, T], for logits [B, T, V] and ids [B, T]: the negative
    log-likelihood of sampled tokens (the driver's perplexity under G_θ0, no gradient)."""
    logp = ops.log_softmax(logits.astype(ms.float32), -1)
    return -ops.gather_elements(logp, 2, ids.astype(ms.int32).expand_dims(-1)).squeeze(-1)


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


def reward_weighted_nll(gen_logits, gen_ids, mask, teacher_logits, target_labels):
    """-sum_b w_b * mean_t log p_theta(z_bt) / B over the generator's own samples z.

    w_b = max(p_T(y_b | z_b) - mean of p_T(y_b | z_b') over the samples b' asked for the same label, 0),
    without gradient: the samples the teacher finds more specific than the others of their label are made
    more likely. The baseline is per label: with one baseline for the batch, the label the generator
    already writes best wins every weight and the generator learns to write that class for every prompt.
    Unlike the straight-through specificity term, it moves whole sampled texts, which stay fluent
    because the generator wrote them.
    gen_logits [B*T, V]; gen_ids [B*T]; mask [B*T] float; teacher_logits [B, K]; target_labels [B].
    """
    B = teacher_logits.shape[0]
    p = ops.softmax(teacher_logits.astype(ms.float32), -1)
    onehot = ops.one_hot(target_labels, teacher_logits.shape[-1], 1.0, 0.0).astype(ms.float32)
    p_target = ops.stop_gradient((p * onehot).sum(-1))
    label_mean = (onehot * p_target.reshape(-1, 1)).sum(0) / ops.maximum(onehot.sum(0), 1.0)  # [K]
    weight = ops.relu(p_target - (onehot * label_mean.reshape(1, -1)).sum(-1))
    logp = ops.log_softmax(gen_logits.astype(ms.float32), -1)
    tok = ops.gather_elements(logp, 1, gen_ids.reshape(-1, 1).astype(ms.int32)).reshape(B, -1)
    m = mask.reshape(B, -1)
    mean_logp = (tok * m).sum(-1) / ops.maximum(m.sum(-1), 1.0)
    return -(weight * mean_logp).sum() / B


def student_kd_loss(student_logits, teacher_logits, kd_temperature):
    """tau^2 KL(softmax(z_T/tau) || softmax(z_S/tau)); teacher logits carry no gradient."""
    return kd_loss(student_logits, ops.stop_gradient(teacher_logits), kd_temperature)


# ------------------------------------------------------------------ token classification (NER)

def token_kd_loss(student_logits, teacher_logits, mask, kd_temperature):
    """tau^2 KL(softmax(t/tau) || softmax(s/tau)) per token, averaged over the real tokens (mask 1).

    student_logits / teacher_logits: [B, L, C]; mask: [B, L] (1 real, 0 padding or not scored). Masked
    positions are zeroed in both logits before the KL, so whatever they hold (inf or NaN included) adds
    nothing to the loss or the gradients; an all-zero mask gives 0. Gradients reach both sides (as
    kd_loss): wrap the teacher in stop_gradient for the student step, negate for the adversarial term.
    """
    B, L, C = student_logits.shape
    keep = (mask > 0).reshape(B, L, 1)
    s, t = student_logits.astype(ms.float32), teacher_logits.astype(ms.float32)
    s = ops.where(keep, s, ops.zeros_like(s)).reshape(B * L, C)
    t = ops.where(keep, t, ops.zeros_like(t)).reshape(B * L, C)
    return kd_loss(s, t, kd_temperature, row_weights=keep.reshape(B * L).astype(ms.float32))


def token_specificity_loss(teacher_logits, mask, target_tag_ids):
    """-log max_l p_T(B-target_b | position l) averaged over the rows: the sample should hold, somewhere,
    a token the teacher tags as the beginning of the entity type it was asked for.

    teacher_logits: [B, L, C]; mask: [B, L] (1 real); target_tag_ids: [B], the id of each row's B- tag.
    The max runs over real positions only, in log space; the gradient goes to the best position. A row
    with no real position is left out of the mean (an all-padding batch gives 0).
    """
    B, L, C = teacher_logits.shape
    logp = ops.log_softmax(teacher_logits.astype(ms.float32), -1)
    onehot = ops.one_hot(target_tag_ids, C, 1.0, 0.0).astype(ms.float32).reshape(B, 1, C)
    keep = mask > 0
    lp = (logp * onehot).sum(-1)                                  # [B, L] log p(B-target)
    lp = ops.where(keep, lp, ops.full_like(lp, -1e9))
    has = ops.any(keep, -1).astype(ms.float32)                    # [B] rows with a real position
    best = ops.amax(lp, -1) * has
    return -best.sum() / ops.maximum(has.sum(), 1.0)
