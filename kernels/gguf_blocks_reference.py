"""Numpy reference of the GGUF-block products (kernels.cpu_ops.gguf_linear, and llama_decode_layer's matrices
given as blocks): a GGUF file's Q4_1 / Q8_0 blocks as float32 weights, and x W^T in float64.

    blocks: uint8 [N, K / 32, 20] (Q4_1: float16 d, float16 m, 16 bytes of nibbles) or [N, K / 32, 34]
            (Q8_0: float16 d, 32 int8), ggml's layout
    Q4_1:   w[32 b + j] = d * (byte j & 15) + m,   w[32 b + 16 + j] = d * (byte j >> 4) + m    (j < 16)
    Q8_0:   w[32 b + j] = d * int8 j
    each weight computed in float32, as gguf's own dequantiser does
    gguf_linear(x, blocks) = x W^T over x's last axis
The interleaved layout (kernels.cpu_ops.interleave_blocks: the blocks of 8 weight rows side by side, so
that the AVX2 loops read one weight of 8 output columns at once): uint8 [N / 8, K / 32, 192 | 288], each
block group
    Q4_1: float32 d[8], float32 m[8], 16 x 8 bytes: byte (j, c) = q_c[j] | q_c[16 + j] << 4
    Q8_0: float32 d[8], 32 x 8 int8: (j, c) = q_c[j]
(c: the row within the group, q_c[j]: weight j of that row's block, j < 16 for Q4_1's bytes). The scales
are the float16 values in float32, so the weights are the same to the bit.
"""
import numpy as np

BLOCK = 32
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}
GROUP_ROWS = 8
GROUP_BYTES = {"Q4_1": 192, "Q8_0": 288}  # the interleaved layout's groups of 8 blocks


def block_type(blocks):
    """'Q4_1' or 'Q8_0' from the bytes per block (the last axis of a blocks array), either layout."""
    for name in BLOCK_BYTES:
        if blocks.shape[-1] in (BLOCK_BYTES[name], GROUP_BYTES[name]):
            return name
    raise ValueError(f"a block of {blocks.shape[-1]} bytes is neither Q4_1 (20, or 192 interleaved) nor Q8_0 "
                     f"(34, or 288 interleaved)")


def is_interleaved(blocks):
    return blocks.shape[-1] in GROUP_BYTES.values()


def deinterleave(groups):
    """The interleaved layout back to ggml's (float32 scales back to float16: exact, they came from it)."""
    groups = np.asarray(groups, np.uint8)
    ng, nb, _ = groups.shape
    kind = block_type(groups)
    d = np.ascontiguousarray(groups[..., 0:32]).view(np.float32).astype(np.float16).view(np.uint8)  # [ng, nb, 16]
    d = d.reshape(ng, nb, GROUP_ROWS, 2)
    if kind == "Q4_1":
        m = np.ascontiguousarray(groups[..., 32:64]).view(np.float32).astype(np.float16).view(np.uint8)
        q = groups[..., 64:].reshape(ng, nb, 16, GROUP_ROWS).transpose(0, 1, 3, 2)
        per_row = np.concatenate([d, m.reshape(ng, nb, GROUP_ROWS, 2), q], -1)
    else:
        q = groups[..., 32:].reshape(ng, nb, 32, GROUP_ROWS).transpose(0, 1, 3, 2)
        per_row = np.concatenate([d, q], -1)
    return np.ascontiguousarray(per_row.transpose(0, 2, 1, 3).reshape(ng * GROUP_ROWS, nb, -1))


def dequantize(blocks):
    """uint8 [N, K / 32, 20 | 34] (or interleaved [N / 8, K / 32, 192 | 288]) -> float32 [N, K]."""
    blocks = np.asarray(blocks, np.uint8)
    if is_interleaved(blocks):
        blocks = deinterleave(blocks)
    n, nb, _ = blocks.shape
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16).astype(np.float32)       # [N, nb, 1]
    if block_type(blocks) == "Q4_1":
        m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).astype(np.float32)
        q = blocks[..., 4:]
        q = np.concatenate([q & 15, q >> 4], -1).astype(np.float32)                      # [N, nb, 32]
        w = d * q + m
    else:
        w = d * blocks[..., 2:].view(np.int8).astype(np.float32)
    return w.reshape(n, nb * BLOCK).astype(np.float32)


def gguf_linear(x, blocks):
    """x [..., K] W^T -> [..., N], float64."""
    return np.asarray(x, np.float64) @ dequantize(blocks).astype(np.float64).T
