"""Block sizes of the Triton kernels, shared by the interpreter launches (triton_runtime.py), the
ahead-of-time build (aot_build.py, which writes them into the launcher's header) and aot_ops.py.
Kept apart from triton_kernels.py so that reading them does not import triton."""
SE_BLOCK_M = 32
SE_BLOCK_V = 64
SE_BLOCK_H = 64
KD_BLOCK = 1024
MM_BLOCK_M = 64
MM_BLOCK_N = 64
MM_BLOCK_K = 32
FUSED_ROWS = 128  # token rows per chunk of the fused-linear op (its [rows, V] logits workspace)
