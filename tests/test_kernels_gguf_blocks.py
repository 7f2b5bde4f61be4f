"""Products with weights read from GGUF Q4_1 / Q8_0 blocks (kernels/cpu/gguf_blocks.h): the numpy reference
against the gguf package, the LM-head op (kernels.cpu_ops.gguf_linear) and the decoder layer with block
weights against the reference, with each loop variant the CPU has (AVX-512, AVX2, portable), and the real
SmolLM2 blocks against its float32 weights."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from kernels import cpu_ops
from kernels import gguf_blocks_reference as reference
from kernels import llama_decode_reference

pytestmark = pytest.mark.skipif(cpu_ops.unavailable_reason("llama_decode") is not None,
                                reason=f"the cpu kernels cannot run here: {cpu_ops.unavailable_reason('llama_decode')}")


def random_blocks(rng, n, k, kind):
    """uint8 [n, k / 32, bytes]: random quants and float16 scales (and Q4_1 minimums) of realistic size."""
    size = reference.BLOCK_BYTES[kind]
    blocks = rng.integers(0, 256, (n, k // 32, size), dtype=np.uint8)
    blocks[..., 0:2] = (rng.standard_normal((n, k // 32)) * 0.01).astype(np.float16).view(np.uint8).reshape(
        n, k // 32, 2)
    if kind == "Q4_1":
        blocks[..., 2:4] = (rng.standard_normal((n, k // 32)) * 0.05).astype(np.float16).view(np.uint8).reshape(
            n, k // 32, 2)
    return blocks


@pytest.fixture(params=["avx512", "avx2", "portable"])
def loops(request):
    if request.param not in cpu_ops.available_gguf_loops():
        pytest.skip(f"this CPU has no {request.param} (it runs {', '.join(cpu_ops.available_gguf_loops())})")
    cpu_ops.use_gguf_loops(request.param)
    yield request.param
    cpu_ops.use_gguf_loops(None)


def test_the_reference_dequantises_as_the_gguf_package():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    rng = np.random.default_rng(0)
    for kind in ("Q4_1", "Q8_0"):
        blocks = random_blocks(rng, 7, 96, kind)
        want = dequantize(blocks.reshape(7, -1), getattr(GGMLQuantizationType, kind)).astype(np.float32)
        assert np.array_equal(reference.dequantize(blocks).view(np.int32), want.reshape(7, 96).view(np.int32))


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_the_interleaved_layout_is_as_specified(kind):
    """Each weight read by hand from interleave_blocks' groups (the layout its docstring and gguf_blocks.h
    state) equals the ggml blocks' weight; the reference's own inverse gives the blocks back to the byte."""
    blocks = random_blocks(np.random.default_rng(5), 24, 96, kind)
    groups = cpu_ops.interleave_blocks(blocks)
    assert groups.shape == (3, 3, reference.GROUP_BYTES[kind]) and groups.dtype == np.uint8
    want = reference.dequantize(blocks)
    got = np.zeros_like(want)
    for g, b, c, j in np.ndindex(3, 3, 8, 32):
        d = groups[g, b, 0:32].view(np.float32)[c]
        if kind == "Q8_0":
            w = d * np.float32(groups[g, b, 32 + 8 * j + c].view(np.int8))
        else:
            m = groups[g, b, 32:64].view(np.float32)[c]
            byte = groups[g, b, 64 + 8 * (j % 16) + c]
            w = d * np.float32(byte & 15 if j < 16 else byte >> 4) + m
        got[8 * g + c, 32 * b + j] = w
    assert np.array_equal(got.view(np.int32), want.view(np.int32))
    assert np.array_equal(reference.deinterleave(groups), blocks)


def test_interleaving_refuses_rows_it_cannot_group():
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu_ops.interleave_blocks(random_blocks(np.random.default_rng(6), 12, 32, "Q8_0"))
    with pytest.raises(ValueError, match="neither Q4_1"):
        cpu_ops.interleave_blocks(np.zeros((8, 1, 21), np.uint8))


def _head(x, blocks):
    return cpu_ops.gguf_linear(x, blocks)


def layout_of(blocks, layout):
    return cpu_ops.interleave_blocks(blocks) if layout == "interleaved" else blocks


@pytest.mark.parametrize("layout", ["ggml", "interleaved"])
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("m, n, k", [(8, 576, 576), (1, 37, 64), (3, 100, 160), (13, 65, 96), (33, 130, 32)])
@pytest.mark.parametrize("threads", [1, 2])
def test_gguf_linear_matches_the_reference(loops, layout, kind, m, n, k, threads):
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(m * n + k)
    if layout == "interleaved":
        n = -(-n // 8) * 8  # whole groups of 8 weight rows
    blocks = layout_of(random_blocks(rng, n, k, kind), layout)
    x = rng.standard_normal((m, 1, k)).astype(np.float32)
    cpu_ops.set_cpu_threads(threads)
    try:
        got = ms.jit(_head)(Tensor(x), Tensor(blocks)).asnumpy()
    finally:
        cpu_ops.set_cpu_threads(0)
    want = reference.gguf_linear(x, blocks)
    assert got.shape == (m, 1, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("layout", ["ggml", "interleaved"])
@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_the_weights_are_the_references_to_the_bit(loops, layout, kind):
    """x = the identity: each output is one weight times one, plus zeros, so no rounding: W itself (a sum
    of zeros is +0 where a Q8_0 weight d * 0 is -0 for d < 0: compared as numbers, not bits)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    blocks = layout_of(random_blocks(np.random.default_rng(1), 40, 64, kind), layout)
    got = cpu_ops.gguf_linear(Tensor(np.eye(64, dtype=np.float32)), Tensor(blocks)).asnumpy()
    assert np.array_equal(got.T, reference.dequantize(blocks))


def test_every_float16_scale_is_read_exactly(loops):
    """Q8_0 blocks whose scale runs over all 63,488 finite float16 values (subnormals included), one quant
    of 1 each: the outputs are the scales."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    halves = halves[np.isfinite(halves.view(np.float16))]
    blocks = np.zeros((len(halves), 1, 34), np.uint8)
    blocks[:, 0, 0:2] = halves.view(np.uint8).reshape(-1, 2)
    blocks[:, 0, 2] = 1
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 1.0
    got = cpu_ops.gguf_linear(Tensor(x), Tensor(blocks)).asnumpy()[0]
    assert np.array_equal(got, halves.view(np.float16).astype(np.float32))


@pytest.mark.parametrize("layout", ["ggml", "interleaved"])
@pytest.mark.parametrize("case, threads", [
    ((8, 576, 9, 3, 64, 104, 1536, False, 80), 2),  # SmolLM2's layer at 8 rows
    ((5, 192, 12, 4, 16, 20, 224, True, 7), 3),     # 3 threads: the parts cut groups of 8 weight rows
])
def test_the_decoder_layer_takes_blocks_for_any_of_its_matrices(loops, layout, case, threads):
    """The q/k/v/gate as Q4_1 blocks, o and down as Q8_0, up in float32: the layer equals the float64
    reference on the dequantised weights."""
    from test_kernels_llama_decode import make_case
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(3)
    args = make_case(rng, *case)
    for index, kind in ((8, "Q4_1"), (9, "Q4_1"), (10, "Q4_1"), (11, "Q8_0"), (16, "Q4_1"), (18, "Q8_0")):
        n, k = args[index].shape
        args[index] = layout_of(random_blocks(rng, n, k, kind), layout)
    want = llama_decode_reference.llama_decode_layer(*args, 1e-5)
    cpu_ops.set_cpu_threads(threads)
    try:
        got = cpu_ops.llama_decode_layer(*map(Tensor, args), 1e-5)
    finally:
        cpu_ops.set_cpu_threads(0)
    for name, g, w in zip(("x", "cache_k", "cache_v"), got, want):
        np.testing.assert_allclose(g.asnumpy(), w, rtol=2e-5, atol=2e-5 * np.abs(w).max(), err_msg=name)


def test_blocks_of_the_wrong_width_are_refused():
    from test_kernels_llama_decode import make_case
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(4)
    args = make_case(rng, 2, 64, 4, 2, 16, 9, 96, False, 3)
    args[8] = random_blocks(rng, 64, 32, "Q4_1")   # wq should take 64 values a row, these blocks hold 32
    with pytest.raises(RuntimeError):
        cpu_ops.llama_decode_layer(*map(Tensor, args), 1e-5)[0].asnumpy()


@pytest.mark.real
def test_smollm2_blocks_are_its_float32_weights():
    """The loader keeps SmolLM2's Q4_1 / Q8_0 matrices in llama.py's row order (q and k un-permuted as the
    weights): dequantised, they equal the model's float32 parameters to the bit."""
    from ms_dfkd.assets import asset_path
    from ms_dfkd.models.llama_weights import load_gguf_llama
    _, model = load_gguf_llama(asset_path("smollm2_gguf"))
    params = dict(model.parameters_and_names())
    assert len(model.gguf_blocks) == 30 * 7 + 1
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.29.mlp.down_proj.weight", "model.embed_tokens.weight"):
        weights = params[name].asnumpy()
        blocks = model.gguf_blocks[name].asnumpy()
        assert np.array_equal(reference.dequantize(blocks).view(np.int32), weights.view(np.int32))
