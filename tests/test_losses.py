"""The generator losses and the student loss (METHOD.md) against numpy written from the formulas.

Each reference below is a loop or a direct formula in float64, independent of kernels' references.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import nn, ops, Parameter

from ms_dfkd import losses
from ms_dfkd.steps import StudentLoss


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl_rows(p_logits, q_logits, tau):
    """KL(softmax(p/tau) || softmax(q/tau)) per row."""
    lp, lq = _log_softmax(p_logits / tau), _log_softmax(q_logits / tau)
    return (np.exp(lp) * (lp - lq)).sum(-1)


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_specificity_loss_is_cross_entropy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 3)) * 2
    y = np.array([0, 1, 2, 2, 1, 0])
    want = -np.mean([_log_softmax(z)[i, y[i]] for i in range(6)])
    got = losses.specificity_loss(ms.Tensor(z, ms.float32), ms.Tensor(y, ms.int32)).asnumpy()
    assert abs(float(got) - want) < 1e-5


def test_diversity_loss_is_mean_cosine_over_same_label_pairs():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(7, 5))
    y = np.array([0, 1, 0, 1, 1, 2, 0])  # label 2 has one sample: no pair
    sims = [f[i] @ f[j] / np.linalg.norm(f[i]) / np.linalg.norm(f[j])
            for i in range(7) for j in range(7) if i != j and y[i] == y[j]]
    got = losses.diversity_loss(ms.Tensor(f, ms.float32), ms.Tensor(y, ms.int32), 3).asnumpy()
    assert abs(float(got) - np.mean(sims)) < 1e-5


def test_adversarial_loss_is_minus_scaled_kl_teacher_to_student():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(5, 2)), rng.normal(size=(5, 2)) * 3
    want = -(2.0 ** 2) * _kl_rows(t, s, 2.0).mean()
    got = losses.adversarial_loss(ms.Tensor(s, ms.float32), ms.Tensor(t, ms.float32), 2.0).asnumpy()
    assert abs(float(got) - want) < 1e-5


def test_fluency_loss_is_masked_kl_generator_to_frozen():
    rng = np.random.default_rng(3)
    g, f = rng.normal(size=(6, 11)), rng.normal(size=(6, 11))
    m = np.array([1, 1, 0, 1, 0, 1], np.float64)
    want = (_kl_rows(g, f, 1.0) * m).sum() / m.sum()
    got = losses.fluency_loss(ms.Tensor(g, ms.float32), ms.Tensor(f, ms.float32), ms.Tensor(m, ms.float32))
    assert abs(float(got.asnumpy()) - want) < 1e-5


class _LinearStudent(nn.Cell):
    """logits = x @ A, features = x @ F, from an already embedded input (stands in for an encoder)."""

    def __init__(self, A, F):
        super().__init__()
        self.A = Parameter(ms.Tensor(A, ms.float32), name="A")
        self.F = Parameter(ms.Tensor(F, ms.float32), name="F")

    def construct(self, input_ids=None, attention_mask=None, return_features=False):
        x = input_ids.astype(ms.float32)
        return ops.matmul(x, self.A), ops.matmul(x, self.F)


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_student_loss_kd_plus_hidden_mse_and_its_gradients(alpha):
    """loss = tau^2 KL(p_T || p_S) + alpha * mean((W h_S + b - h_T)^2); the teacher side gets no gradient."""
    rng = np.random.default_rng(4)
    N, D_in, D_s, D_t, tau = 4, 3, 5, 6, 2.0
    x = rng.normal(size=(N, D_in))
    A, F = rng.normal(size=(D_in, 2)), rng.normal(size=(D_in, D_s))
    t_logits, t_feat = rng.normal(size=(N, 2)) * 2, rng.normal(size=(N, D_t))
    cell = StudentLoss(_LinearStudent(A, F), tau, alpha, D_s, D_t)
    args = [ms.Tensor(x, ms.float32), ms.Tensor(np.ones((N, D_in), np.int32)),
            ms.Tensor(t_logits, ms.float32), ms.Tensor(t_feat, ms.float32)]
    loss, _ = cell(*args)

    s_logits, h_s = x @ A, x @ F
    want = tau ** 2 * _kl_rows(t_logits, s_logits, tau).mean()
    if alpha:
        W = cell.proj.weight.asnumpy().astype(np.float64)  # nn.Dense stores [out, in]
        b = cell.proj.bias.asnumpy().astype(np.float64)
        d = h_s @ W.T + b - t_feat
        want += alpha * (d ** 2).mean()
    assert abs(float(loss.asnumpy()) - want) < 1e-4 * max(1.0, abs(want))

    params = cell.trainable_params()
    names = [p.name for p in params]
    assert ("proj.weight" in " ".join(names)) == bool(alpha)  # the projection trains with the student
    grads = ms.grad(lambda *a: cell(*a)[0], grad_position=(2, 3), weights=params)(*args)
    (g_tlogits, g_tfeat), g_params = grads
    assert np.abs(g_tlogits.asnumpy()).max() == 0 and np.abs(g_tfeat.asnumpy()).max() == 0
    # dL/dF: KD part through logits is zero for F; the MSE part is alpha * 2/(N*D_t) * x^T (d W)
    grad_of = dict(zip(names, g_params))
    gF = grad_of[cell.student.F.name].asnumpy()
    wantF = alpha * 2.0 / (N * D_t) * x.T @ (d @ W) if alpha else np.zeros_like(F)
    np.testing.assert_allclose(gF, wantF, rtol=1e-4, atol=1e-6)
    # dL/dA: tau^2 * (q - p) / tau / N through the logits (p teacher, q student, at tau)
    p, q = np.exp(_log_softmax(t_logits / tau)), np.exp(_log_softmax(s_logits / tau))
    np.testing.assert_allclose(grad_of[cell.student.A.name].asnumpy(), x.T @ ((q - p) * tau / N),
                               rtol=1e-4, atol=1e-6)


def test_reward_weighted_nll_matches_a_loop_and_its_gradient():
    """-sum_b max(p_b - mean of p over b's label, 0) * mean_t log softmax(l_bt)[z_bt] / B, with p_b the
    teacher's probability of the target; the gradient w.r.t. the generator logits is
    -w_b / (B n_b) (onehot(z) - softmax(l))."""
    rng = np.random.default_rng(5)
    B, T, V, K = 6, 3, 7, 2
    gl = rng.normal(size=(B * T, V))
    z = rng.integers(0, V, B * T)
    mask = np.ones(B * T)
    mask[[2, 7, 8, 17]] = 0  # ragged lengths
    tl = rng.normal(size=(B, K)) * 2
    y = np.array([0, 1, 0, 0, 1, 1])
    p = np.exp(_log_softmax(tl))[np.arange(B), y]
    w = np.array([max(p[b] - p[y == y[b]].mean(), 0) for b in range(B)])
    expected, grad = 0.0, np.zeros_like(gl)
    for b in range(B):
        rows = [b * T + t for t in range(T) if mask[b * T + t]]
        lp = [_log_softmax(gl[r])[z[r]] for r in rows]
        expected -= w[b] * np.mean(lp) / B
        for r in rows:
            sm = np.exp(_log_softmax(gl[r]))
            grad[r] = -w[b] / (B * len(rows)) * (np.eye(V)[z[r]] - sm)
    args = [ms.Tensor(gl.astype(np.float32)), ms.Tensor(z.astype(np.int32)), ms.Tensor(mask.astype(np.float32)),
            ms.Tensor(tl.astype(np.float32)), ms.Tensor(y.astype(np.int32))]
    got = losses.reward_weighted_nll(*args)
    np.testing.assert_allclose(float(got.asnumpy()), expected, rtol=1e-5)
    g = ms.grad(losses.reward_weighted_nll, grad_position=(0, 3))(*args)
    np.testing.assert_allclose(g[0].asnumpy(), grad, atol=1e-6)
    assert np.abs(g[1].asnumpy()).max() == 0  # the teacher's probability is a weight, not a target
    assert w.max() > 0 and (w == 0).any()  # the case exercises both sides of the max
