"""The DFKD-T3 generator step and student step in eager PyTorch, written from shared/METHOD.md.

Everything random comes in as data: the Gumbel noise g [B*T, V] (kernels.gumbel_noise.gumbel_np of the
batch's seed, rows b*T + t), the sampled tokens and their mask, the prompts and the labels, so that
this code and ms_dfkd see identical numbers.

Generator step (METHOD.md "One generator step", items 4-7, and L_G):
    logits    one forward with gradient over [prompt; sample]; position P-1+t predicts sample token t
    y_t       softmax((logits_t + g_t) / tau); straight-through: value one_hot(z_t), gradient of y_t
    e_t       y_t . E_hat for the teacher and for the student (E_hat = bridge @ word embeddings)
    encoder   [CLS] e_1 .. e_L [SEP] (L = kept tokens of the row), then padding, attention-masked
    L_G = spec * CE(T(e), label) + div * mean same-label cosine(teacher features)
          + adv * (-kd_t^2 KL(p_T || p_S)) + flu * sum_t m_t KL(G || G0)_t / sum_t m_t
Student step: kd_t^2 KL(softmax(z_T/kd_t) || softmax(z_S/kd_t)) (teacher under no grad),
    plus alpha * mean((W h_S + b - h_T)^2) on the pooled features when alpha > 0.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    spec: float = 1.0
    div: float = 0.5
    adv: float = 0.1
    flu: float = 0.5


def kl_rows(p_logits, q_logits, temperature=1.0):
    """KL(softmax(p/T) || softmax(q/T)) per row, [N]."""
    log_p = F.log_softmax(p_logits / temperature, -1)
    log_q = F.log_softmax(q_logits / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def straight_through_gumbel(logits, noise, ids, tau):
    """[N, V] logits and noise, [N] sampled ids -> [N, V] one_hot(ids) whose gradient is that of
    softmax((logits + noise) / tau)."""
    y = torch.softmax((logits + noise) / tau, -1)
    hard = F.one_hot(ids.long(), logits.shape[-1]).to(y.dtype)
    return hard - y.detach() + y


def encoder_inputs(soft, gen_mask, cls_vec, sep_vec):
    """soft [B, T, H] -> ([B, T+2, H] = [CLS] soft[:L] [SEP] 0..., int mask [B, T+2]) per row."""
    b, t, h = soft.shape
    rows, masks = [], []
    for i in range(b):
        n = int(gen_mask[i].sum())
        pad = soft.new_zeros(t - n, h)
        rows.append(torch.cat([cls_vec[None], soft[i, :n], sep_vec[None], pad]))
        masks.append(torch.cat([torch.ones(n + 2, dtype=torch.long), torch.zeros(t - n, dtype=torch.long)]))
    return torch.stack(rows), torch.stack(masks)


def diversity(features, labels):
    """Mean cosine similarity over pairs i != j with the same label (0 when there is none)."""
    f = F.normalize(features, dim=-1, eps=1e-12)
    sim = f @ f.T
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(labels), dtype=torch.bool)
    n = same.sum()
    return (sim * same).sum() / n.clamp_min(1)


def generator_loss(generator, frozen, teacher, student, batch, tables, specials, weights, kd_temperature, tau):
    """L_G and its terms for one batch (a dict of tensors).

    batch: prompt_ids, prompt_mask [B, P]; gen_ids, gen_mask [B, T]; labels [B]; noise [B*T, V].
    tables: (E_hat teacher, E_hat student) [V_G, H]; specials: (cls_t, sep_t, cls_s, sep_s) [H].
    """
    P = batch["prompt_ids"].shape[1]
    B, T = batch["gen_ids"].shape
    full_ids = torch.cat([batch["prompt_ids"], batch["gen_ids"]], 1)
    full_mask = torch.cat([batch["prompt_mask"], batch["gen_mask"]], 1)
    logits = generator(full_ids, full_mask)[:, P - 1:P - 1 + T]          # [B, T, V]
    with torch.no_grad():
        logits0 = frozen(full_ids, full_mask)[:, P - 1:P - 1 + T]
    V = logits.shape[-1]
    y = straight_through_gumbel(logits.reshape(B * T, V), batch["noise"], batch["gen_ids"].reshape(-1), tau)
    cls_t, sep_t, cls_s, sep_s = specials
    x_t, enc_mask = encoder_inputs((y @ tables[0]).view(B, T, -1), batch["gen_mask"], cls_t, sep_t)
    t_logits, t_feat = teacher(inputs_embeds=x_t, attention_mask=enc_mask)
    out = {"spec": F.cross_entropy(t_logits, batch["labels"].long()),
           "div": diversity(t_feat, batch["labels"])}
    if weights.adv != 0:
        x_s, _ = encoder_inputs((y @ tables[1]).view(B, T, -1), batch["gen_mask"], cls_s, sep_s)
        s_logits, _ = student(inputs_embeds=x_s, attention_mask=enc_mask)
        out["adv"] = -kd_temperature ** 2 * kl_rows(t_logits, s_logits, kd_temperature).mean()
    else:
        out["adv"] = torch.zeros(())
    m = batch["gen_mask"].reshape(-1).float()
    out["flu"] = (kl_rows(logits.reshape(B * T, V), logits0.reshape(B * T, V)) * m).sum() / m.sum().clamp_min(1e-12)
    out["total"] = (weights.spec * out["spec"] + weights.div * out["div"] + weights.adv * out["adv"]
                    + weights.flu * out["flu"])
    out["teacher_logits"] = t_logits
    return out


def student_loss(student, teacher, batch, kd_temperature, alpha=0.0, proj=None):
    """batch: teacher_ids, teacher_mask (teacher tokenization), student_ids, student_mask. Returns a dict."""
    with torch.no_grad():
        t_logits, t_feat = teacher(batch["teacher_ids"], batch["teacher_mask"])
    s_logits, s_feat = student(batch["student_ids"], batch["student_mask"])
    kd = kd_temperature ** 2 * kl_rows(t_logits, s_logits, kd_temperature).mean()
    out = {"kd": kd, "total": kd}
    if alpha > 0:
        out["mse"] = (proj(s_feat) - t_feat).pow(2).mean()
        out["total"] = kd + alpha * out["mse"]
    return out


def train_step(loss_fn, optimizer):
    """One optimizer step on loss_fn()['total']; returns the loss dict (detached floats)."""
    optimizer.zero_grad(set_to_none=True)
    out = loss_fn()
    out["total"].backward()
    optimizer.step()
    return {k: v.item() for k, v in out.items() if v.dim() == 0}
