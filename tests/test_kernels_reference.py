"""The numpy references of kernels/ against finite differences and formulas written out here.

Every fast path is tested against these references, so they are checked first on their own."""
import numpy as np
import pytest

from kernels import kd_loss_reference as kref
from kernels import soft_embedding_reference as sref
from kernels.gumbel_noise import gumbel_np


def _central_difference(f, x, eps=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + eps
        up = f(x)
        x[idx] = old - eps
        down = f(x)
        x[idx] = old
        grad[idx] = (up - down) / (2 * eps)
    return grad


def _problem(n=5, v=7, widths=(3, 2), seed=0):
    # float32-representable values: the references round their inputs to float32, as the paths see them
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, v)) * 2).astype(np.float32).astype(np.float64)
    tables = [rng.normal(size=(v, h)).astype(np.float32).astype(np.float64) for h in widths]
    dout = rng.normal(size=(n, sum(widths)))
    return logits, tables, dout


def test_soft_forward_matches_formula_written_here():
    logits, tables, _ = _problem()
    seed, tau, offset = 11, 0.6, 3
    g = gumbel_np(seed, np.arange(5) + offset, np.arange(7)).astype(np.float64)
    z = (logits + g) / tau
    y = np.exp(z - z.max(1, keepdims=True))
    y /= y.sum(1, keepdims=True)
    value, soft, _ = sref.soft_embedding_forward(logits, tables, seed, tau, hard=False, row_offset=offset)
    np.testing.assert_allclose(value, y @ np.concatenate(tables, 1), rtol=1e-12)
    np.testing.assert_allclose(soft, value)


def test_hard_forward_is_a_row_gather_of_the_gumbel_argmax():
    logits, tables, _ = _problem()
    value, _, k = sref.soft_embedding_forward(logits, tables, 5, 0.5, hard=True)
    g = gumbel_np(5, np.arange(5), np.arange(7))
    np.testing.assert_array_equal(k, np.argmax(logits.astype(np.float32) + g, axis=1))
    np.testing.assert_array_equal(value, np.concatenate(tables, 1)[k])
    ids = np.array([0, 6, 6, 1, 2])
    value, _, k = sref.soft_embedding_forward(logits, tables, 5, 0.5, hard=True, ids=ids)
    np.testing.assert_array_equal(value, np.concatenate(tables, 1)[ids])


@pytest.mark.parametrize("hard", [False, True])
def test_soft_backward_matches_finite_differences(hard):
    logits, tables, dout = _problem()
    seed, tau = 3, 0.8

    def loss_of_logits(x):
        # the straight-through gradient is the gradient of the soft output, in both modes
        return (sref.soft_embedding_forward(x, tables, seed, tau, hard=False)[0] * dout).sum()

    # The reference rounds its inputs to float32: steps of 1e-3 keep that rounding at the 1e-4 level of
    # the difference quotient.
    dlogits, dtables = sref.soft_embedding_backward(logits, tables, seed, tau, dout, hard=hard)
    fd = _central_difference(loss_of_logits, logits.copy(), eps=1e-3)
    np.testing.assert_allclose(dlogits, fd, rtol=1e-3, atol=1e-6)

    for i in range(len(tables)):
        def loss_of_table(t, i=i):
            tabs = list(tables)
            tabs[i] = t
            return (sref.soft_embedding_forward(logits, tabs, seed, tau, hard=hard)[0] * dout).sum()
        fd = _central_difference(loss_of_table, tables[i].copy(), eps=1e-3)
        np.testing.assert_allclose(dtables[i], fd, rtol=1e-3, atol=1e-6)


def test_fused_linear_reference_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(4, 3)).astype(np.float32).astype(np.float64)
    lm_head = rng.normal(size=(6, 3)).astype(np.float32).astype(np.float64)
    tables = [rng.normal(size=(6, 2))]
    dout = rng.normal(size=(4, 2))

    def loss(h, w):
        logits = h @ w.T
        return (sref.soft_embedding_forward(logits, tables, 2, 0.9, hard=False)[0] * dout).sum()

    dh, dw = sref.fused_linear_backward(hidden, lm_head, tables, 2, 0.9, dout)
    # the reference rounds the logits to float32 (as the fast paths do); keep steps well above that
    np.testing.assert_allclose(dh, _central_difference(lambda h: loss(h, lm_head), hidden.copy(), 1e-3),
                               rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(dw, _central_difference(lambda w: loss(hidden, w), lm_head.copy(), 1e-3),
                               rtol=1e-3, atol=1e-5)


def test_kd_forward_matches_formula_written_here():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
    temp = 2.5
    p = np.exp(t / temp) / np.exp(t / temp).sum(1, keepdims=True)
    q = np.exp(s / temp) / np.exp(s / temp).sum(1, keepdims=True)
    rows = temp ** 2 * (p * np.log(p / q)).sum(1)
    np.testing.assert_allclose(kref.kd_loss_forward(s, t, temp, "none"), rows, rtol=1e-5)
    np.testing.assert_allclose(kref.kd_loss_forward(s, t, temp), rows.mean(), rtol=1e-5)
    w = np.array([1.0, 0.0, 2.0, 1.0])
    np.testing.assert_allclose(kref.kd_loss_forward(s, t, temp, "mean", w), (w * rows).sum() / w.sum(), rtol=1e-5)
    assert kref.kd_loss_forward(s, t, temp, "mean", np.zeros(4)) == 0.0


@pytest.mark.parametrize("reduction,weights", [("mean", None), ("sum", None), ("mean", [1.0, 0.0, 3.0])])
def test_kd_backward_matches_finite_differences(reduction, weights):
    rng = np.random.default_rng(3)
    s = rng.normal(size=(3, 5)).astype(np.float32).astype(np.float64)
    t = rng.normal(size=(3, 5)).astype(np.float32).astype(np.float64)
    ds, dt = kref.kd_loss_backward(s, t, 1.7, 1.0, reduction, weights)
    fs = _central_difference(lambda x: kref.kd_loss_forward(x, t, 1.7, reduction, weights), s.copy(), 1e-3)
    ft = _central_difference(lambda x: kref.kd_loss_forward(s, x, 1.7, reduction, weights), t.copy(), 1e-3)
    np.testing.assert_allclose(ds, fs, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(dt, ft, rtol=1e-3, atol=1e-6)
