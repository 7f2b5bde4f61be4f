"""The per-token losses of the NER task against numpy written from their formulas (float64 loops over the real
positions), with garbage in the masked positions, and their gradients against finite differences of the
numpy references (PyNative). Tolerances are float32's with MindSpore's CPU log (good to ~5e-6, times
tau^2 in the KD loss)."""
import numpy as np
import pytest

import mindspore as ms

from ms_dfkd.losses import token_kd_loss, token_specificity_loss


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def ref_token_kd(s, t, mask, tau):
    """tau^2 * mean over the real tokens of sum_c p_t (log p_t - log p_s), p = softmax(. / tau)."""
    vals = []
    for b, l in zip(*np.nonzero(mask)):
        lp, lq = _log_softmax(t[b, l] / tau), _log_softmax(s[b, l] / tau)
        vals.append(tau ** 2 * (np.exp(lp) * (lp - lq)).sum())
    return float(np.mean(vals)) if vals else 0.0


def ref_token_spec(t, mask, y):
    """Mean over the rows with a real token of -log max_{real l} softmax(t[b, l])[y_b]."""
    vals = []
    for b in range(t.shape[0]):
        real = np.nonzero(mask[b])[0]
        if len(real):
            vals.append(-np.log(max(np.exp(_log_softmax(t[b, l]))[y[b]] for l in real)))
    return float(np.mean(vals)) if vals else 0.0


def _case(seed, B, L, C, garbage=True):
    rng = np.random.default_rng(seed)
    s = (rng.normal(size=(B, L, C)) * 2).astype(np.float32)
    t = (rng.normal(size=(B, L, C)) * 3).astype(np.float32)
    lens = rng.integers(1, L + 1, B)
    mask = (np.arange(L)[None, :] < lens[:, None]).astype(np.int32)
    mask[0, 0] = 0 if L > 1 else 1     # a hole inside a row, not only right padding
    if garbage:                         # what padding rows of a model may hold: must not matter
        s[mask == 0] = 1e30
        t[mask == 0] = -1e30
        if (mask == 0).any():
            s[tuple(np.argwhere(mask == 0)[0])] = np.nan
            t[tuple(np.argwhere(mask == 0)[-1])] = np.inf
    y = rng.integers(0, C, B)
    return s, t, mask, y


SHAPES = [(2, 5, 7), (3, 9, 21), (1, 1, 3), (4, 6, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_token_kd_loss_matches_numpy(shape, tau):
    s, t, mask, _ = _case(sum(shape), *shape)
    got = token_kd_loss(ms.Tensor(s), ms.Tensor(t), ms.Tensor(mask), tau).asnumpy()
    assert got.dtype == np.float32
    want = ref_token_kd(s.astype(np.float64), t.astype(np.float64), mask, tau)
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_token_specificity_loss_matches_numpy(shape):
    _, t, mask, y = _case(sum(shape) + 1, *shape)
    got = token_specificity_loss(ms.Tensor(t), ms.Tensor(mask), ms.Tensor(y, ms.int32)).asnumpy()
    assert got.dtype == np.float32
    assert float(got) == pytest.approx(ref_token_spec(t.astype(np.float64), mask, y), rel=1e-4, abs=1e-6)


def test_hand_case_and_empty_masks():
    # one row, two real positions over C = 2; p(tag 1) = sigmoid(2) at l=0 and sigmoid(-1) at l=1
    t = np.array([[[0.0, 2.0], [1.0, 0.0], [0.0, 50.0]]], np.float32)
    mask = np.array([[1, 1, 0]], np.int32)            # the masked l=2 would win the max
    got = token_specificity_loss(ms.Tensor(t), ms.Tensor(mask), ms.Tensor([1], ms.int32))
    assert float(got.asnumpy()) == pytest.approx(np.log1p(np.exp(-2.0)), abs=1e-5)
    # identical student and teacher: no KL
    assert float(token_kd_loss(ms.Tensor(t), ms.Tensor(t), ms.Tensor(mask), 2.0).asnumpy()) == pytest.approx(0, abs=1e-7)
    # a row without real tokens is left out of the specificity mean; an all-zero mask gives 0 for both
    t2 = np.concatenate([t, np.zeros_like(t)])
    m2 = np.array([[1, 1, 0], [0, 0, 0]], np.int32)
    got = token_specificity_loss(ms.Tensor(t2), ms.Tensor(m2), ms.Tensor([1, 0], ms.int32))
    assert float(got.asnumpy()) == pytest.approx(np.log1p(np.exp(-2.0)), abs=1e-5)
    zero = np.zeros((2, 3), np.int32)
    assert float(token_specificity_loss(ms.Tensor(t2), ms.Tensor(zero), ms.Tensor([1, 0], ms.int32)).asnumpy()) == 0
    assert float(token_kd_loss(ms.Tensor(t2), ms.Tensor(t2 + 1), ms.Tensor(zero), 1.0).asnumpy()) == 0


def _fd_grad(f, x, eps=1e-5):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


def test_gradients_match_finite_differences():
    s, t, mask, y = _case(7, 2, 4, 5, garbage=False)
    tau = 2.0
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    m = ms.Tensor(mask)

    def kd(s_, t_):
        return token_kd_loss(s_, t_, m, tau)
    gs, gt = ms.grad(kd, grad_position=(0, 1))(ms.Tensor(s), ms.Tensor(t))
    want_s = _fd_grad(lambda x: ref_token_kd(x, t64, mask, tau), s64)
    want_t = _fd_grad(lambda x: ref_token_kd(s64, x, mask, tau), t64)
    np.testing.assert_allclose(gs.asnumpy(), want_s, atol=2e-6, rtol=1e-4)
    np.testing.assert_allclose(gt.asnumpy(), want_t, atol=2e-6, rtol=1e-4)
    assert np.all(gs.asnumpy()[mask == 0] == 0) and np.abs(want_s).sum() > 0.1

    yt = ms.Tensor(y, ms.int32)
    g = ms.grad(lambda t_: token_specificity_loss(t_, m, yt))(ms.Tensor(t)).asnumpy()
    want = _fd_grad(lambda x: ref_token_spec(x, mask, y), t64)
    np.testing.assert_allclose(g, want, atol=2e-6, rtol=1e-4)
    # the gradient sits on one position per row: the best real one
    assert all((np.abs(g[b]).sum(-1) > 0).sum() == 1 for b in range(g.shape[0]))
