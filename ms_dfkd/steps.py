"""The two training steps of DFKD-T3 as MindSpore cells, and their jitted update functions.

Generator step (docs/METHOD.md): one forward with gradient over [prompt; sample],
straight-through Gumbel-softmax soft embeddings into teacher and student, and
L_G = spec*CE + div*cos + adv*(-tau^2 KL) + flu*KL(G||G0) [+ rwl * reward-weighted NLL].
Student step: tau^2 KL(p_T || p_S) on re-tokenised text (+ optional hidden MSE).

One jitted step function per optimizer (two nn optimizers inside one jitted function
fail in MindSpore with "parameter 'global_step' already exists").
"""
import mindspore as ms
import numpy as np
from mindspore import amp, nn, ops

from kernels import soft_embedding  # by name: graph mode cannot see kernels' lazy __getattr__
from kernels.adamw import adam_weight_decay
from kernels.utils import zero_grad

from . import losses


def soft_sequence_layout(gen_mask):
    """Where [CLS], the soft tokens and [SEP] go in the encoder input, from the sample mask.

    gen_mask: [B, T] (1 for kept tokens, a prefix). Returns float32 [B, T+2, 1] selectors
    (cls, tok, sep) and the int32 [B, T+2] attention mask for the encoder.
    """
    B, T = gen_mask.shape
    lens = gen_mask.sum(1).astype(np.int64)
    j = np.arange(T + 2)[None, :]
    cls = (j == 0)
    tok = (j >= 1) & (j <= lens[:, None])
    sep = j == (lens[:, None] + 1)
    att = (cls | tok | sep).astype(np.int32)
    f = lambda a: np.broadcast_to(a, (B, T + 2)).astype(np.float32)[..., None]
    return f(cls), f(tok), f(sep), att


def place_soft_tokens(e, cls_vec, sep_vec, cls_sel, tok_sel, sep_sel):
    """[B, T, H] soft embeddings -> [B, T+2, H] encoder inputs_embeds with [CLS]/[SEP] embeddings."""
    zeros = ops.zeros((e.shape[0], 1, e.shape[2]), e.dtype)
    body = ops.concat((zeros, e, zeros), 1) * tok_sel
    return body + cls_sel * cls_vec.reshape(1, 1, -1) + sep_sel * sep_vec.reshape(1, 1, -1)


class SampledLogits(nn.Cell):
    """The LM head's output as the sampler computed it: the value is ``given`` [B, T, V] (the logits the
    tokens were drawn from), the gradient that of ``hidden @ weight^T``, d hidden = d logits @ weight. The
    head does not train where this is used (only the top layers do), so weight and given get none. The
    generator step then runs no [B*T, H] x [H, V] product in its forward (79 of an 865 ms step at the offline
    default); the values differ from that product's by the order of the sums only."""

    def construct(self, hidden, weight, given):
        return given

    def bprop(self, hidden, weight, given, out, dout):
        d = ops.matmul(dout.reshape(-1, dout.shape[-1]).astype(ms.float32), weight.astype(ms.float32))
        return d.reshape(hidden.shape).astype(hidden.dtype), zero_grad(weight), zero_grad(given)


class GeneratorLoss(nn.Cell):
    """L_G for one batch. Teacher and student are frozen here; only generator parameters train.

    ``trunk_layers`` = k > 0 (``generator.trainable top_k``): the first argument is not the token ids but
    the states entering the top k layers (``trunk_states``, computed once outside the step, without
    gradient: nothing below layer L-k trains), and the step runs only the top k layers.

    ``label_vectors`` (``generator.label_vectors``): a trainable [K, H] table; the row of each sample's
    target label is added to the states entering the first trainable layer (layer L-k, or the embeddings
    without trunk layers) at every position, as the sampler does (``llama_sampling.sample(steer=...)``).
    It gives the label a direct path into the generator, which the prompt's one label word lacks.

    ``sampled_logits`` (with trunk layers only: the LM head does not train): the last argument is the
    sampler's logits [B, T, V] of the batch, used as the LM head's output (``SampledLogits``)."""

    def __init__(self, generator, teacher, student, prompt_len, max_new_tokens, num_labels,
                 weights, kd_temperature, gumbel_tau, trunk_layers=0, label_vectors=False, sampled_logits=False):
        super().__init__()
        self.trunk_layers = int(trunk_layers)
        if sampled_logits and not self.trunk_layers:
            raise ValueError("sampled_logits needs trunk_layers: with every layer training the LM head may train")
        self.sampled = SampledLogits() if sampled_logits else None
        # zeros: the step starts from G_θ0 exactly
        self.label_vectors = (ms.Parameter(ms.Tensor(np.zeros((num_labels, generator.config.hidden_size),
                                                                np.float32)), name="label_vectors")
                              if label_vectors else None)
        self.generator, self.teacher, self.student = generator, teacher, student
        self.P, self.T, self.K = prompt_len, max_new_tokens, num_labels
        self.w_spec, self.w_div, self.w_adv, self.w_flu = (float(weights.spec), float(weights.div),
                                                           float(weights.adv), float(weights.flu))
        self.w_rwl = float(getattr(weights, "rwl", 0.0))
        self.kd_t, self.tau = float(kd_temperature), float(gumbel_tau)
        self.use_student = self.w_adv != 0.0

    def construct(self, full_ids, full_mask, gen_ids, gen_mask, frozen_logits, targets, seed,
                  table_t, table_s, cls_t, sep_t, cls_s, sep_s, cls_sel, tok_sel, sep_sel, enc_mask, sampled=None):
        B, T = gen_ids.shape
        # the states entering the first trainable layer: the trunk's (full_ids holds them [B, P+T, H]) or the
        # embeddings; the label vectors, if any, are added there
        x = full_ids if self.trunk_layers else self.generator.model.embed(full_ids)
        if self.label_vectors is not None:
            x = x + ops.gather(self.label_vectors, targets, 0).expand_dims(1).astype(x.dtype)  # [B, 1, H]
        # logits at position i predict token i+1: the sample's logits are P-1 .. P+T-2. The LM head
        # runs on those T positions only (the prompt's [B, P, V] logits would be dead weight), and with
        # trunk layers so do the top layer's queries, output projection and MLP.
        if self.trunk_layers:
            hidden = self.generator.top_hidden_states(x, full_mask, self.trunk_layers, rows=(self.P - 1, T))
        else:
            hidden = self.generator.hidden_states(inputs_embeds=x, attention_mask=full_mask)
            hidden = hidden[:, self.P - 1:self.P - 1 + T, :]
        if self.sampled is not None:
            gl = self.sampled(hidden, self.generator.lm_head_weight(), sampled)
        else:
            gl = self.generator.logits_from_hidden(hidden)
        gl = gl.reshape(B * T, -1).astype(ms.float32)
        H_t = table_t.shape[1]
        emb = soft_embedding(gl, (table_t, table_s), seed, self.tau, hard=True,
                                     ids=gen_ids.reshape(-1))
        e_t = emb[:, :H_t].reshape(B, T, H_t)
        e_s = emb[:, H_t:].reshape(B, T, -1)
        t_in = place_soft_tokens(e_t, cls_t, sep_t, cls_sel, tok_sel, sep_sel)
        t_logits, t_feat = self.teacher(inputs_embeds=t_in, attention_mask=enc_mask, return_features=True)
        spec = self.specificity(t_logits, targets, tok_sel)
        div = losses.diversity_loss(t_feat, targets, self.K)
        if self.use_student:
            s_in = place_soft_tokens(e_s, cls_s, sep_s, cls_sel, tok_sel, sep_sel)
            s_logits = self.student(inputs_embeds=s_in, attention_mask=enc_mask)
            adv = self.adversarial(s_logits, t_logits, tok_sel)
        else:
            adv = ops.zeros((), ms.float32)
        flu = losses.fluency_loss(gl, frozen_logits, gen_mask.reshape(-1).astype(ms.float32))
        total = self.w_spec * spec + self.w_div * div + self.w_adv * adv + self.w_flu * flu
        if self.w_rwl != 0.0:
            rwl = losses.reward_weighted_nll(gl, gen_ids, gen_mask.reshape(-1).astype(ms.float32), t_logits, targets)
            total = total + self.w_rwl * rwl
        else:
            rwl = ops.zeros((), ms.float32)
        return total, spec, div, adv, flu, self.reported_logits(t_logits, tok_sel), rwl

    # The task's terms; token_steps.TokenGeneratorLoss reads the teacher per position (tok_sel [B, T+2, 1]
    # marks the generator tokens among the encoder positions).
    def specificity(self, t_logits, targets, tok_sel):
        return losses.specificity_loss(t_logits, targets)

    def adversarial(self, s_logits, t_logits, tok_sel):
        return losses.adversarial_loss(s_logits, t_logits, self.kd_t)

    def reported_logits(self, t_logits, tok_sel):
        """The teacher's soft-path logits the step returns (the driver's bridge agreement reads them)."""
        return t_logits


class StudentLoss(nn.Cell):
    """tau^2 KL(p_T || p_S) + alpha * MSE(W h_S, h_T) on the pooled features."""

    def __init__(self, student, kd_temperature, hidden_mse=0.0, student_dim=None, teacher_dim=None):
        super().__init__()
        self.student = student
        self.kd_t = float(kd_temperature)
        self.alpha = float(hidden_mse)
        self.proj = nn.Dense(student_dim, teacher_dim) if self.alpha > 0 else None

    def construct(self, ids, mask, teacher_logits, teacher_feat):
        s_logits, s_feat = self.student(input_ids=ids, attention_mask=mask, return_features=True)
        loss = losses.student_kd_loss(s_logits, teacher_logits, self.kd_t)
        if self.proj is not None:
            d = self.proj(s_feat) - ops.stop_gradient(teacher_feat)
            loss = loss + self.alpha * (d * d).mean()
        return loss, s_logits


def make_train_step(loss_cell, optimizer, jit=True, grad_reducer=None, loss_scaler=None):
    """value_and_grad over the optimizer's parameters; returns step(*inputs) -> (loss, *aux).

    grad_reducer (e.g. nn.DistributedGradReducer) averages gradients across ranks.
    loss_scaler (mindspore.amp.DynamicLossScaler) is for float16 compute: the loss is scaled
    before the backward pass so that small gradients do not underflow in float16, and the
    gradients are unscaled after it. A step whose gradients are not finite is skipped (no
    parameter or optimizer-state change) and the scale is lowered; the check runs on the
    rank-averaged gradients, so every rank skips the same steps. Parameters and optimizer
    states stay float32 (the models cast weights to their compute dtype inside the matmuls).
    """
    if loss_scaler is None:
        forward = loss_cell
    else:
        def forward(*inputs):
            loss, *aux = loss_cell(*inputs)
            return (loss_scaler.scale(loss), *aux)
    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters, has_aux=True)

    def step(*inputs):
        (loss, *aux), grads = grad_fn(*inputs)
        if grad_reducer is not None:
            grads = grad_reducer(grads)
        if loss_scaler is None:
            loss = ops.depend(loss, optimizer(grads))
            return (loss, *aux)
        loss = loss_scaler.unscale(loss)
        grads = loss_scaler.unscale(grads)
        finite = amp.all_finite(grads)
        if finite:
            loss = ops.depend(loss, optimizer(grads))
        loss_scaler.adjust(finite)
        return (loss, *aux)

    return ms.jit(step) if jit else step


def loss_scaler_for(*models):
    """Dynamic loss scaling when a model on the backward path computes in float16 (small
    gradients underflow there); float32 and bfloat16 (float32's exponent range) need none."""
    if not any(getattr(m.config, "compute_dtype", "float32") == "float16" for m in models):
        return None
    return amp.DynamicLossScaler(scale_value=2.0 ** 16, scale_factor=2, scale_window=1000)


class StudentStep:
    """One KD update of the student on texts, given the teacher's logits (and pooled features) on them.

    The driver's student step (targets from the replay buffer) and distill-from-texts (targets from
    saved teacher probabilities) both run this. ``teacher`` is only read for its hidden size and
    compute dtype; the teacher is never run here.
    """

    def __init__(self, student, tokenizer, max_length, batch_size, lr, kd_temperature, hidden_mse=0.0,
                 teacher=None, jit=True, grad_reducer_factory=None):
        for p in student.get_parameters():
            p.requires_grad = True
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        teacher_dim = teacher.config.hidden_size if teacher is not None else None
        self.loss_cell = StudentLoss(student, kd_temperature, hidden_mse, student.config.hidden_size, teacher_dim)
        self.optimizer = adam_weight_decay(self.loss_cell.trainable_params(), learning_rate=lr, weight_decay=0.01)
        reducer = grad_reducer_factory(self.optimizer.parameters) if grad_reducer_factory else None
        self.loss_scaler = loss_scaler_for(*([teacher] if teacher is not None else []), student)
        self._step = make_train_step(self.loss_cell, self.optimizer, jit=jit, grad_reducer=reducer,
                                     loss_scaler=self.loss_scaler)

    def __call__(self, texts, teacher_logits, teacher_features, what="student step"):
        """One update; returns the loss (float). A non-finite loss raises FloatingPointError naming ``what``."""
        ids, mask = self.tokenizer.encode_batch(texts, max_length=self.max_length, padding="bucket")
        loss, _ = self._step(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(np.asarray(teacher_logits, np.float32)),
                             ms.Tensor(np.asarray(teacher_features, np.float32)))
        loss = float(loss.asnumpy())
        if not np.isfinite(loss):
            raise FloatingPointError(f"{what}: loss = {loss}")
        return loss
