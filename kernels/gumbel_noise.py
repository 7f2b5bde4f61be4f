"""Counter-based Gumbel noise: g[row, col] is a pure function of (seed, row, col). Numpy only.

This module is the noise contract of kernels/: every path (the numpy references, the MindSpore
composite in kernels/utils.py, the Triton kernels in kernels/triton_kernels.py) and every caller that
samples tokens must draw these numbers.

Why counter-based: the same noise must be drawn by the no-grad sampler, the forward soft embedding and
(regenerated, never stored) its backward pass, on numpy, MindSpore and Triton alike. An integer hash
gives bit-identical uniforms on all three. MindSpore's own ``ops.gumbel_softmax`` is not used: on CPU it
yields NaN (its float32 ``log(u)`` is exactly 0 for u >= 1 - 2**-23).

The hash is the 32-bit integer mixer x ^= x >> 16; x *= 0x45d9f3b (twice), computed in int64 with a
32-bit mask so that no product overflows int64 (2**32 * 0x45d9f3b < 2**59); on uint32 lanes (MindSpore,
Triton) the products wrap mod 2**32 to the same values. Rows and columns are mixed separately:
    h_row = mix(mix(seed) ^ row),  h = mix(h_row ^ mix(col))
with seed and row taken mod 2**32. u = ((h >> 9) + 0.5) / 2**23 lies strictly inside (0, 1) and is then
clamped to [U_MIN, U_MAX] so that -log(-log(u)) is finite on every backend; g = -log(-log(u)).
"""
import numpy as np

MASK32 = 0xFFFFFFFF
MIX_MULT = 0x45D9F3B
U_MIN = 1e-10
U_MAX = 1.0 - 1e-6  # float32 log(u) is exactly 0 above 1 - 2**-23 on MindSpore CPU


def mix32_np(x):
    x = np.asarray(x, dtype=np.int64) & MASK32
    x = x ^ (x >> 16)
    x = (x * MIX_MULT) & MASK32
    x = x ^ (x >> 16)
    x = (x * MIX_MULT) & MASK32
    x = x ^ (x >> 16)
    return x


def derive_seed(base_seed, *parts):
    """Chain integers (rank, step, stream id...) into one 32-bit seed."""
    h = int(mix32_np(int(base_seed) & MASK32))
    for p in parts:
        h = int(mix32_np(h ^ (int(p) & MASK32)))
    return h


def row_keys_np(seed, rows):
    """The per-row hash mix(mix(seed) ^ row), int64 [len(rows)]."""
    return mix32_np(mix32_np(int(seed) & MASK32) ^ (np.asarray(rows, np.int64) & MASK32))


def _uniforms(seed, rows, cols):
    """Uniforms of (rows, cols) broadcast against each other (float32)."""
    h = mix32_np(row_keys_np(seed, rows) ^ mix32_np(np.asarray(cols, np.int64)))
    u = ((h >> 9).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)
    return np.clip(u, np.float32(U_MIN), np.float32(U_MAX))


def uniform_np(seed, rows, cols):
    """Uniforms of shape [len(rows), len(cols)] (float32)."""
    return _uniforms(seed, np.asarray(rows)[:, None], np.asarray(cols)[None, :])


def gumbel_pairs_np(seed, rows, cols):
    """Gumbel(0, 1) noise of (rows, cols) broadcast against each other, float32: for 1-d rows and cols of
    one length, the noise of each (rows[i], cols[i]) pair (the sampler's nuclei, a column set per row)."""
    return (-np.log(-np.log(_uniforms(seed, rows, cols)))).astype(np.float32)


def gumbel_np(seed, rows, cols):
    """Gumbel(0, 1) noise, float32, shape [len(rows), len(cols)]."""
    return gumbel_pairs_np(seed, np.asarray(rows)[:, None], np.asarray(cols)[None, :])
