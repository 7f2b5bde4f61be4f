"""Triton kernels of the fused ops: the one source for GPU (compiled ahead of time by
scripts/build_kernels.sh) and for CPU tests (run by Triton's interpreter, TRITON_INTERPRET=1).

Conventions shared with kernels/triton_runtime.py (interpreter launches) and kernels/aot/launcher.cu
(GPU launches): scalars that a MindSpore graph computes (seed, tau, row offset, temperature) arrive as
1-element tensors and are loaded in the kernel, so nothing is copied back to the host; integer sizes
and strides are int32; tables, hidden states and the LM head are float32 (the callers cast); logits may
be float32, float16 or bfloat16 and their gradient has their dtype.

Gumbel noise is regenerated in every kernel from (seed, row, column) with the integer hash of
kernels/gumbel_noise.py, on uint32 lanes whose products wrap mod 2**32 exactly like the int64 &
0xFFFFFFFF of the numpy version.
"""
import triton
import triton.language as tl

from kernels.triton_config import (FUSED_ROWS, KD_BLOCK, MM_BLOCK_K, MM_BLOCK_M,  # noqa: F401 (re-exported)
                                   MM_BLOCK_N, SE_BLOCK_H, SE_BLOCK_M, SE_BLOCK_V)
from kernels.gumbel_noise import MIX_MULT, U_MAX, U_MIN

_MIX: tl.constexpr = tl.constexpr(MIX_MULT)
_U_MIN: tl.constexpr = tl.constexpr(U_MIN)
_U_MAX: tl.constexpr = tl.constexpr(U_MAX)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * _MIX
    x = x ^ (x >> 16)
    x = x * _MIX
    x = x ^ (x >> 16)
    return x


@triton.jit
def row_keys(seed_ptr, row_offset_ptr, row_base, offs_m):
    """uint32 [BLOCK_M]: mix(mix(seed) ^ row) for rows row_offset + row_base + offs_m."""
    seed = tl.load(seed_ptr).to(tl.uint32)
    rows = (tl.load(row_offset_ptr) + row_base + offs_m).to(tl.uint32)
    return _mix32(_mix32(seed) ^ rows)


@triton.jit
def uniform(keys, cols):
    """[BLOCK_M, BLOCK_V] uniforms of kernels.gumbel_noise.uniform_np (bit for bit)."""
    h = _mix32(keys[:, None] ^ _mix32(cols.to(tl.uint32))[None, :])
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
    return tl.minimum(tl.maximum(u, _U_MIN), _U_MAX)


@triton.jit
def gumbel(keys, cols):
    return -tl.log(-tl.log(uniform(keys, cols)))


@triton.jit
def gumbel_kernel(seed_ptr, row_offset_ptr, out_ptr, u_ptr, N, V,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """The noise alone, for tests: out[n, v] = g, u_ptr[n, v] = u."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = (offs_m < N)[:, None] & (cols < V)[None, :]
    keys = row_keys(seed_ptr, row_offset_ptr, 0, offs_m)
    offs = offs_m.to(tl.int64)[:, None] * V + cols[None, :]
    tl.store(u_ptr + offs, uniform(keys, cols), mask=mask)
    tl.store(out_ptr + offs, gumbel(keys, cols), mask=mask)


@triton.jit
def se_forward_kernel(logits_ptr, t0_ptr, t1_ptr, ids_ptr, seed_ptr, tau_ptr, row_offset_ptr,
                      soft_ptr, hard_ptr, lse_ptr, k_ptr,
                      N, V, H0, H1, row_base, stride_l, stride_t0, stride_t1, stride_o,
                      BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M), cdiv(H0, BLOCK_H) + cdiv(H1, BLOCK_H)). One program: BLOCK_M tokens and
    BLOCK_H columns of one table, walking the whole vocabulary with an online softmax. Writes
    soft = y @ T, hard = T[k] (k = ids where ids >= 0, else argmax(logits + g)), lse and k."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    n_h0 = tl.cdiv(H0, BLOCK_H)
    if pid_h < n_h0:
        t_ptr = t0_ptr
        stride_t = stride_t0
        h_limit = H0
        h_start = pid_h * BLOCK_H
        out_col = h_start
    else:
        t_ptr = t1_ptr
        stride_t = stride_t1
        h_limit = H1
        h_start = (pid_h - n_h0) * BLOCK_H
        out_col = H0 + h_start
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_h = h_start + tl.arange(0, BLOCK_H)
    mask_h = offs_h < h_limit
    keys = row_keys(seed_ptr, row_offset_ptr, row_base, offs_m)
    inv_tau = 1.0 / tl.load(tau_ptr)
    rows_ptr = logits_ptr + offs_m.to(tl.int64)[:, None] * stride_l

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_H], tl.float32)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best_k = tl.zeros([BLOCK_M], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask_v = cols < V
        x = tl.load(rows_ptr + cols[None, :], mask=mask_m[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        x = tl.where(mask_v[None, :], x + gumbel(keys, cols), float("-inf"))
        # argmax of logits + g itself, first index on ties, as numpy's argmax
        block_best = tl.max(x, axis=1)
        better = block_best > best
        best = tl.where(better, block_best, best)
        best_k = tl.where(better, v0 + tl.argmax(x, axis=1), best_k)
        z = x * inv_tau
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        p = tl.exp(z - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        t = tl.load(t_ptr + cols.to(tl.int64)[:, None] * stride_t + offs_h[None, :],
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p, t, input_precision="ieee")
        run_max = new_max

    ids = tl.load(ids_ptr + offs_m, mask=mask_m, other=-1)
    k = tl.where(ids >= 0, ids, best_k)
    out_offs = offs_m.to(tl.int64)[:, None] * stride_o + (out_col + tl.arange(0, BLOCK_H))[None, :]
    out_mask = mask_m[:, None] & mask_h[None, :]
    tl.store(soft_ptr + out_offs, acc / run_sum[:, None], mask=out_mask)
    hard = tl.load(t_ptr + k.to(tl.int64)[:, None] * stride_t + offs_h[None, :], mask=out_mask, other=0.0)
    tl.store(hard_ptr + out_offs, hard, mask=out_mask)
    if pid_h == 0:
        tl.store(lse_ptr + offs_m, run_max + tl.log(run_sum), mask=mask_m)
        tl.store(k_ptr + offs_m, k, mask=mask_m)


@triton.jit
def _dy_one_table(dy, delta, dout_ptr, soft_ptr, t_ptr, offs_m, mask_m, cols, mask_v, H, col0, stride_t, stride_o,
                  BLOCK_H: tl.constexpr):
    """dy += dout[:, col0:col0+H] @ T^T and delta += rowsum(soft * dout) over those columns."""
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        o_offs = offs_m.to(tl.int64)[:, None] * stride_o + (col0 + offs_h)[None, :]
        o_mask = mask_m[:, None] & mask_h[None, :]
        d = tl.load(dout_ptr + o_offs, mask=o_mask, other=0.0)
        delta += tl.sum(d * tl.load(soft_ptr + o_offs, mask=o_mask, other=0.0), axis=1)
        t = tl.load(t_ptr + cols.to(tl.int64)[:, None] * stride_t + offs_h[None, :],
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)
        dy += tl.dot(d, tl.trans(t), input_precision="ieee")
    return dy, delta


@triton.jit
def se_backward_logits_kernel(logits_ptr, t0_ptr, t1_ptr, seed_ptr, tau_ptr, row_offset_ptr, lse_ptr, soft_ptr,
                              dout_ptr, dlogits_ptr,
                              N, V, H0, H1, row_base, stride_l, stride_t0, stride_t1, stride_o, stride_dl,
                              BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M), cdiv(V, BLOCK_V)): dlogits = y * (dout @ T^T - rowsum(soft * dout)) / tau
    with y regenerated from the logits, the noise and the saved lse. dlogits may alias logits (each
    program reads its own tile before writing it)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < N
    mask_v = cols < V
    mask = mask_m[:, None] & mask_v[None, :]
    keys = row_keys(seed_ptr, row_offset_ptr, row_base, offs_m)
    inv_tau = 1.0 / tl.load(tau_ptr)
    x = tl.load(logits_ptr + offs_m.to(tl.int64)[:, None] * stride_l + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32) + gumbel(keys, cols)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    y = tl.exp(x * inv_tau - lse[:, None])
    dy = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    delta = tl.zeros([BLOCK_M], tl.float32)
    dy, delta = _dy_one_table(dy, delta, dout_ptr, soft_ptr, t0_ptr, offs_m, mask_m, cols, mask_v, H0, 0,
                              stride_t0, stride_o, BLOCK_H)
    dy, delta = _dy_one_table(dy, delta, dout_ptr, soft_ptr, t1_ptr, offs_m, mask_m, cols, mask_v, H1, H0,
                              stride_t1, stride_o, BLOCK_H)
    dl = y * (dy - delta[:, None]) * inv_tau
    tl.store(dlogits_ptr + offs_m.to(tl.int64)[:, None] * stride_dl + cols[None, :],
             dl.to(dlogits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def se_backward_table_kernel(logits_ptr, seed_ptr, tau_ptr, row_offset_ptr, lse_ptr, dout_ptr, dtable_ptr,
                             N, V, H, col0, stride_l, stride_o, stride_dt,
                             BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (cdiv(V, BLOCK_V), cdiv(H, BLOCK_H)): dtable = y^T @ dout[:, col0:col0+H] (soft mode)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_v = cols < V
    mask_h = offs_h < H
    inv_tau = 1.0 / tl.load(tau_ptr)
    acc = tl.zeros([BLOCK_V, BLOCK_H], tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        keys = row_keys(seed_ptr, row_offset_ptr, 0, offs_m)
        x = tl.load(logits_ptr + offs_m.to(tl.int64)[:, None] * stride_l + cols[None, :],
                    mask=mask_m[:, None] & mask_v[None, :], other=0.0)
        x = x.to(tl.float32) + gumbel(keys, cols)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        y = tl.where(mask_m[:, None], tl.exp(x * inv_tau - lse[:, None]), 0.0)
        d = tl.load(dout_ptr + offs_m.to(tl.int64)[:, None] * stride_o + (col0 + offs_h)[None, :],
                    mask=mask_m[:, None] & mask_h[None, :], other=0.0)
        acc += tl.dot(tl.trans(y), d, input_precision="ieee")
    tl.store(dtable_ptr + cols.to(tl.int64)[:, None] * stride_dt + offs_h[None, :], acc,
             mask=mask_v[:, None] & mask_h[None, :])


@triton.jit
def kd_forward_kernel(s_ptr, t_ptr, temp_ptr, loss_ptr, lse_s_ptr, lse_t_ptr, V, stride_s, stride_t,
                      BLOCK: tl.constexpr):
    """Grid (N,): loss = T^2 * KL(softmax(t/T) || softmax(s/T)) for one row, one pass over V."""
    row = tl.program_id(0).to(tl.int64)
    temp = tl.load(temp_ptr)
    inv_t = 1.0 / temp
    max_s = float("-inf")
    max_t = float("-inf")
    sum_s = 0.0
    sum_t = 0.0
    cross = 0.0  # sum exp(zt - max_t) * (zt - zs)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        zs = tl.load(s_ptr + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        zt = tl.load(t_ptr + row * stride_t + cols, mask=mask, other=0.0).to(tl.float32) * inv_t
        new_s = tl.maximum(max_s, tl.max(tl.where(mask, zs, float("-inf")), axis=0))
        new_t = tl.maximum(max_t, tl.max(tl.where(mask, zt, float("-inf")), axis=0))
        sum_s = sum_s * tl.exp(max_s - new_s) + tl.sum(tl.where(mask, tl.exp(zs - new_s), 0.0), axis=0)
        et = tl.where(mask, tl.exp(zt - new_t), 0.0)
        rescale_t = tl.exp(max_t - new_t)
        sum_t = sum_t * rescale_t + tl.sum(et, axis=0)
        cross = cross * rescale_t + tl.sum(et * (zt - zs), axis=0)
        max_s = new_s
        max_t = new_t
    lse_s = max_s + tl.log(sum_s)
    lse_t = max_t + tl.log(sum_t)
    tl.store(loss_ptr + row, temp * temp * (cross / sum_t - lse_t + lse_s))
    tl.store(lse_s_ptr + row, lse_s)
    tl.store(lse_t_ptr + row, lse_t)


@triton.jit
def kd_backward_kernel(s_ptr, t_ptr, temp_ptr, lse_s_ptr, lse_t_ptr, loss_ptr, dloss_ptr, ds_ptr, dt_ptr,
                       V, stride_s, stride_t, stride_ds, stride_dt, BLOCK: tl.constexpr):
    """Grid (N, cdiv(V, BLOCK)): d/ds = c T (q - p), d/dt = c T p (log p - log q - KL), c = dloss[row]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    temp = tl.load(temp_ptr)
    inv_t = 1.0 / temp
    kl = tl.load(loss_ptr + row) * inv_t * inv_t
    coef = tl.load(dloss_ptr + row) * temp
    log_q = tl.load(s_ptr + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - tl.load(lse_s_ptr + row)
    log_p = tl.load(t_ptr + row * stride_t + cols, mask=mask, other=0.0).to(tl.float32) * inv_t - tl.load(lse_t_ptr + row)
    p = tl.exp(log_p)
    ds = coef * (tl.exp(log_q) - p)
    dt = coef * p * (log_p - log_q - kl)
    tl.store(ds_ptr + row * stride_ds + cols, ds.to(ds_ptr.dtype.element_ty), mask=mask)
    tl.store(dt_ptr + row * stride_dt + cols, dt.to(dt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """c (+)= a @ b in float32 with arbitrary strides (transposes are stride swaps). Used by the
    fused-linear op for its logits chunk, dhidden and dlm_head."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k.to(tl.int64)[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk + offs_n.to(tl.int64)[None, :] * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    c_offs = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n.to(tl.int64)[None, :] * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptr + c_offs, mask=c_mask, other=0.0)
    tl.store(c_ptr + c_offs, acc, mask=c_mask)
