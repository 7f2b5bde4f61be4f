"""Path ``composite`` of the encoder ops: MindSpore's own ops, gradients from autodiff."""
import functools

import mindspore as ms
from mindspore import ops


def gelu(x):
    # exact GELU written out: the same function as ops.gelu(approximate="none"), whose CPU kernel holds
    # about 5x its output in persistent memory per graph; in float32, as the cpu path (MindSpore's CPU
    # Erf has no bfloat16 kernel)
    x32 = x.astype(ms.float32)
    return (0.5 * x32 * (1.0 + ops.erf(x32 * 0.7071067811865476))).astype(x.dtype)


def linear(x, weight, bias, rows=None):
    # a 2-D MatMul and BiasAdd rather than ops.dense(x, w, b): the latter adds the bias with a broadcasting
    # Add, whose CPU kernel keeps index tables of about 4x its output for the life of the compiled graph
    y = ops.bias_add(ops.dense(x.reshape(-1, x.shape[-1]), weight), bias)
    if rows is not None:  # every row is computed here; the masked ones are zeroed, as the cpu path gives them
        y = y * ops.stop_gradient(rows).reshape(-1, 1).astype(y.dtype)  # a mask has no gradient
    return y.reshape(x.shape[:-1] + (y.shape[-1],))


@functools.lru_cache(maxsize=None)
def _norm(eps):
    return ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)


def layer_norm(x, weight, bias, eps):
    # the fused primitive, not mean/var/sub/div: MindSpore's CPU broadcasting binary ops keep index
    # tables of about 4x their output for the life of a compiled graph (GBs per encoder graph)
    return _norm(eps)(x.astype(ms.float32), weight, bias)[0]
