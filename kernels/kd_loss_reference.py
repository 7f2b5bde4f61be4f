"""Numpy reference of the temperature-scaled KD loss (forward and backward). Tests only.

Per row n, with p = softmax(t / T) (teacher side) and q = softmax(s / T) (student side):
    loss_n = T^2 * KL(p || q) = T^2 * sum_v p_v (log p_v - log q_v)
Reduction: "none" -> [N]; "sum"; "mean" -> sum / N, or sum(w * loss) / sum(w) with row weights w.
Gradients, for an upstream weight c_n = d(reduced)/d(loss_n) * T^2:
    d/ds = c_n / T * (q - p)
    d/dt = c_n / T * p * (log p - log q - KL_n)
"""
import numpy as np


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _rows(student, teacher, temperature):
    s = np.asarray(student, dtype=np.float32).astype(np.float64) / temperature
    t = np.asarray(teacher, dtype=np.float32).astype(np.float64) / temperature
    log_q, log_p = _log_softmax(s), _log_softmax(t)
    p = np.exp(log_p)
    kl = (p * (log_p - log_q)).sum(axis=1)
    return p, log_p, log_q, kl


def row_coefficients(n_rows, reduction="mean", row_weights=None):
    """d(reduced loss) / d(loss_n) for an upstream gradient of 1."""
    if reduction == "none":
        return np.ones(n_rows)
    w = np.ones(n_rows) if row_weights is None else np.asarray(row_weights, np.float64)
    if reduction == "sum":
        return w
    return w / max(w.sum(), 1e-12)


def kd_loss_forward(student, teacher, temperature, reduction="mean", row_weights=None):
    _, _, _, kl = _rows(student, teacher, temperature)
    per_row = temperature ** 2 * kl
    if reduction == "none":
        return per_row
    return float((row_coefficients(len(per_row), reduction, row_weights) * per_row).sum())


def kd_loss_backward(student, teacher, temperature, dout=1.0, reduction="mean", row_weights=None):
    """Returns (dstudent, dteacher) in float64; dout is a scalar, or [N] for reduction="none"."""
    p, log_p, log_q, kl = _rows(student, teacher, temperature)
    c = row_coefficients(len(kl), reduction, row_weights) * np.asarray(dout, np.float64)
    c = (c * temperature)[:, None]  # T^2 / T
    q = np.exp(log_q)
    return c * (q - p), c * p * (log_p - log_q - kl[:, None])
