"""Path ``cpu`` of the encoder ops: the C++ kernels of kernels/cpu/encoder_ops.cc as MindSpore ``aot``
custom ops with bprop (CPU device target only). The library is compiled on first use
(kernels/cpu_build.py); ``unavailable_reason()`` says why it cannot run here, if it cannot.

The kernels take float32; other dtypes are cast to float32 and the result back. The LayerNorm forward
also returns each row's mean and 1/std, which its backward takes rather than recomputing them.
"""
import ctypes
import functools
import os

import mindspore as ms
from mindspore import nn, ops

from kernels import cpu_build
from kernels.utils import scalar_tensor, zero_grad

_threads = {"n": 0}


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


@functools.lru_cache(maxsize=None)
def unavailable_reason():
    """None if the cpu path can run here, else why not (builds the library if needed)."""
    target = ms.get_context("device_target")
    if target != "CPU":
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
    return None


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


# ---- entry points called by kernels.encoder_ops (parsed in graph mode) ---------------------------------

@functools.lru_cache(maxsize=None)
def _gelu_op():
    return GeluOp()


@functools.lru_cache(maxsize=None)
def _layer_norm_op():
    return LayerNormOp()


def gelu(x):
    return _gelu_op()(x.astype(ms.float32)).astype(x.dtype)


def layer_norm(x, weight, bias, eps):
    return _layer_norm_op()(x.astype(ms.float32), weight.astype(ms.float32), bias.astype(ms.float32),
                            scalar_tensor(float(eps), ms.float32))[0]
