"""Numpy reference of the encoder's exact GELU, LayerNorm and linear layer, forward and backward, in float64.
Tests only.

    gelu(x) = x * Phi(x),   Phi(x) = (1 + erf(x / sqrt(2))) / 2,   d/dx = Phi(x) + x * phi(x)
    layer_norm(x, w, b) = xhat * w + b over the last axis,  xhat = (x - mean) / sqrt(var + eps)
        dx = (w * dy - mean(w * dy) - xhat * mean(w * dy * xhat)) / sqrt(var + eps)   (means over the axis)
        dw = sum over rows of dy * xhat,   db = sum over rows of dy
    linear(x, w, b) = x w^T + b:  dx = dy w,  dw = dy^T x,  db = sum over rows of dy   (rows: all but the last axis)
    linear(x, w, b, rows): the same on the rows whose mask value is nonzero; the others give y = 0, dx = 0
        and add nothing to dw and db
"""
import math

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def gelu(x):
    x = _f64(x)
    return x * 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))


def gelu_backward(x, dy):
    x = _f64(x)
    cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return _f64(dy) * (cdf + x * pdf)


def _normalise(x, eps):
    x = _f64(x)
    mean = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(axis=-1, keepdims=True) + eps)
    return (x - mean) * rstd, rstd


def layer_norm(x, weight, bias, eps):
    xhat, _ = _normalise(x, eps)
    return xhat * _f64(weight) + _f64(bias)


def layer_norm_backward(x, weight, eps, dy):
    """(dx, dweight, dbias)."""
    xhat, rstd = _normalise(x, eps)
    dy = _f64(dy)
    dxhat = dy * _f64(weight)
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    rows = dy.reshape(-1, dy.shape[-1])
    return dx, (rows * xhat.reshape(rows.shape)).sum(axis=0), rows.sum(axis=0)


def _keep(rows, shape):
    """1.0 where a row counts (rows nonzero; every row when rows is None), broadcast over the last axis."""
    return np.ones(shape[:-1] + (1,)) if rows is None else (np.asarray(rows) != 0).astype(np.float64)[..., None]


def linear(x, weight, bias, rows=None):
    y = _f64(x) @ _f64(weight).T + _f64(bias)
    return y * _keep(rows, y.shape)


def linear_backward(x, weight, dy, rows=None):
    """(dx, dweight, dbias); with rows, only the rows whose value is nonzero take part."""
    x, dy = _f64(x), _f64(dy) * _keep(rows, np.shape(dy))
    rows_x, rows_dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return dy @ _f64(weight), rows_dy.T @ rows_x, rows_dy.sum(axis=0)
