"""MindSpore helpers shared by the paths of kernels/: row slabs, gradient stand-ins, the kernels' argument
packing, and the Gumbel noise of kernels.gumbel_noise on MindSpore tensors.

Everything here may be parsed by MindSpore in graph mode (inside the ops' functions and the bprops of
their Cells), so the plain-Python parts (shape arithmetic, constant tensors) are lru_cache objects,
which graph mode runs in Python while the graph compiles; primitives are instantiated once here, since
inside a bprop graph mode fails to compile some functional wrappers (ops.tile, ops.clamp, ops.arange:
"The func graph is empty").

The numpy-only helpers of the noise contract are in kernels/gumbel_noise.py.
"""
import functools

import mindspore as ms
import numpy as np
from mindspore import ops

from kernels.gumbel_noise import MASK32, MIX_MULT, U_MAX, U_MIN, mix32_np

# One slab of the composites holds about this many values (the fused-linear op uses its own, smaller
# FUSED_CHUNK_ELEMENTS, in soft_embedding_composite.py). The slab loops are unrolled in graph mode, so
# their number is capped.
CHUNK_ELEMENTS = 1 << 22
MAX_CHUNKS = 256

_tile = ops.Tile()


# ---- row slabs ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def row_chunks(n_rows, vocab, elements=None):
    """((start, stop), ...) over the tokens: slabs of about ``elements`` values (CHUNK_ELEMENTS by
    default), at most MAX_CHUNKS of them."""
    elements = elements or CHUNK_ELEMENTS
    size = min(n_rows, max(elements // max(vocab, 1), -(-n_rows // MAX_CHUNKS), 1))
    return tuple((start, min(start + size, n_rows)) for start in range(0, n_rows, size))


def per_row(column, width):
    """[R, 1] -> [R, width], materialised: MindSpore's CPU kernels are ~10x slower on a broadcast
    operand than on two same-shape ones, and tiling costs less than an add."""
    return _tile(column, (1, width))


def no_bfloat16(x):
    """x, or x as float32 if it is bfloat16: the composites slice their inputs in row slabs, and
    MindSpore's CPU slice has no bfloat16 kernel (they compute in float32 anyway; the cast's gradient
    returns bfloat16)."""
    return x.astype(ms.float32) if x.dtype == ms.bfloat16 else x


# ---- gradients and arguments of the custom ops ----------------------------------------------------------

def zero_grad(x):
    """A zero gradient for an input that gets none: a broadcast view, which in PyNative allocates
    nothing (ops.zeros_like of a [V, H] table would allocate 113 MB at SmolLM2's size)."""
    return ops.broadcast_to(ops.zeros((1,) * len(x.shape), x.dtype), x.shape)


def scatter_rows(table, k, dvalue):
    """one_hot(k)^T @ dvalue: the gradient of the gathered rows of a [V, H] table (float32)."""
    return ops.tensor_scatter_add(ops.zeros(table.shape, ms.float32), k.reshape(-1, 1), dvalue)


def scalar_tensor(value, dtype):
    """A python number or a 0/1-element tensor as a [1] tensor (the kernels load scalars from memory;
    python ints are taken mod 2**32, as the noise hash takes seeds and rows)."""
    if isinstance(value, int):
        return ms.Tensor([value & MASK32], dtype)
    if isinstance(value, float):
        return ms.Tensor([value], dtype)
    return value.astype(dtype).reshape((1,))


def table_slots(tables):
    """The kernels' two table slots, float32: (t0, t1, two_tables); tables after the first share slot two."""
    t0 = tables[0].astype(ms.float32)
    if len(tables) == 1:
        return t0, t0, False
    if len(tables) == 2:
        return t0, tables[1].astype(ms.float32), True
    return t0, ops.concat(tables[1:], 1).astype(ms.float32), True


def ids_or_argmax(ids, n_rows):
    """The kernels' ids input: int32 [N], -1 where the token is the argmax of logits + g."""
    if ids is None:
        return ops.full((n_rows,), -1, dtype=ms.int32)
    return ids.astype(ms.int32)


# ---- Gumbel noise on MindSpore tensors (the contract of kernels.gumbel_noise) ---------------------------

# The upper clamp bound as a float32 value, as gumbel_np applies it.
_U_MAX32 = float(np.float32(U_MAX))
assert U_MIN < 2.0 ** -24
_MIX = ms.Tensor(np.uint32(MIX_MULT))
_SHIFT16 = ms.Tensor(np.uint32(16))
_SHIFT9 = ms.Tensor(np.uint32(9))


def mix32(x):
    """The hash of kernels.gumbel_noise on uint32 lanes, whose products wrap mod 2**32 like the numpy
    version's int64 & 0xFFFFFFFF (half the memory of int64 lanes, and no masking)."""
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, _SHIFT16))
    x = x * _MIX
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, _SHIFT16))
    x = x * _MIX
    return ops.bitwise_xor(x, ops.bitwise_right_shift(x, _SHIFT16))


@functools.lru_cache(maxsize=128)
def column_hashes(start, stop):
    """mix32(col) for col in start..stop-1, as a constant [1, C] uint32 tensor (graph mode's arange
    with constant bounds fails to compile, and the hash of a column never changes)."""
    return ms.Tensor(mix32_np(np.arange(start, stop)).astype(np.uint32).reshape(1, -1))


@functools.lru_cache(maxsize=64)
def _row_ids(n_rows, row_offset):
    return ms.Tensor(((np.arange(n_rows, dtype=np.int64) + row_offset) & MASK32).astype(np.uint32))


def row_keys(seed, n_rows, row_offset=0):
    """uint32 [N]: the per-row hash mix(mix(seed) ^ row) of kernels.gumbel_noise.row_keys_np, for rows
    row_offset .. row_offset + N - 1. seed: a python int or an integer scalar tensor; row_offset: an int."""
    seed = ops.bitwise_and(scalar_tensor(seed, ms.int64), MASK32).astype(ms.uint32)
    return mix32(ops.bitwise_xor(mix32(seed), _row_ids(n_rows, row_offset)))


def gumbel(keys, start, stop):
    """Gumbel noise [R, stop - start] of kernels.gumbel_noise for uint32 row keys [R] (``row_keys``) and
    columns start..stop-1.

    The logs run in float64: MindSpore's float32 log on CPU in graph mode is off by up to 5e-6 and
    returns 0 just below 1, which turns into errors of 5e-3 in -log(-log u). The float64 result rounded
    to float32 is within one float32 ulp of gumbel_np. The lower clamp of gumbel_np (U_MIN = 1e-10)
    never binds, since u >= 2**-24, so only the upper one is applied."""
    cols = column_hashes(start, stop)
    h = mix32(ops.bitwise_xor(per_row(keys.reshape(-1, 1), stop - start), _tile(cols, (keys.shape[0], 1))))
    u = (ops.bitwise_right_shift(h, _SHIFT9).astype(ms.float64) + 0.5) * (2.0 ** -23)
    u = ops.minimum(u, _U_MAX32)
    return (-ops.log(-ops.log(u))).astype(ms.float32)
