"""The encoder's exact GELU, LayerNorm and linear layer: gelu(x), layer_norm(x, weight, bias, eps),
linear(x, weight, bias, rows=None).

    gelu(x) = x * Phi(x) = x * (1 + erf(x / sqrt(2))) / 2          elementwise, computed in float32,
                                                                     returned in x's dtype
    layer_norm(x, weight, bias, eps) = (x - mean) / sqrt(var + eps) * weight + bias
                                                                     over the last axis, float32
    linear(x, weight, bias) = x weight^T + bias                      weight [n, k] (torch's layout) on
                                                                     x's last axis k; in x's dtype on the
                                                                     composite path, float32 on the cpu
                                                                     path (returned in x's dtype)
    linear(x, weight, bias, rows)                                    rows [x's shape without its last axis]
                                                                     (a batch's attention mask): the rows
                                                                     where it is 0 give 0 and take no part
                                                                     in the gradients; the cpu path does
                                                                     not compute them
Gradients reach x, weight and bias. The path (cpu: C++ kernels on the CPU device target; composite:
MindSpore's own ops) comes from kernels.dispatch.resolve_encoder_path, which logs it.
"""
from mindspore import ops

from kernels import dispatch


@ops.constexpr
def _check_norm(x_shape, weight_shape, bias_shape, eps):
    d = x_shape[-1] if len(x_shape) else None
    if tuple(weight_shape) != (d,) or tuple(bias_shape) != (d,):
        raise ValueError(f"layer_norm: weight and bias must be [{d}] for x of shape {tuple(x_shape)}, got "
                         f"{tuple(weight_shape)} and {tuple(bias_shape)}")
    if not eps > 0:
        raise ValueError(f"layer_norm: eps must be > 0, got {eps}")
    return True


@ops.constexpr
def _check_linear(x_shape, weight_shape, bias_shape, rows_shape):
    k = x_shape[-1] if len(x_shape) else None
    if len(weight_shape) != 2 or weight_shape[1] != k or tuple(bias_shape) != (weight_shape[0],):
        raise ValueError(f"linear: weight must be [n, {k}] and bias [n] for x of shape {tuple(x_shape)}, got "
                         f"{tuple(weight_shape)} and {tuple(bias_shape)}")
    if rows_shape is not None and tuple(rows_shape) != tuple(x_shape[:-1]):
        raise ValueError(f"linear: rows must be {list(x_shape[:-1])} for x of shape {tuple(x_shape)}, got "
                         f"{list(rows_shape)}")
    return True


def gelu(x):
    """Exact (erf) GELU; see the module docstring."""
    return dispatch.path_module(dispatch.resolve_encoder_path("gelu"), "gelu").gelu(x)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last axis, in float32; see the module docstring."""
    _check_norm(tuple(x.shape), tuple(weight.shape), tuple(bias.shape), float(eps))
    return dispatch.path_module(dispatch.resolve_encoder_path("layer_norm"), "layer_norm").layer_norm(
        x, weight, bias, float(eps))


def linear(x, weight, bias, rows=None):
    """x weight^T + bias over x's last axis; with rows, only where rows is nonzero; see the module docstring."""
    _check_linear(tuple(x.shape), tuple(weight.shape), tuple(bias.shape),
                  None if rows is None else tuple(rows.shape))
    return dispatch.path_module(dispatch.resolve_encoder_path("linear"), "linear").linear(x, weight, bias, rows)
