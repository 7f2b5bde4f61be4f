"""Path ``cpu`` of the encoder ops: the C++ kernels of kernels/cpu/encoder_ops.cc as MindSpore ``aot``
custom ops with bprop (CPU device target only); and the sampler's one-token decoder layer
(kernels/cpu/llama_decode.cc, ``llama_decode_layer``, forward only; ``llama_chunk_layer`` the same for a
prompt's prefill) and a linear layer read from a GGUF file's Q4_1 / Q8_0 blocks (kernels/cpu/gguf_linear.cc,
``gguf_linear``, forward only), for its LM head; the Gumbel noise of the soft embedding's composite path
(kernels/cpu/gumbel_noise.cc, ``gumbel_noise``); and AdamW's update in place (kernels/cpu/adamw.cc,
``adamw_update_op``, for kernels.adamw); and, called from numpy on the host, the sampler's top-p nucleus
(kernels/cpu/nucleus.cc, ``nucleus_columns``). The library is compiled on first use (kernels/cpu_build.py);
``unavailable_reason(op)`` says why it cannot run here, if it cannot.

The kernels take float32; other dtypes are cast to float32 and the result back. The LayerNorm forward
also returns each row's mean and 1/std, which its backward takes rather than recomputing them. The
linear layer runs MindSpore's MatMul forward (as fast as a plain product gets here) and a C++ backward
whose products are oneDNN's sgemm from the libdnnl in MindSpore's wheel; given a row mask (a batch's real
tokens), its forward and backward are C++ over those rows only, packed into one sgemm each.
"""
import ctypes
import functools
import os

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from mindspore.ops import signature

from kernels import cpu_build
from kernels.encoder_ops_composite import linear as composite_linear
from kernels.utils import column_hashes, scalar_tensor, zero_grad

_threads = {"n": 0}
HOST_OPS = ("nucleus",)  # called from numpy, not in a MindSpore graph: they run whatever the device target


def _thread_count():
    return _threads["n"] or len(os.sched_getaffinity(0))


def set_cpu_threads(n):
    """Threads of the CPU kernels (0 or None: the cores this process may use). ms-dfkd's command line
    passes run.threads, as it does to MindSpore's own CPU kernels."""
    _threads["n"] = int(n or 0)
    if _library.cache_info().currsize:
        _library().MsDfkdCpuSetThreads(_thread_count())


@functools.lru_cache(maxsize=None)
def _library():
    # the same file MindSpore's aot ops dlopen, so the thread setting reaches them
    lib = ctypes.CDLL(str(cpu_build.ensure_built()))
    lib.MsDfkdCpuSetThreads(_thread_count())
    return lib


def _gemm_library():
    return os.path.join(os.path.dirname(ms.__file__), "lib", "libdnnl.so.3")


@functools.lru_cache(maxsize=None)
def _gemm_problem():
    """None once the library has oneDNN's sgemm, else why not."""
    path = _gemm_library()
    code = _library().MsDfkdCpuLoadGemm(path.encode())
    return None if code == 0 else (f"cannot open {path}" if code == 1 else f"{path} has no dnnl_sgemm")


@functools.lru_cache(maxsize=None)
def unavailable_reason(op=None):
    """None if the cpu path of ``op`` (gelu, layer_norm, linear, llama_decode, gguf_linear, gumbel_noise, adamw,
    nucleus; None: the library) can run here, else why not (builds the library if needed)."""
    target = ms.get_context("device_target")
    if target != "CPU" and op not in HOST_OPS:
        return f"the cpu kernels run on the CPU device target only, and it is {target}"
    try:
        lib = cpu_build.ensure_built()
    except cpu_build.BuildError as e:
        return str(e)
    white = os.environ.get("MS_CUSTOM_AOT_WHITE_LIST")
    if white and not str(lib).startswith(os.path.realpath(white)):
        return f"MS_CUSTOM_AOT_WHITE_LIST={white} does not contain {lib}"
    try:
        _library()
    except OSError as e:
        return f"cannot load {lib}: {e}"
    return _gemm_problem() if op in ("linear", "llama_decode") else None


def _require(op):
    """Raise if the cpu path of ``op`` cannot run here (resolve_encoder_path checked it for the encoder ops;
    this also loads oneDNN's sgemm for the ops that need it)."""
    problem = unavailable_reason(op)
    if problem:
        raise RuntimeError(f"{op}: the cpu kernel cannot run: {problem}")


def _declare_writes(op, inputs, written):
    """Declare that aot ``op`` writes the named ``written`` of its ``inputs`` where they are, as MindSpore's own
    in-place primitives (AdamWeightDecay) do, so that a graph orders their readers and writers."""
    rw = signature.sig_rw
    op.set_signatures(tuple(signature.make_sig(name, rw.RW_WRITE if name in written else rw.RW_READ)
                            for name in inputs))
    op.add_prim_attr("side_effect_mem", True)
    return op


def _aot(entry, out_shape, out_dtype, bprop=None):
    _library()  # loaded here first, so that the thread setting is in place
    lib = str(cpu_build.ensure_built())
    # MindSpore only loads aot libraries from under this folder
    os.environ.setdefault("MS_CUSTOM_AOT_WHITE_LIST", os.path.dirname(lib))
    return ops.Custom(f"{lib}:{entry}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot", bprop=bprop)


class GeluOp(nn.Cell):
    """x f32 -> x * Phi(x)."""

    def __init__(self):
        super().__init__()
        backward_op = _aot("MsDfkdGeluBackward", lambda x, dy: x, lambda x, dy: x)

        def bprop(x, out, dout):
            return (backward_op(x, dout),)

        self.op = _aot("MsDfkdGeluForward", lambda x: x, lambda x: x, bprop)

    def construct(self, x):
        return self.op(x)


class LayerNormOp(nn.Cell):
    """(x f32 [..., d], weight [d], bias [d], eps [1]) -> (y, mean [...], rstd [...])."""

    def __init__(self):
        super().__init__()
        backward_op = _aot("MsDfkdLayerNormBackward", lambda dy, x, w, mean, rstd: (x, w, w),
                           lambda dy, x, w, mean, rstd: (x, w, w))

        def bprop(x, weight, bias, eps, out, dout):
            _, mean, rstd = out
            dx, dweight, dbias = backward_op(dout[0], x, weight, mean, rstd)
            return dx, dweight, dbias, zero_grad(eps)

        self.op = _aot("MsDfkdLayerNormForward", lambda x, w, b, eps: (x, x[:-1], x[:-1]),
                       lambda x, w, b, eps: (x, x, x), bprop)

    def construct(self, x, weight, bias, eps):
        return self.op(x, weight, bias, eps)


class LinearOp(nn.Cell):
    """(x f32 [..., k], weight [n, k], bias [n]) -> x weight^T + bias [..., n]; the C++ backward, as two ops
    (dx; dweight and dbias) so that a graph that takes no gradient of the weights drops the second."""

    def __init__(self):
        super().__init__()
        self.backward_data = _aot("MsDfkdLinearBackwardData", lambda dy, w: dy[:-1] + [w[1]], lambda dy, w: dy)
        self.backward_weight = _aot("MsDfkdLinearBackwardWeight", lambda dy, x: ([dy[-1], x[-1]], [dy[-1]]),
                                    lambda dy, x: (dy, dy))

    def construct(self, x, weight, bias):
        return composite_linear(x, weight, bias)

    def bprop(self, x, weight, bias, out, dout):
        dweight, dbias = self.backward_weight(dout, x)
        return self.backward_data(dout, weight), dweight, dbias


class MaskedLinearOp(nn.Cell):
    """(x f32 [..., k], weight [n, k], bias [n], rows f32 [...]) -> x weight^T + bias on the rows whose
    ``rows`` value is nonzero, 0 on the others; forward and backward in C++ over those rows only (the
    backward as two ops, as LinearOp's)."""

    def __init__(self):
        super().__init__()
        backward_data = _aot("MsDfkdMaskedLinearBackwardData", lambda dy, w, rows: dy[:-1] + [w[1]],
                             lambda dy, w, rows: dy)
        backward_weight = _aot("MsDfkdMaskedLinearBackwardWeight", lambda dy, x, rows: ([dy[-1], x[-1]], [dy[-1]]),
                               lambda dy, x, rows: (dy, dy))

        def bprop(x, weight, bias, rows, out, dout):
            dweight, dbias = backward_weight(dout, x, rows)
            return backward_data(dout, weight, rows), dweight, dbias, zero_grad(rows)

        self.op = _aot("MsDfkdMaskedLinearForward", lambda x, w, b, rows: x[:-1] + [w[0]],
                       lambda x, w, b, rows: x, bprop)

    def construct(self, x, weight, bias, rows):
        return self.op(x, weight, bias, rows)


# ---- entry points called by kernels.encoder_ops (parsed in graph mode) ---------------------------------

@functools.lru_cache(maxsize=None)
def _gelu_op():
    return GeluOp()


@functools.lru_cache(maxsize=None)
def _layer_norm_op():
    return LayerNormOp()


def gelu(x):
    return _gelu_op()(x.astype(ms.float32)).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def _linear_op():
    _require("linear")
    return LinearOp()


@functools.lru_cache(maxsize=None)
def _masked_linear_op():
    _require("linear")
    return MaskedLinearOp()


def linear(x, weight, bias, rows=None):
    f32 = ms.float32
    if rows is None:
        return _linear_op()(x.astype(f32), weight.astype(f32), bias.astype(f32)).astype(x.dtype)
    return _masked_linear_op()(x.astype(f32), weight.astype(f32), bias.astype(f32), rows.astype(f32)).astype(x.dtype)


def layer_norm(x, weight, bias, eps):
    return _layer_norm_op()(x.astype(ms.float32), weight.astype(ms.float32), bias.astype(ms.float32),
                            scalar_tensor(float(eps), ms.float32))[0]


_LAYER_INPUTS = ("x", "cos", "sin", "key_mask", "slot", "cache_k", "cache_v", "input_norm", "wq", "wk", "wv", "wo",
                 "bq", "bk", "bv", "post_norm", "w_gate", "w_up", "w_down", "eps")


@functools.lru_cache(maxsize=None)
def _llama_chunk_op():
    """The aot op of MsDfkdLlamaChunkLayer: (x, cache_k, cache_v)."""
    _require("llama_decode")
    return _aot("MsDfkdLlamaChunkLayer", lambda *shapes: (shapes[0], shapes[5], shapes[6]),
                lambda *dtypes: (dtypes[0],) * 3)


@functools.lru_cache(maxsize=None)
def _llama_decode_op():
    """The aot op of MsDfkdLlamaDecodeLayer: x; it writes cache_k and cache_v where they are."""
    _require("llama_decode")
    op = _aot("MsDfkdLlamaDecodeLayer", lambda *shapes: shapes[0], lambda *dtypes: dtypes[0])
    return _declare_writes(op, _LAYER_INPUTS, ("cache_k", "cache_v"))


def llama_decode_layer(x, cos, sin, key_mask, write_slot, cache_k, cache_v, input_norm, wq, wk, wv, wo, bq, bk, bv,
                       post_norm, w_gate, w_up, w_down, eps):
    """One Llama decoder layer for one new token per row, against a KV cache (float32, no gradient):
    x [B, H]; cos, sin [B, D] (rotate-half layout); key_mask [B, S] (1 = readable, the written slot
    included); write_slot [S] (1 at the slot of the new key/value); cache_k, cache_v [B, n_kv, S, D]
    float32; weights [out, in] as in models/llama.py, float32 or as GGUF blocks uint8 [out, in / 32, 20 | 34]
    (gguf_linear), each matrix either way; biases [out] (zeros where the model has none); eps a float.
    Returns (x [B, H], cache_k, cache_v): the new key/value is written into cache_k and cache_v where they are
    (the caller's tensors change), which are returned as they are. See kernels/cpu/llama_decode.cc; the numpy
    reference is kernels/llama_decode_reference.py."""
    _check_float32_caches(cache_k.dtype, cache_v.dtype)
    f32 = ms.float32
    x = _llama_decode_op()(x.astype(f32), cos.astype(f32), sin.astype(f32), key_mask.astype(f32),
                           write_slot.astype(ms.int32), cache_k, cache_v, input_norm, wq, wk, wv, wo, bq, bk, bv,
                           post_norm, w_gate, w_up, w_down, scalar_tensor(float(eps), f32))
    return x, cache_k, cache_v


@ops.constexpr
def _check_float32_caches(k_dtype, v_dtype):
    if k_dtype != ms.float32 or v_dtype != ms.float32:
        raise TypeError(f"llama_decode_layer writes its caches in place: they must be float32, got {k_dtype} and "
                        f"{v_dtype}")
    return True


def llama_chunk_layer(x, cos, sin, key_mask, first_slot, cache_k, cache_v, input_norm, wq, wk, wv, wo, bq, bk, bv,
                      post_norm, w_gate, w_up, w_down, eps):
    """``llama_decode_layer`` for L tokens per row (a prompt's prefill), float32, no gradient: x [B, L, H];
    cos, sin [B, L, D]; key_mask [B, S] (1 = readable; a chunk slot is readable where its token is real);
    first_slot [1] int: token j goes to slot first_slot + j and reads the readable slots up to its own.
    Only the real tokens are computed (padding's output is its input, its slots keep the cache's values).
    Returns (x [B, L, H], cache_k, cache_v). The numpy reference: kernels/llama_decode_reference.py."""
    f32 = ms.float32
    return _llama_chunk_op()(x.astype(f32), cos.astype(f32), sin.astype(f32), key_mask.astype(f32),
                             first_slot.astype(ms.int32), cache_k.astype(f32), cache_v.astype(f32), input_norm, wq,
                             wk, wv, wo, bq, bk, bv, post_norm, w_gate, w_up, w_down, scalar_tensor(float(eps), f32))


@functools.lru_cache(maxsize=None)
def _gumbel_op():
    return _aot("MsDfkdGumbelNoise", lambda keys, cols: [keys[0], cols[0]], lambda *dtypes: ms.float32)


def gumbel_noise(keys, start, stop):
    """kernels.utils.gumbel (the same float32 values) as one C++ op: uint32 row keys [R]
    (kernels.utils.row_keys), columns start..stop-1 -> float32 [R, stop - start]; per value the hash and
    a vectorised float64 log (kernels/cpu/gumbel_noise.cc)."""
    return _gumbel_op()(keys, column_hashes(start, stop).reshape(-1))


@functools.lru_cache(maxsize=None)
def _gguf_linear_op():
    return _aot("MsDfkdGgufLinear", lambda x, blocks: x[:-1] + [blocks[0] * _block_columns(blocks[2])],
                lambda x, blocks: x)


GGUF_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # the quantisation types the block products read: bytes per block
GGUF_GROUP_BYTES = {"Q4_1": 192, "Q8_0": 288}  # the interleaved layout: 8 weight rows' blocks side by side


def _block_columns(block_bytes):
    return 8 if block_bytes in GGUF_GROUP_BYTES.values() else 1


def interleave_blocks(blocks):
    """GGUF blocks in the layout the AVX2 products read fastest (kernels/cpu/gguf_blocks.h): ggml's uint8
    [N, K / 32, 20 | 34] -> [N / 8, K / 32, 192 | 288], the blocks of 8 weight rows side by side (N a multiple
    of 8). A group: float32 d[8] (Q4_1: then float32 m[8]), then the quants by position, 8 rows a position
    (Q4_1: 16 x 8 bytes, byte (j, c) = q_c[j] | q_c[16 + j] << 4; Q8_0: 32 x 8 int8). The float16 scales in
    float32 are exact, so the weights stay the same to the bit."""
    blocks = np.asarray(blocks, np.uint8)
    n, nb, size = blocks.shape
    if size not in GGUF_BLOCK_BYTES.values():
        raise ValueError(f"interleave_blocks: a block of {size} bytes is neither Q4_1 (20) nor Q8_0 (34)")
    if n % 8:
        raise ValueError(f"interleave_blocks: {n} weight rows are not a multiple of 8")
    g = blocks.reshape(n // 8, 8, nb, size).transpose(0, 2, 1, 3)                        # [N/8, nb, 8, bytes]
    scales = 4 if size == GGUF_BLOCK_BYTES["Q4_1"] else 2                                # d, m or d: float16
    halves = np.ascontiguousarray(g[..., :scales]).view(np.float16)                      # [N/8, nb, 8, 1 | 2]
    floats = halves.transpose(0, 1, 3, 2).astype(np.float32)                             # [N/8, nb, 1 | 2, 8]
    quants = g[..., scales:].transpose(0, 1, 3, 2)                                       # [N/8, nb, 16 | 32, 8]
    return np.ascontiguousarray(np.concatenate(
        [floats.reshape(n // 8, nb, -1).view(np.uint8), quants.reshape(n // 8, nb, -1)], -1))


def gguf_linear(x, blocks):
    """x [..., K] W^T -> float32 [..., N], W from a GGUF file's blocks: uint8 [N, K / 32, 20] (Q4_1) or
    [N, K / 32, 34] (Q8_0), ggml's layout, or the same interleaved, [N / 8, K / 32, 192 | 288]
    (interleave_blocks); W is what gguf's dequantiser gives for them, to the bit.
    No gradient."""
    return _gguf_linear_op()(x.astype(ms.float32), blocks)


@functools.lru_cache(maxsize=None)
def adamw_update_op():
    """The aot op of kernels/cpu/adamw.cc: (param, m, v, grad f32, hyper [lr, beta1, beta2, eps, decay] f32)
    -> a [1] flag; param, m and v are updated where they are, so the op is declared to have memory side
    effects (MindSpore then keeps it in order with the parameters' other readers and writers)."""
    _require("adamw")
    op = _aot("MsDfkdAdamWUpdate", lambda p, m, v, g, hyper: [1], lambda p, m, v, g, hyper: ms.float32)
    return _declare_writes(op, ("param", "m", "v", "gradient", "hyper"), ("param", "m", "v"))


GGUF_LOOPS = ("portable", "avx2", "avx512")  # the loops of the GGUF-block products, by the library's number


def gguf_loops():
    """The loops the GGUF-block products run now: 'avx512', 'avx2' or 'portable'."""
    return GGUF_LOOPS[_library().MsDfkdGgufLoops()]


def available_gguf_loops():
    """The loops this CPU can run, best first (the portable loops run everywhere)."""
    return GGUF_LOOPS[:_library().MsDfkdGgufBestLoops() + 1][::-1]


def use_gguf_loops(name=None):
    """Tests and benchmarks: run the GGUF-block products with these loops ('avx512', 'avx2', 'portable');
    None: the best this CPU has (the default)."""
    if name is not None and name not in available_gguf_loops():
        raise ValueError(f"GGUF loops {name!r}: this CPU runs {', '.join(available_gguf_loops())}")
    _library().MsDfkdGgufSetLoops(-1 if name is None else GGUF_LOOPS.index(name))


@functools.lru_cache(maxsize=None)
def _nucleus_fn():
    fn = _library().MsDfkdNucleus
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def nucleus_columns(probs, top_p, cuts):
    """The top-p nucleus of each row of probs (numpy float32 [B, V]): a list of B int64 arrays of column ids,
    ascending; row by row the columns of kernels.nucleus.nucleus(probs[b], top_p, cuts), whose docstring
    has the rule (cuts: the floors of the candidate sets, tried in turn). FloatingPointError for a
    row that holds NaN."""
    probs = np.ascontiguousarray(probs, np.float32)
    b, v = probs.shape
    cuts = np.ascontiguousarray(cuts, np.float32)
    cols, counts = np.empty((b, v), np.int32), np.empty(b, np.int64)
    code = _nucleus_fn()(probs.ctypes.data, b, v, float(np.float32(top_p)), cuts.ctypes.data, len(cuts),
                         cols.ctypes.data, counts.ctypes.data)
    if code:
        raise FloatingPointError(f"top-p sampling: row {code - 1} of the probabilities holds NaN")
    return [cols[i, :counts[i]].astype(np.int64) for i in range(b)]
