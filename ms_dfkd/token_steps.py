"""The two training steps of DFKD-T3 for a token task (NER; docs/METHOD.md, "Token tasks (NER)").

Generator step: GeneratorLoss's soft path with the teacher read per position: specificity is the
teacher finding the B- tag of the requested type at some generator token, the adversarial term a
per-position KL over the tag distribution, both masked to the generator's tokens.
Student step: tau^2 KL per word-piece on re-tokenised text. Teacher and student share the WordPiece
tokenizer, so position j of the teacher's labelling is position j of the student's input; the KL runs
over the real word-pieces both see ([CLS], [SEP] and padding excluded).
"""
import mindspore as ms
import numpy as np
from mindspore import nn, ops

from kernels.adamw import adam_weight_decay

from . import losses
from .steps import GeneratorLoss, loss_scaler_for, make_train_step


def b_tag_ids(type_ids):
    """The tag id of B-<type k> (ner_data.bio_tag_names: O, B-t1, I-t1, B-t2, ...): 1 + 2k."""
    return 1 + 2 * type_ids


class TokenGeneratorLoss(GeneratorLoss):
    """L_G of a token task: the labels are entity types (targets [B] type ids); the teacher's logits are
    [B, T+2, C] over the encoder positions, of which tok_sel marks the generator's tokens."""

    def specificity(self, t_logits, targets, tok_sel):
        return losses.token_specificity_loss(t_logits, tok_sel[..., 0], b_tag_ids(targets))

    def adversarial(self, s_logits, t_logits, tok_sel):
        return -losses.token_kd_loss(s_logits, t_logits, tok_sel[..., 0], self.kd_t)

    def reported_logits(self, t_logits, tok_sel):
        # zero outside the generator's tokens: there every tag ties and the argmax is O (tag 0)
        return t_logits * tok_sel


def aligned_targets(student_mask, teacher_logits, teacher_counts=None):
    """The teacher's per-position logits on the student's input, and the KD mask.

    student_mask: int [B, Ls] attention mask of the student's encoding ([CLS] pieces [SEP] padding);
    teacher_logits: [B, Lt, C] of the teacher's encoding of the same texts with the same tokenizer (position
    0 its [CLS]). Position j >= 1 is the same word-piece on both sides until either truncates. Returns
    (float32 [B, Ls, C] targets, float32 [B, Ls] mask): 1 at 1 <= j <= min(n_student, n_teacher), with
    n_student = the student's real word-pieces (mask sum - 2) and n_teacher = teacher_counts [B] (default:
    Lt - 2, the teacher's truncation; the text's own length is in n_student); positions past the teacher's
    array are 0."""
    teacher_logits = np.asarray(teacher_logits, np.float32)
    B, Ls = student_mask.shape
    Lt, C = teacher_logits.shape[1], teacher_logits.shape[2]
    targets = np.zeros((B, Ls, C), np.float32)
    w = min(Ls, Lt)
    targets[:, :w] = teacher_logits[:, :w]
    n_teacher = Lt - 2 if teacher_counts is None else np.asarray(teacher_counts)
    n = np.minimum(np.asarray(student_mask).sum(1) - 2, n_teacher)
    j = np.arange(Ls)[None, :]
    return targets, ((j >= 1) & (j <= n[:, None])).astype(np.float32)


class TokenStudentLoss(nn.Cell):
    """tau^2 KL(p_T || p_S) per position over the KD mask (losses.token_kd_loss); no teacher gradient."""

    def __init__(self, student, kd_temperature):
        super().__init__()
        self.student = student
        self.kd_t = float(kd_temperature)

    def construct(self, ids, mask, teacher_logits, kd_mask):
        s_logits = self.student(input_ids=ids, attention_mask=mask)
        return losses.token_kd_loss(s_logits, ops.stop_gradient(teacher_logits), kd_mask, self.kd_t), s_logits


class TokenStudentStep:
    """One KD update of a token student on texts, given the teacher's logits [B, Lt, C] on the same texts
    (its encoding, [CLS] first). Called as steps.StudentStep (the features argument is not read)."""

    def __init__(self, student, tokenizer, max_length, batch_size, lr, kd_temperature, teacher=None, jit=True,
                 grad_reducer_factory=None):
        for p in student.get_parameters():
            p.requires_grad = True
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.loss_cell = TokenStudentLoss(student, kd_temperature)
        self.optimizer = adam_weight_decay(self.loss_cell.trainable_params(), learning_rate=lr, weight_decay=0.01)
        reducer = grad_reducer_factory(self.optimizer.parameters) if grad_reducer_factory else None
        self.loss_scaler = loss_scaler_for(*([teacher] if teacher is not None else []), student)
        self._step = make_train_step(self.loss_cell, self.optimizer, jit=jit, grad_reducer=reducer,
                                     loss_scaler=self.loss_scaler)

    def __call__(self, texts, teacher_logits, teacher_features=None, what="student step", teacher_counts=None):
        ids, mask = self.tokenizer.encode_batch(texts, max_length=self.max_length, padding="max_length")
        targets, kd_mask = aligned_targets(mask, teacher_logits, teacher_counts)
        loss, _ = self._step(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(targets), ms.Tensor(kd_mask))
        loss = float(loss.asnumpy())
        if not np.isfinite(loss):
            raise FloatingPointError(f"{what}: loss = {loss}")
        return loss
