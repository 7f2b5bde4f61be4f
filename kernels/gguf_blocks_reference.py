"""Numpy reference of the GGUF-block products (kernels.cpu_ops.gguf_linear, and llama_decode_layer's matrices
given as blocks): a GGUF file's Q4_1 / Q8_0 blocks as float32 weights, and x W^T in float64.

    blocks: uint8 [N, K / 32, 20] (Q4_1: float16 d, float16 m, 16 bytes of nibbles) or [N, K / 32, 34]
            (Q8_0: float16 d, 32 int8), ggml's layout
    Q4_1:   w[32 b + j] = d * (byte j & 15) + m,   w[32 b + 16 + j] = d * (byte j >> 4) + m    (j < 16)
    Q8_0:   w[32 b + j] = d * int8 j
    each weight computed in float32, as gguf's own dequantiser does
    gguf_linear(x, blocks) = x W^T over x's last axis
Tests only.
"""
import numpy as np

BLOCK = 32
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}


def block_type(blocks):
    """'Q4_1' or 'Q8_0' from the bytes per block (the last axis of a blocks array)."""
    for name, size in BLOCK_BYTES.items():
        if blocks.shape[-1] == size:
            return name
    raise ValueError(f"a block of {blocks.shape[-1]} bytes is neither Q4_1 (20) nor Q8_0 (34)")


def dequantize(blocks):
    """uint8 [N, K / 32, 20 | 34] -> float32 [N, K]."""
    blocks = np.asarray(blocks, np.uint8)
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
