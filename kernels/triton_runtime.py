"""Launch the Triton kernels on numpy arrays with Triton's interpreter: on CPU, without torch.

The interpreter expects torch-like tensors (it reads dtype, data_ptr(), stride(), untyped_storage()...
and copies "device" storage to the host and back). HostTensor gives it those over a numpy array whose
memory already is on the host, so the copies are no-ops. bfloat16 arrays travel as uint16 bit patterns
labelled "bfloat16".

The launch functions below mirror, call for call, what kernels/aot/launcher.cu does on a GPU, with the
same block sizes (kernels/triton_kernels.py), so the interpreter tests exercise the GPU code path.
"""
import numpy as np

INTERPRET_HINT = ("set TRITON_INTERPRET=1 in the environment before Python imports triton (MindSpore imports "
                  "it on import), e.g. `TRITON_INTERPRET=1 python ...` or os.environ at the very top of the script")


def interpreter_problem():
    """None if the Triton kernels can run under the interpreter in this process, else the reason.

    Triton decides between interpreter and compiler when a @triton.jit decorator runs, including those of
    triton.language's own helpers (tl.max, tl.sum...), so TRITON_INTERPRET=1 must be set before triton is
    first imported; setting it later cannot be undone or redone."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as err:
        return f"triton is not installed ({err})"
    if not isinstance(tl.max, InterpretedFunction):
        return "triton was imported without TRITON_INTERPRET=1, so its kernels are set up for a GPU compiler; " + \
            INTERPRET_HINT
    return None


def load_kernels():
    """kernels.triton_kernels, checked to be running under the interpreter."""
    problem = interpreter_problem()
    if problem:
        raise RuntimeError(f"cannot run the Triton kernels on CPU: {problem}")
    from kernels import triton_kernels
    return triton_kernels


class HostTensor:
    """The torch.Tensor surface that triton's interpreter touches, over a numpy array."""

    def __init__(self, array, dtype=None):
        self.array = array
        self.dtype = dtype or array.dtype.name

    def data_ptr(self):
        return self.array.ctypes.data

    def untyped_storage(self):
        return self

    def cpu(self):
        return self

    def copy_(self, other):
        return self  # host and "device" storage are the same memory

    def new_empty(self, *args, **kwargs):
        return HostTensor(self.array, self.dtype)

    def set_(self, *args):
        return self

    def storage_offset(self):
        return 0

    def size(self):
        return self.array.shape

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)


def to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.astype(np.uint16)


def from_bf16_bits(bits):
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _t(x):
    return x if isinstance(x, HostTensor) else HostTensor(x)


def _rows(x):
    """Row stride in elements of a 2-D array or HostTensor."""
    return _t(x).stride()[0]


def _scalar(value, dtype):
    return np.asarray(value, dtype=dtype).reshape(1)


def _cdiv(a, b):
    return -(-a // b)


def table_pair(tables):
    """The two table slots of the kernels: (t0, t1, H1); more than two tables share the second slot."""
    tables = [np.ascontiguousarray(t, dtype=np.float32) for t in tables]
    if len(tables) == 1:
        return tables[0], tables[0], 0
    t1 = tables[1] if len(tables) == 2 else np.ascontiguousarray(np.concatenate(tables[1:], axis=1))
    return tables[0], t1, t1.shape[1]


def gumbel(seed, n_rows, vocab, row_offset=0):
    k = load_kernels()
    g = np.empty((n_rows, vocab), np.float32)
    u = np.empty((n_rows, vocab), np.float32)
    grid = (_cdiv(n_rows, k.SE_BLOCK_M), _cdiv(vocab, k.SE_BLOCK_V))
    k.gumbel_kernel[grid](_t(_scalar(seed, np.int64)), _t(_scalar(row_offset, np.int64)), _t(g), _t(u),
                          n_rows, vocab, BLOCK_M=k.SE_BLOCK_M, BLOCK_V=k.SE_BLOCK_V)
    return g, u


def se_forward(logits, tables, ids, seed, tau, row_offset, row_base=0, out=None):
    """Returns (soft, hard, lse, k); out = (soft, hard, lse, k) arrays to write into (views are fine)."""
    k = load_kernels()
    n_rows, vocab = _t(logits).size()
    t0, t1, h1 = table_pair(tables)
    width = t0.shape[1] + h1
    if out is None:
        out = (np.empty((n_rows, width), np.float32), np.empty((n_rows, width), np.float32),
               np.empty(n_rows, np.float32), np.empty(n_rows, np.int32))
    soft, hard, lse, idx = out
    ids = np.full(n_rows, -1, np.int32) if ids is None else np.ascontiguousarray(ids, np.int32)
    grid = (_cdiv(n_rows, k.SE_BLOCK_M), _cdiv(t0.shape[1], k.SE_BLOCK_H) + _cdiv(h1, k.SE_BLOCK_H))
    k.se_forward_kernel[grid](
        _t(logits), _t(t0), _t(t1), _t(ids), _t(_scalar(seed, np.int64)), _t(_scalar(tau, np.float32)),
        _t(_scalar(row_offset, np.int64)), _t(soft), _t(hard), _t(lse), _t(idx),
        n_rows, vocab, t0.shape[1], h1, row_base, _rows(logits), _rows(t0), _rows(t1), _rows(soft),
        BLOCK_M=k.SE_BLOCK_M, BLOCK_V=k.SE_BLOCK_V, BLOCK_H=k.SE_BLOCK_H)
    return soft, hard, lse, idx


def se_backward_logits(logits, tables, seed, tau, row_offset, lse, soft, dout, row_base=0, out=None):
    """dlogits (float32, or the dtype of ``out``); out may be ``logits`` itself."""
    k = load_kernels()
    n_rows, vocab = _t(logits).size()
    t0, t1, h1 = table_pair(tables)
    if out is None:
        out = np.empty((n_rows, vocab), np.float32)
    dout = np.ascontiguousarray(dout, np.float32)
    grid = (_cdiv(n_rows, k.SE_BLOCK_M), _cdiv(vocab, k.SE_BLOCK_V))
    k.se_backward_logits_kernel[grid](
        _t(logits), _t(t0), _t(t1), _t(_scalar(seed, np.int64)), _t(_scalar(tau, np.float32)),
        _t(_scalar(row_offset, np.int64)), _t(lse), _t(soft), _t(dout), _t(out),
        n_rows, vocab, t0.shape[1], h1, row_base, _rows(logits), _rows(t0), _rows(t1), _rows(dout), _rows(out),
        BLOCK_M=k.SE_BLOCK_M, BLOCK_V=k.SE_BLOCK_V, BLOCK_H=k.SE_BLOCK_H)
    return out


def se_backward_tables(logits, widths, seed, tau, row_offset, lse, dout):
    """[y^T @ dout[:, cols of table i]] for tables of the given widths (soft mode), float32."""
    k = load_kernels()
    n_rows, vocab = _t(logits).size()
    dout = np.ascontiguousarray(dout, np.float32)
    grads, col0 = [], 0
    for width in widths:
        dtable = np.empty((vocab, width), np.float32)
        grid = (_cdiv(vocab, k.SE_BLOCK_V), _cdiv(width, k.SE_BLOCK_H))
        k.se_backward_table_kernel[grid](
            _t(logits), _t(_scalar(seed, np.int64)), _t(_scalar(tau, np.float32)), _t(_scalar(row_offset, np.int64)),
            _t(lse), _t(dout), _t(dtable), n_rows, vocab, width, col0, _rows(logits), _rows(dout), _rows(dtable),
            BLOCK_M=k.SE_BLOCK_M, BLOCK_V=k.SE_BLOCK_V, BLOCK_H=k.SE_BLOCK_H)
        grads.append(dtable)
        col0 += width
    return grads


def kd_forward(student, teacher, temperature):
    """Returns (loss_row, lse_s, lse_t), float32 [N] each."""
    k = load_kernels()
    n_rows, vocab = _t(student).size()
    loss, lse_s, lse_t = (np.empty(n_rows, np.float32) for _ in range(3))
    k.kd_forward_kernel[(n_rows,)](_t(student), _t(teacher), _t(_scalar(temperature, np.float32)), _t(loss),
                                   _t(lse_s), _t(lse_t), vocab, _rows(student), _rows(teacher), BLOCK=k.KD_BLOCK)
    return loss, lse_s, lse_t


def kd_backward(student, teacher, temperature, lse_s, lse_t, loss, dloss, out_dtype=np.float32):
    k = load_kernels()
    n_rows, vocab = _t(student).size()
    ds = np.empty((n_rows, vocab), out_dtype)
    dt = np.empty((n_rows, vocab), out_dtype)
    dloss = np.ascontiguousarray(dloss, np.float32)
    k.kd_backward_kernel[(n_rows, _cdiv(vocab, k.KD_BLOCK))](
        _t(student), _t(teacher), _t(_scalar(temperature, np.float32)), _t(lse_s), _t(lse_t), _t(loss), _t(dloss),
        _t(ds), _t(dt), vocab, _rows(student), _rows(teacher), _rows(ds), _rows(dt), BLOCK=k.KD_BLOCK)
    return ds, dt


def matmul(a, b, c, accumulate=False):
    """c (+)= a @ b, float32, any strides (pass a.T / b.T views for transposes)."""
    k = load_kernels()
    m, kk = a.shape
    n = b.shape[1]
    item = 4
    grid = (_cdiv(m, k.MM_BLOCK_M), _cdiv(n, k.MM_BLOCK_N))
    k.matmul_kernel[grid](_t(a), _t(b), _t(c), m, n, kk, a.strides[0] // item, a.strides[1] // item,
                          b.strides[0] // item, b.strides[1] // item, c.strides[0] // item, c.strides[1] // item,
                          ACCUMULATE=accumulate, BLOCK_M=k.MM_BLOCK_M, BLOCK_N=k.MM_BLOCK_N, BLOCK_K=k.MM_BLOCK_K)
    return c


def fused_forward(hidden, lm_head, tables, ids, seed, tau, row_offset):
    """soft_embedding of hidden @ lm_head^T, FUSED_ROWS tokens at a time. Returns (soft, hard, lse, k)."""
    k = load_kernels()
    hidden = np.ascontiguousarray(hidden, np.float32)
    lm_head = np.ascontiguousarray(lm_head, np.float32)
    n_rows, vocab = hidden.shape[0], lm_head.shape[0]
    width = sum(t.shape[1] for t in tables)
    soft, hard = np.empty((n_rows, width), np.float32), np.empty((n_rows, width), np.float32)
    lse, idx = np.empty(n_rows, np.float32), np.empty(n_rows, np.int32)
    ids = np.full(n_rows, -1, np.int32) if ids is None else np.ascontiguousarray(ids, np.int32)
    work = np.empty((min(k.FUSED_ROWS, n_rows), vocab), np.float32)
    for r0 in range(0, n_rows, k.FUSED_ROWS):
        r1 = min(r0 + k.FUSED_ROWS, n_rows)
        logits = matmul(hidden[r0:r1], lm_head.T, work[:r1 - r0])
        se_forward(logits, tables, ids[r0:r1], seed, tau, row_offset, row_base=r0,
                   out=(soft[r0:r1], hard[r0:r1], lse[r0:r1], idx[r0:r1]))
    return soft, hard, lse, idx


def fused_backward(hidden, lm_head, tables, seed, tau, row_offset, lse, soft, dout):
    """(dhidden [N, Hg], dlm_head [V, Hg]), float32; the logits chunk is recomputed and overwritten
    in place by its gradient."""
    k = load_kernels()
    hidden = np.ascontiguousarray(hidden, np.float32)
    lm_head = np.ascontiguousarray(lm_head, np.float32)
    n_rows, vocab = hidden.shape[0], lm_head.shape[0]
    dhidden = np.empty_like(hidden)
    dlm_head = np.empty_like(lm_head)
    work = np.empty((min(k.FUSED_ROWS, n_rows), vocab), np.float32)
    for r0 in range(0, n_rows, k.FUSED_ROWS):
        r1 = min(r0 + k.FUSED_ROWS, n_rows)
        chunk = matmul(hidden[r0:r1], lm_head.T, work[:r1 - r0])
        se_backward_logits(chunk, tables, seed, tau, row_offset, lse[r0:r1], soft[r0:r1], dout[r0:r1],
                           row_base=r0, out=chunk)
        matmul(chunk, lm_head, dhidden[r0:r1])
        matmul(chunk.T, hidden[r0:r1], dlm_head, accumulate=r0 > 0)
    return dhidden, dlm_head
