"""The Triton kernels on CPU under Triton's interpreter (no torch), against the numpy references, and
inside MindSpore GRAPH_MODE graphs as pyfunc custom ops with bprop.

Triton chooses interpreter or compiler when it is first imported, and MindSpore imports it, so
TRITON_INTERPRET=1 must be in the environment before the process starts. These tests run where it is
(`TRITON_INTERPRET=1 python -m pytest tests/test_kernels_triton.py`); elsewhere they are skipped here and
run instead, in a fresh process with TRITON_INTERPRET=1, by tests/test_kernels_triton_process.py. This
file does not set it: set at collection it stayed in os.environ for the whole test run, and every
subprocess of every later test inherited it.
"""
import mindspore as ms
import numpy as np
import pytest

from kernels import dispatch, fused_linear_soft_embedding, kd_loss, soft_embedding
from kernels import kd_loss_reference as kref
from kernels import soft_embedding_reference as sref
from kernels import triton_runtime as rt
from kernels.gumbel_noise import gumbel_np, uniform_np

# the interpreter's own int(array) calls, not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

if rt.interpreter_problem():
    pytest.skip(f"Triton interpreter unavailable in this process ({rt.interpreter_problem()}); "
                "tests/test_kernels_triton_process.py runs this file in a fresh process", allow_module_level=True)


def _bf16(x):
    """(kernel input labelled bfloat16, its float32 value)."""
    bits = rt.to_bf16_bits(x)
    return rt.HostTensor(bits, "bfloat16"), rt.from_bf16_bits(bits)


def _logits_input(x, dtype):
    """(what the kernel reads, the float32 values the reference gets)."""
    if dtype == "bfloat16":
        return _bf16(x)
    if dtype == "float16":
        x16 = x.astype(np.float16)
        return x16, x16.astype(np.float32)
    return x, x


def _assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * max(np.abs(expected).max(), 1e-6))


def test_noise_is_bit_identical_to_gumbel_np():
    seed, offset = 2 ** 40 + 77, 2 ** 32 + 5  # both wrap to 32 bits inside the hash
    g, u = rt.gumbel(seed, 37, 101, row_offset=offset)
    rows, cols = np.arange(37) + offset, np.arange(101)
    np.testing.assert_array_equal(u, uniform_np(seed, rows, cols))
    np.testing.assert_allclose(g, gumbel_np(seed, rows, cols), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,v,widths,dtype,use_ids", [
    (1, 2, (3,), "float32", False),
    (37, 301, (24, 70), "float32", False),
    (33, 130, (5, 2, 9), "float16", True),
    (20, 97, (16,), "bfloat16", False),
])
def test_soft_embedding_kernels_match_reference(n, v, widths, dtype, use_ids):
    rng = np.random.default_rng(0)
    kernel_logits, logits = _logits_input((rng.normal(size=(n, v)) * 3).astype(np.float32), dtype)
    tables = [rng.normal(size=(v, h)).astype(np.float32) for h in widths]
    dout = rng.normal(size=(n, sum(widths))).astype(np.float32)
    ids = rng.integers(0, v, n) if use_ids else None
    seed, tau, offset = 1234, 0.7, 5

    soft, hard, lse, k = rt.se_forward(kernel_logits, tables, ids, seed, tau, offset)
    value_hard, value_soft, ref_k = sref.soft_embedding_forward(logits, tables, seed, tau, True, ids, offset)
    np.testing.assert_array_equal(k, ref_k)
    np.testing.assert_array_equal(hard, value_hard.astype(np.float32))
    _assert_close(soft, value_soft)

    dlogits = rt.se_backward_logits(kernel_logits, tables, seed, tau, offset, lse, soft, dout)
    ref_dlogits, ref_dtables = sref.soft_embedding_backward(logits, tables, seed, tau, dout, False, ids, offset)
    _assert_close(dlogits, ref_dlogits)
    for grad, ref in zip(rt.se_backward_tables(kernel_logits, widths, seed, tau, offset, lse, dout), ref_dtables):
        _assert_close(grad, ref)


def test_backward_writes_logits_dtype_and_can_overwrite_its_input():
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(9, 40)) * 2).astype(np.float16)
    tables = [rng.normal(size=(40, 6)).astype(np.float32)]
    dout = rng.normal(size=(9, 6)).astype(np.float32)
    soft, _, lse, _ = rt.se_forward(logits, tables, None, 3, 0.5, 0)
    expected = rt.se_backward_logits(logits, tables, 3, 0.5, 0, lse, soft, dout)
    in_place = logits.copy()
    rt.se_backward_logits(in_place, tables, 3, 0.5, 0, lse, soft, dout, out=in_place)
    np.testing.assert_array_equal(in_place, expected.astype(np.float16))


@pytest.mark.parametrize("n,v,dtype", [(5, 2, "float32"), (3, 3001, "float32"), (4, 1000, "bfloat16"),
                                       (6, 517, "float16"), (1, 262144, "float32")])
def test_kd_kernels_match_reference(n, v, dtype):
    rng = np.random.default_rng(2)
    ks, s = _logits_input((rng.normal(size=(n, v)) * 2).astype(np.float32), dtype)
    kt, t = _logits_input((rng.normal(size=(n, v)) * 2).astype(np.float32), dtype)
    loss, lse_s, lse_t = rt.kd_forward(ks, kt, 2.0)
    _assert_close(loss, kref.kd_loss_forward(s, t, 2.0, "none"), rtol=1e-4)
    dloss = rng.normal(size=n).astype(np.float32)
    ds, dt = rt.kd_backward(ks, kt, 2.0, lse_s, lse_t, loss, dloss)
    ref_ds, ref_dt = kref.kd_loss_backward(s, t, 2.0, dloss, "none")
    _assert_close(ds, ref_ds, rtol=1e-4)
    _assert_close(dt, ref_dt, rtol=1e-4)


def test_fused_linear_kernels_match_reference():
    rng = np.random.default_rng(3)
    n, v, hg = 150, 77, 20  # two token chunks of the fused op, the second ragged
    hidden = rng.normal(size=(n, hg)).astype(np.float32)
    lm_head = (rng.normal(size=(v, hg)) * 0.5).astype(np.float32)
    tables = [rng.normal(size=(v, 10)).astype(np.float32), rng.normal(size=(v, 3)).astype(np.float32)]
    dout = rng.normal(size=(n, 13)).astype(np.float32)
    soft, hard, lse, k = rt.fused_forward(hidden, lm_head, tables, None, 8, 1.1, 4)
    ref_hard, ref_soft, ref_k = sref.fused_linear_forward(hidden, lm_head, tables, 8, 1.1, row_offset=4)
    np.testing.assert_array_equal(k, ref_k)
    _assert_close(soft, ref_soft)
    dh, dw = rt.fused_backward(hidden, lm_head, tables, 8, 1.1, 4, lse, soft, dout)
    ref_dh, ref_dw = sref.fused_linear_backward(hidden, lm_head, tables, 8, 1.1, dout, row_offset=4)
    _assert_close(dh, ref_dh, rtol=1e-4)
    _assert_close(dw, ref_dw, rtol=1e-4)


@pytest.fixture
def triton_backend():
    dispatch.set_kernel_backend("triton_interpret")
    yield
    dispatch.set_kernel_backend(None)


@pytest.mark.parametrize("hard", [True, False])
def test_triton_ops_in_a_graph_mode_step(triton_backend, hard):
    """All three ops in one ms.jit graph: pyfunc custom ops running the kernels, bprops running theirs."""
    rng = np.random.default_rng(4)
    n, v, hg = 12, 50, 8
    hidden = rng.normal(size=(n, hg)).astype(np.float32)
    lm_head = rng.normal(size=(v, hg)).astype(np.float32)
    tables = [rng.normal(size=(v, 6)).astype(np.float32), rng.normal(size=(v, 5)).astype(np.float32)]
    teacher = rng.normal(size=(n, v)).astype(np.float32)
    d1, d2 = rng.normal(size=(n, 11)).astype(np.float32), rng.normal(size=(n, 11)).astype(np.float32)

    def loss(h, w, t0, t1, teacher_logits, seed):
        logits = ms.ops.matmul(h, w.T)
        emb = soft_embedding(logits, [t0, t1], seed, 0.8, hard=hard, row_offset=2, grad_tables=True)
        fused = fused_linear_soft_embedding(h, w, [t0, t1], seed, 0.8, hard=hard, row_offset=2)
        return ((emb * ms.Tensor(d1)).sum() + (fused * ms.Tensor(d2)).sum()
                + kd_loss(logits, teacher_logits, 2.0))

    step = ms.jit(ms.value_and_grad(loss, grad_position=(0, 1, 2)))
    value, (dh, dw, dt0) = step(ms.Tensor(hidden), ms.Tensor(lm_head), ms.Tensor(tables[0]), ms.Tensor(tables[1]),
                                ms.Tensor(teacher), ms.Tensor(17, ms.int64))

    logits = (hidden.astype(np.float64) @ lm_head.T).astype(np.float32)
    emb, _, _ = sref.soft_embedding_forward(logits, tables, 17, 0.8, hard, None, 2)
    expected = (emb * d1).sum() + (emb * d2).sum() + kref.kd_loss_forward(logits, teacher, 2.0)
    np.testing.assert_allclose(float(value), expected, rtol=1e-4)
    dlogits, dtables = sref.soft_embedding_backward(logits, tables, 17, 0.8, d1 + d2, hard, None, 2)
    dlogits += kref.kd_loss_backward(logits, teacher, 2.0)[0]
    _assert_close(dh.asnumpy(), dlogits @ lm_head, rtol=1e-4)
    _assert_close(dw.asnumpy(), dlogits.T @ hidden, rtol=1e-4)
    # the fused op gives the tables no gradient, the plain op gives them the d1 part
    _, ref_dt = sref.soft_embedding_backward(logits, tables, 17, 0.8, d1, hard, None, 2)
    _assert_close(dt0.asnumpy(), ref_dt[0], rtol=1e-4)
