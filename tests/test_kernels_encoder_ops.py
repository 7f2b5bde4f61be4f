"""The encoder ops (exact GELU, LayerNorm, linear layer) on both paths against the float64 numpy reference, the
reference against finite differences, the CPU kernel library's build, and which path runs."""
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn, ops

from kernels import cpu_build, cpu_ops, dispatch, gelu, layer_norm, linear, set_kernel_backend
from kernels import encoder_ops_reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[1]
MS_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
# absolute tolerance on values of order 1, per dtype the op computes in (float32 inside either path)
ATOL = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}


pytestmark = pytest.mark.usefixtures("clean_kernel_dispatch")


def _use(path):
    set_kernel_backend("composite" if path == "composite" else None)


class GeluLoss(nn.Cell):
    def construct(self, x, dy):
        return (gelu(x).astype(ms.float32) * dy).sum()


class LayerNormLoss(nn.Cell):
    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def construct(self, x, weight, bias, dy):
        return (layer_norm(x, weight, bias, self.eps) * dy).sum()


class Grads(nn.Cell):
    """(value, gradients of every input but the last) of a loss cell."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss
        self.grad = ops.GradOperation(get_all=True)

    def construct(self, *args):
        return self.loss(*args), self.grad(self.loss)(*args)[:-1]


# ---- the reference itself -------------------------------------------------------------------------------

def test_reference_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 6)) * 2
    h = 1e-6
    numeric = (ref.gelu(x + h) - ref.gelu(x - h)) / (2 * h)
    np.testing.assert_allclose(ref.gelu_backward(x, np.ones_like(x)), numeric, rtol=1e-7, atol=1e-8)

    w, b, dy, eps = rng.normal(size=6), rng.normal(size=6), rng.normal(size=(3, 6)), 1e-5
    loss = lambda x_, w_, b_: (ref.layer_norm(x_, w_, b_, eps) * dy).sum()
    dx, dw, db = ref.layer_norm_backward(x, w, eps, dy)
    for value, grad in ((x, dx), (w, dw), (b, db)):
        numeric = np.zeros_like(value)
        for i in np.ndindex(value.shape):
            saved = value[i]
            value[i] = saved + h
            up = loss(x, w, b)
            value[i] = saved - h
            down = loss(x, w, b)
            value[i] = saved
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)


# ---- both paths against the reference -------------------------------------------------------------------

@pytest.mark.parametrize("path", ["cpu", "composite"])
@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("shape,dtype", [((5,), "float32"), ((3, 7, 33), "float32"), ((300, 257), "float32"),
                                         ((4, 64), "float16"), ((4, 64), "bfloat16")])
def test_gelu_matches_reference(path, graph, shape, dtype):
    ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE)
    _use(path)
    rng = np.random.default_rng(1)
    x = ms.Tensor((rng.normal(size=shape) * 3).astype(np.float32), MS_DTYPES[dtype])
    x_seen = x.astype(ms.float32).asnumpy()  # the reference gets the rounded input
    dy = rng.normal(size=shape).astype(np.float32)
    y = gelu(x)
    assert y.dtype == MS_DTYPES[dtype] and y.shape == shape
    np.testing.assert_allclose(y.astype(ms.float32).asnumpy(), ref.gelu(x_seen), rtol=0, atol=ATOL[dtype] * 3)
    _, (dx,) = Grads(GeluLoss())(x, ms.Tensor(dy))
    np.testing.assert_allclose(dx.astype(ms.float32).asnumpy(), ref.gelu_backward(x_seen, dy),
                               rtol=0, atol=ATOL[dtype] * 3 * np.abs(dy).max())


def test_gelu_tails_and_zero_on_the_cpu_path():
    x = np.array([-40.0, -12.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 12.0, 40.0], np.float32)
    y = gelu(ms.Tensor(x)).asnumpy()
    np.testing.assert_allclose(y, ref.gelu(x), rtol=1e-6, atol=1e-7)
    dx = Grads(GeluLoss())(ms.Tensor(x), ms.Tensor(np.ones_like(x)))[1][0].asnumpy()
    np.testing.assert_allclose(dx, ref.gelu_backward(x, np.ones_like(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["cpu", "composite"])
@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("shape,eps", [((2, 5), 1e-12), ((3, 7, 33), 1e-5), ((200, 384), 1e-12)])
def test_layer_norm_matches_reference(path, graph, shape, eps):
    ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE)
    _use(path)
    rng = np.random.default_rng(2)
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    w = (1 + 0.3 * rng.normal(size=shape[-1])).astype(np.float32)
    b = (0.3 * rng.normal(size=shape[-1])).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    loss, (dx, dw, db) = Grads(LayerNormLoss(eps))(*map(ms.Tensor, (x, w, b, dy)))
    y = layer_norm(ms.Tensor(x), ms.Tensor(w), ms.Tensor(b), eps).asnumpy()
    np.testing.assert_allclose(y, ref.layer_norm(x, w, b, eps), rtol=0, atol=1e-5)
    rdx, rdw, rdb = ref.layer_norm_backward(x, w, eps, dy)
    np.testing.assert_allclose(dx.asnumpy(), rdx, rtol=0, atol=2e-5 * np.abs(rdx).max())
    rows = int(np.prod(shape[:-1]))
    for got, want in ((dw, rdw), (db, rdb)):  # sums over the rows: float32 rounding grows with them
        np.testing.assert_allclose(got.asnumpy(), want, rtol=0, atol=1e-6 * rows * np.abs(dy).max() * 10)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_cpu_layer_norm_gradient_sums_are_the_same_over_any_thread_split(threads, request):
    """Each thread sums its rows' dweight and dbias apart; the parts must add up to the reference."""
    cpu_ops.set_cpu_threads(threads)
    request.addfinalizer(lambda: cpu_ops.set_cpu_threads(0))
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=(4, 333, 128)).astype(np.float32), rng.normal(size=(4, 333, 128)).astype(np.float32)
    w, b = rng.normal(size=128).astype(np.float32), rng.normal(size=128).astype(np.float32)
    _, (dx, dw, db) = Grads(LayerNormLoss(1e-5))(*map(ms.Tensor, (x, w, b, dy)))
    rdx, rdw, rdb = ref.layer_norm_backward(x, w, 1e-5, dy)
    np.testing.assert_allclose(dx.asnumpy(), rdx, rtol=0, atol=2e-5 * np.abs(rdx).max())
    np.testing.assert_allclose(dw.asnumpy(), rdw, rtol=0, atol=1e-3)
    np.testing.assert_allclose(db.asnumpy(), rdb, rtol=0, atol=1e-3)


def test_layer_norm_refuses_bad_arguments_by_name():
    x = ms.Tensor(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"weight and bias must be \[4\] .* got \(3,\) and \(4,\)"):
        layer_norm(x, ms.Tensor(np.ones(3, np.float32)), ms.Tensor(np.zeros(4, np.float32)), 1e-5)
    with pytest.raises(ValueError, match="eps must be > 0, got 0.0"):
        layer_norm(x, ms.Tensor(np.ones(4, np.float32)), ms.Tensor(np.zeros(4, np.float32)), 0.0)


class LinearLoss(nn.Cell):
    def construct(self, x, weight, bias, dy):
        return (linear(x, weight, bias).astype(ms.float32) * dy).sum()


def _linear_inputs(rng, shape, n, dtype):
    """x, w, b in `dtype`, the float32 values the reference gets (the rounded inputs), and dy."""
    k = shape[-1]
    cast = lambda a: ms.Tensor(a.astype(np.float32), MS_DTYPES[dtype])
    x, w, b = cast(rng.normal(size=shape)), cast(rng.normal(size=(n, k)) / np.sqrt(k)), cast(rng.normal(size=n))
    seen = [t.astype(ms.float32).asnumpy() for t in (x, w, b)]
    return x, w, b, seen, rng.normal(size=shape[:-1] + (n,)).astype(np.float32)


@pytest.mark.parametrize("path", ["cpu", "composite"])
@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("shape,n,dtype", [((5, 7), 3, "float32"), ((3, 41, 64), 96, "float32"),
                                           ((2, 48, 384), 1536, "float32"), ((70, 1536), 384, "float32"),
                                           ((4, 9, 32), 48, "float16"), ((4, 9, 32), 48, "bfloat16")])
def test_linear_matches_reference(path, graph, shape, n, dtype):
    if path == "composite" and dtype == "bfloat16" and ms.get_context("device_target") == "CPU":
        pytest.skip("MindSpore's CPU MatMul has no bfloat16 kernel (the cpu path computes in float32)")
    ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE)
    _use(path)
    k = shape[-1]
    x, w, b, seen, dy = _linear_inputs(np.random.default_rng(4), shape, n, dtype)
    y = linear(x, w, b)
    assert y.dtype == MS_DTYPES[dtype] and y.shape == shape[:-1] + (n,)
    # float32 products: rounding grows with the sum's length k; float16/bfloat16 results round once more
    atol = max(ATOL[dtype] * 4, 3e-7 * np.sqrt(k) * 4)
    np.testing.assert_allclose(y.astype(ms.float32).asnumpy(), ref.linear(*seen), rtol=0, atol=atol)
    _, (dx, dw, db) = Grads(LinearLoss())(x, w, b, ms.Tensor(dy))
    rows = int(np.prod(shape[:-1]))
    _assert_linear_grads((dx, dw, db), ref.linear_backward(seen[0], seen[1], dy), (n, rows, rows), dtype)


def _assert_linear_grads(grads, wants, lengths, dtype):
    """dx, dw, db against the reference, each within the rounding of a float32 sum of `length` terms."""
    for got, want, length in zip(grads, wants, lengths):
        scale = np.abs(want).max() / np.sqrt(length) + 1  # the size of one term of the sum, roughly
        tol = (ATOL[dtype] * 8 if dtype != "float32" else 1e-6) * np.sqrt(length) * scale
        np.testing.assert_allclose(got.astype(ms.float32).asnumpy(), want, rtol=0, atol=tol)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_cpu_linear_gradients_are_the_same_over_any_thread_split(threads, request):
    """The products split over rows or columns, the bias gradient over columns: every split must add up."""
    cpu_ops.set_cpu_threads(threads)
    request.addfinalizer(lambda: cpu_ops.set_cpu_threads(0))
    rng = np.random.default_rng(5)
    for shape, n in (((3, 111, 40), 200), ((7, 500), 33)):  # more rows than columns, and fewer
        x, w = rng.normal(size=shape).astype(np.float32), rng.normal(size=(n, shape[-1])).astype(np.float32)
        b, dy = rng.normal(size=n).astype(np.float32), rng.normal(size=shape[:-1] + (n,)).astype(np.float32)
        _, grads = Grads(LinearLoss())(*map(ms.Tensor, (x, w, b, dy)))
        for got, want in zip(grads, ref.linear_backward(x, w, dy)):
            np.testing.assert_allclose(got.asnumpy(), want, rtol=0, atol=1e-4 * np.abs(want).max())


class MaskedLinearLoss(nn.Cell):
    def construct(self, x, weight, bias, rows, dy):
        return (linear(x, weight, bias, rows).astype(ms.float32) * dy).sum()


def _row_masks(shape, rng):
    """Right padding as a tokenizer gives it, a random mask, every row kept, and none kept."""
    lead = shape[:-1]
    lengths = rng.integers(0, lead[-1] + 1, size=lead[:-1])
    padded = (np.arange(lead[-1]) < lengths[..., None]).astype(np.float32)
    return {"padded": padded, "random": (rng.random(lead) < 0.6).astype(np.float32),
            "all": np.ones(lead, np.float32), "none": np.zeros(lead, np.float32)}


@pytest.mark.parametrize("path", ["cpu", "composite"])
@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("mask", ["padded", "random", "all", "none"])
@pytest.mark.parametrize("shape,n,dtype", [((3, 41, 64), 96, "float32"), ((32, 32, 384), 1536, "float32"),
                                           ((4, 9, 32), 48, "float16")])
def test_masked_linear_matches_reference(path, graph, mask, shape, n, dtype):
    """Rows whose mask is 0 give 0 and take no part in dx, dw, db; the others are the plain linear layer."""
    ms.set_context(mode=ms.GRAPH_MODE if graph else ms.PYNATIVE_MODE)
    _use(path)
    rng = np.random.default_rng(6)
    k = shape[-1]
    x, w, b, seen, dy = _linear_inputs(rng, shape, n, dtype)
    rows = _row_masks(shape, rng)[mask]
    y = linear(x, w, b, ms.Tensor(rows))
    assert y.dtype == MS_DTYPES[dtype] and y.shape == shape[:-1] + (n,)
    got = y.astype(ms.float32).asnumpy()
    assert not got[rows == 0].any()  # exactly 0 on masked rows
    atol = max(ATOL[dtype] * 4, 3e-7 * np.sqrt(k) * 4)
    np.testing.assert_allclose(got, ref.linear(*seen, rows), rtol=0, atol=atol)
    _, (dx, dw, db, drows) = Grads(MaskedLinearLoss())(x, w, b, ms.Tensor(rows), ms.Tensor(dy))
    assert not dx.astype(ms.float32).asnumpy()[rows == 0].any() and not drows.asnumpy().any()
    count = max(int(rows.sum()), 1)
    _assert_linear_grads((dx, dw, db), ref.linear_backward(seen[0], seen[1], dy, rows), (n, count, count), dtype)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_cpu_masked_linear_is_the_same_over_any_thread_split(threads, request):
    """The packing, the products and the scattering back split over rows or columns: every split must add up."""
    cpu_ops.set_cpu_threads(threads)
    request.addfinalizer(lambda: cpu_ops.set_cpu_threads(0))
    rng = np.random.default_rng(7)
    for shape, n in (((5, 111, 40), 200), ((700, 33), 9)):
        x, w = rng.normal(size=shape).astype(np.float32), rng.normal(size=(n, shape[-1])).astype(np.float32)
        b, dy = rng.normal(size=n).astype(np.float32), rng.normal(size=shape[:-1] + (n,)).astype(np.float32)
        rows = _row_masks(shape, rng)["random"]
        y, grads = Grads(MaskedLinearLoss())(*map(ms.Tensor, (x, w, b, rows, dy)))
        np.testing.assert_allclose(y.asnumpy(), (ref.linear(x, w, b, rows) * dy).sum(), rtol=1e-5)
        for got, want in zip(grads, ref.linear_backward(x, w, dy, rows)):
            np.testing.assert_allclose(got.asnumpy(), want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_linear_refuses_bad_arguments_by_name():
    x = ms.Tensor(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"weight must be \[n, 4\] and bias \[n\] .* got \(3, 5\) and \(3,\)"):
        linear(x, ms.Tensor(np.zeros((3, 5), np.float32)), ms.Tensor(np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"got \(3, 4\) and \(2,\)"):
        linear(x, ms.Tensor(np.zeros((3, 4), np.float32)), ms.Tensor(np.zeros(2, np.float32)))
    with pytest.raises(ValueError, match=r"rows must be \[2\] for x of shape \(2, 4\), got \[2, 1\]"):
        linear(x, ms.Tensor(np.zeros((3, 4), np.float32)), ms.Tensor(np.zeros(3, np.float32)),
               ms.Tensor(np.ones((2, 1), np.float32)))


def test_the_linear_backward_takes_onednn_from_mindspores_wheel():
    assert cpu_ops.unavailable_reason("linear") is None
    assert os.path.isfile(cpu_ops._gemm_library())


def test_without_onednn_the_linear_runs_the_composite_and_a_warning_says_why():
    """A fresh process whose oneDNN path names no file: gelu keeps its cpu path, linear says why not."""
    code = ("import logging, mindspore, numpy as np\n"
            "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
            "from kernels import cpu_ops, gelu, linear\n"
            "cpu_ops._gemm_library = lambda: '/no/such/libdnnl.so.3'\n"
            "x, w, b = np.ones((2, 3), np.float32), np.full((4, 3), 0.5, np.float32), np.arange(4, dtype=np.float32)\n"
            "gelu(mindspore.Tensor(x))\n"
            "print('Y', linear(*map(mindspore.Tensor, (x, w, b))).asnumpy().tolist())\n")
    env = dict(os.environ)
    env.pop(dispatch.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    text = out.stdout + out.stderr
    assert "INFO gelu: running the cpu path (chosen by device target CPU)" in text, text[-3000:]
    assert "WARNING linear: running the composite path (the cpu kernels cannot run here: cannot open " \
           "/no/such/libdnnl.so.3)" in text, text[-3000:]
    assert "Y [[1.5, 2.5, 3.5, 4.5], [1.5, 2.5, 3.5, 4.5]]" in text


# ---- which path runs -------------------------------------------------------------------------------------

def test_cpu_is_the_default_on_cpu_and_composite_when_asked_for(caplog):
    x = ms.Tensor(np.zeros((2, 3), np.float32))
    with caplog.at_level(logging.INFO, logger="kernels"):
        gelu(x)
        gelu(x)
        set_kernel_backend("composite")
        gelu(x)
    lines = [r.getMessage() for r in caplog.records if r.name == "kernels"]
    assert lines == ["gelu: running the cpu path (chosen by device target CPU)",
                     "gelu: running the composite path (chosen by set_kernel_backend)"]


def test_without_a_compiler_the_composite_runs_and_a_warning_says_why(tmp_path):
    """A fresh process: the library does not exist in its folder and CXX names no compiler."""
    code = ("import logging, mindspore, numpy as np\n"
            "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
            "from kernels import gelu\n"
            "from kernels import encoder_ops_reference as ref\n"
            "x = np.linspace(-3, 3, 7).astype(np.float32)\n"
            "print('ERR', float(np.abs(gelu(mindspore.Tensor(x)).asnumpy() - ref.gelu(x)).max()))\n")
    env = dict(os.environ, CXX="no-such-compiler", MS_DFKD_CPU_KERNELS_DIR=str(tmp_path))
    env.pop(dispatch.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    text = out.stdout + out.stderr
    assert "WARNING gelu: running the composite path (the cpu kernels cannot run here: no C++ compiler: " \
           "'no-such-compiler' is not on PATH" in text, text[-3000:]
    err = float(text.split("ERR ")[1].split()[0])
    assert err < 1e-6
    assert not list(tmp_path.iterdir())


# ---- the build -------------------------------------------------------------------------------------------

def test_build_names_the_library_by_source_and_refuses_a_broken_source(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_build.DIR_ENV, str(tmp_path / "lib"))
    src = tmp_path / "cpu"
    shutil.copytree(cpu_build.SOURCE_DIR, src)
    monkeypatch.setattr(cpu_build, "SOURCE_DIR", src)
    monkeypatch.setattr(cpu_build, "SOURCES", tuple(src / p.name for p in cpu_build.SOURCES))
    monkeypatch.setattr(cpu_build, "HEADERS", tuple(src / p.name for p in cpu_build.HEADERS))
    built = cpu_build.ensure_built()
    assert built.is_file() and built.parent == tmp_path / "lib"
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(built)], capture_output=True, text=True).stdout
    for name in ("MsDfkdGeluForward", "MsDfkdGeluBackward", "MsDfkdLayerNormForward",
                 "MsDfkdLayerNormBackward", "MsDfkdLinearBackwardData", "MsDfkdLinearBackwardWeight",
                 "MsDfkdMaskedLinearBackwardData", "MsDfkdNucleus", "MsDfkdCpuSetThreads", "MsDfkdCpuLoadGemm",
                 "MsDfkdLlamaDecodeLayer"):
        assert name in symbols
    assert cpu_build.ensure_built() == built  # not rebuilt
    assert [p.name for p in (tmp_path / "lib").iterdir()] == [built.name]  # no temporary left

    header = src / "common.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert cpu_build.library_path() != built  # an edited header is another library too

    source = src / "encoder_ops.cc"
    original = source.read_text()
    source.write_text(original + "\nthis is not C++;\n")
    assert cpu_build.library_path() != built  # an edited source is another library
    with pytest.raises(cpu_build.BuildError, match=r"(?s)failed on .*cpu \(exit [1-9].*encoder_ops.cc"):
        cpu_build.ensure_built()
    assert [p.name for p in (tmp_path / "lib").iterdir()] == [built.name]

    source.write_text(original + "\n// edited\n")
    rebuilt = cpu_build.ensure_built()
    assert rebuilt != built and [p.name for p in (tmp_path / "lib").iterdir()] == [rebuilt.name]
