"""Public Gumbel-softmax soft embedding ops: argument checks, then the path chosen by kernels.dispatch.

    soft_embedding(logits, tables, seed, tau, hard=True, ids=None, row_offset=0, grad_tables=False)
    fused_linear_soft_embedding(hidden, lm_head, tables, seed, tau, hard=True, ids=None, row_offset=0)

Both return [N, sum(H_i)]: the tables' embeddings side by side (teacher and student tables go in one
pass, with the same noise). Noise: g[n, v] = kernels.gumbel_noise.gumbel_np noise of (seed,
row_offset + n, v), with seed a python int or an int64 scalar tensor and row_offset a python int.
y = softmax((logits + g) / tau).
    soft mode:  value = y @ concat(tables)
    hard mode:  value = concat(tables)[k], k = ids if given else argmax(logits + g) (an exact row gather);
                straight-through: d value / d logits is taken as that of the soft y @ T.
Gradients: logits (or hidden and lm_head for the fused-linear op). Tables: with grad_tables=True,
y^T @ dout in soft mode and one_hot(k)^T @ dout in hard mode (the gradient of the gathered rows);
otherwise, and always on the fused-linear op, zeros. Outputs have the tables' dtype; the arithmetic is
float32 whatever the input dtypes.

These functions are parsed by MindSpore in graph mode, so everything that is plain Python (checks,
dispatch, op caches) lives in constexpr / lru_cache helpers that run while the graph compiles. After the
checks, kernels.dispatch names the path, and that path's module runs the op with these same arguments.
"""
from mindspore import ops

from kernels import dispatch


@ops.constexpr
def _check(name, n_rows, vocab, table_shapes, table_dtypes, tau, ids_shape):
    for i, shape in enumerate(table_shapes):
        if len(shape) != 2 or shape[0] != vocab:
            raise ValueError(f"{name}: tables[{i}] has shape {tuple(shape)}, expected [V={vocab}, H]")
        if table_dtypes[i] != table_dtypes[0]:
            raise ValueError(f"{name}: tables[{i}] is {table_dtypes[i]} but tables[0] is {table_dtypes[0]}; "
                             f"give all tables one dtype")
    if not tau > 0:
        raise ValueError(f"{name}: tau must be > 0, got {tau}")
    if ids_shape is not None and tuple(ids_shape) != (n_rows,):
        raise ValueError(f"{name}: ids has shape {tuple(ids_shape)}, expected [N={n_rows}]")
    return True


@ops.constexpr
def _check_2d(name, what, shape):
    if len(shape) != 2:
        raise ValueError(f"{name}: {what} must be 2-D, got shape {tuple(shape)}")
    return True


def _check_tables(name, n_rows, vocab, tables, tau, ids):
    if not isinstance(tables, (list, tuple)) or len(tables) == 0:
        raise ValueError(f"{name}: tables must be a non-empty list of [V, H] tensors")
    shapes = tuple([tuple(t.shape) for t in tables])
    dtypes = tuple([t.dtype for t in tables])
    ids_shape = None if ids is None else tuple(ids.shape)
    return _check(name, n_rows, vocab, shapes, dtypes, float(tau), ids_shape)


def soft_embedding(logits, tables, seed, tau, hard=True, ids=None, row_offset=0, grad_tables=False):
    """Gumbel-softmax soft embedding of logits [N, V] through tables [V, H_i] -> [N, sum H_i]."""
    _check_2d("soft_embedding", "logits", logits.shape)
    n_rows, vocab = logits.shape
    _check_tables("soft_embedding", n_rows, vocab, tables, tau, ids)
    tables = tuple(tables)
    path = dispatch.resolve_backend("soft_embedding")
    return dispatch.path_module(path, "soft_embedding").soft_embedding(
        logits, tables, seed, tau, hard, ids, row_offset, grad_tables)


def fused_linear_soft_embedding(hidden, lm_head, tables, seed, tau, hard=True, ids=None, row_offset=0):
    """soft_embedding(hidden @ lm_head^T, ...) without ever holding the [N, V] logits in full."""
    _check_2d("fused_linear_soft_embedding", "hidden", hidden.shape)
    _check_2d("fused_linear_soft_embedding", "lm_head", lm_head.shape)
    n_rows, vocab = hidden.shape[0], lm_head.shape[0]
    _check_tables("fused_linear_soft_embedding", n_rows, vocab, tables, tau, ids)
    tables = tuple(tables)
    path = dispatch.resolve_backend("fused_linear_soft_embedding")
    return dispatch.path_module(path, "fused_linear_soft_embedding").fused_linear_soft_embedding(
        hidden, lm_head, tables, seed, tau, hard, ids, row_offset)
