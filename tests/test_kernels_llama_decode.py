"""The sampler's one-token decoder layer as one C++ op (kernels.cpu_ops.llama_decode_layer) against the float64
numpy reference (kernels/llama_decode_reference.py), over shapes, biases, masks and thread counts."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from kernels import cpu_ops
from kernels import llama_decode_reference as reference

pytestmark = pytest.mark.skipif(cpu_ops.unavailable_reason("llama_decode") is not None,
                                reason=f"the cpu kernels cannot run here: {cpu_ops.unavailable_reason('llama_decode')}")


def make_case(rng, b, h, n_heads, n_kv, d, s, inter, bias, slot):
    def r(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    positions = rng.integers(0, 60, b)
    angles = positions[:, None] * (1.0 / 10000 ** (np.arange(0, d, 2) / d))[None]
    angles = np.concatenate([angles, angles], -1)
    key_mask = (rng.random((b, s)) > 0.4).astype(np.float32)
    key_mask[:, slot] = 1
    write_slot = np.zeros(s, np.int32)
    write_slot[slot] = 1

    def maybe_bias(n):
        return r(n) if bias else np.zeros(n, np.float32)

    return [r(b, h, scale=1.0), np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32), key_mask,
            write_slot, r(b, n_kv, s, d, scale=1.0), r(b, n_kv, s, d, scale=1.0), 1 + r(h), r(n_heads * d, h),
            r(n_kv * d, h), r(n_kv * d, h), r(h, n_heads * d), maybe_bias(n_heads * d), maybe_bias(n_kv * d),
            maybe_bias(n_kv * d), 1 + r(h), r(inter, h), r(inter, h), r(h, inter)]


def _layer(*args):
    return cpu_ops.llama_decode_layer(*args, 1e-5)


SHAPES = [  # b, h, n_heads, n_kv, d, s, inter, bias, slot
    (8, 576, 9, 3, 64, 104, 1536, False, 80),   # SmolLM2's layer at the offline default's batch
    (3, 64, 4, 2, 16, 9, 96, True, 8),          # Qwen2's q/k/v biases, the last slot
    (1, 32, 2, 1, 16, 5, 40, True, 0),          # one row, one KV head, the first slot
    (5, 96, 6, 6, 16, 12, 64, False, 6),        # no grouping (n_heads == n_kv)
]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_decode_layer_matches_the_numpy_reference(shape, threads, mode):
    ms.set_context(mode=mode)
    cpu_ops.set_cpu_threads(threads)
    try:
        args = make_case(np.random.default_rng(sum(shape[:7])), *shape)
        want = reference.llama_decode_layer(*args, 1e-5)
        if mode == ms.GRAPH_MODE:
            got = ms.jit(_layer)(*map(Tensor, args))
        else:
            got = cpu_ops.llama_decode_layer(*map(Tensor, args), 1e-5)
    finally:
        cpu_ops.set_cpu_threads(0)
    for name, g, w in zip(("x", "cache_k", "cache_v"), got, want):
        g = g.asnumpy()
        assert g.shape == w.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * np.abs(w).max(), err_msg=name)
    # the cache is the input one with the new key/value at the slot, nothing else written
    slot = shape[-1]
    cache_k = args[5]
    got_k = got[1].asnumpy()
    np.testing.assert_array_equal(np.delete(got_k, slot, 2), np.delete(cache_k, slot, 2))


@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_the_caches_are_written_where_they_are(mode):
    """The caller's cache tensors hold the new key/value after the call (nothing else of them changes), two
    steps in a row read the first step's write, and the layer returns the caller's caches."""
    ms.set_context(mode=mode)
    args = make_case(np.random.default_rng(1), *SHAPES[1][:8], 3)
    want = reference.llama_decode_layer(*args, 1e-5)
    tensors = [Tensor(a.copy()) for a in args]
    layer = ms.jit(_layer) if mode == ms.GRAPH_MODE else _layer
    x, k, v = layer(*tensors)
    for got, ref in ((tensors[5], want[1]), (tensors[6], want[2]), (k, want[1]), (v, want[2])):
        np.testing.assert_allclose(got.asnumpy(), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
    # a second step at slot 4 reads slot 3 from the caller's (updated) caches
    args2 = [a.copy() for a in args]
    args2[5], args2[6] = want[1].astype(np.float32), want[2].astype(np.float32)
    args2[3][:, 4] = 1
    args2[4][:] = 0
    args2[4][4] = 1
    want2 = reference.llama_decode_layer(*args2, 1e-5)
    tensors[3], tensors[4] = Tensor(args2[3]), Tensor(args2[4])
    x2, _, _ = layer(*tensors)
    np.testing.assert_allclose(x2.asnumpy(), want2[0], rtol=2e-5, atol=2e-5 * np.abs(want2[0]).max())
    np.testing.assert_allclose(tensors[5].asnumpy(), want2[1], rtol=2e-5, atol=2e-5 * np.abs(want2[1]).max())


def test_masked_slots_take_no_part():
    """A readable slot's key decides the output; an unreadable slot's does not, whatever it holds."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    args = make_case(np.random.default_rng(0), *SHAPES[1])
    args[3][:, 2] = 0                                   # slot 2 unreadable
    base = cpu_ops.llama_decode_layer(*map(Tensor, args), 1e-5)[0].asnumpy()
    args[5][:, :, 2] += 100.0
    args[6][:, :, 2] += 100.0
    np.testing.assert_array_equal(cpu_ops.llama_decode_layer(*map(Tensor, args), 1e-5)[0].asnumpy(), base)
    args[3][:, 2] = 1                                   # now readable
    assert np.abs(cpu_ops.llama_decode_layer(*map(Tensor, args), 1e-5)[0].asnumpy() - base).max() > 1.0


def test_a_step_without_a_write_slot_is_refused():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    args = make_case(np.random.default_rng(0), *SHAPES[2])
    args[4][:] = 0
    with pytest.raises(RuntimeError):
        cpu_ops.llama_decode_layer(*map(Tensor, args), 1e-5)[0].asnumpy()


# --- the same layer for a chunk of tokens per row (the prompt's prefill) ------------------------------------

def make_chunk_case(rng, b, h, n_heads, n_kv, d, s, inter, bias, w0, length):
    """A chunk of `length` tokens per row at slots w0.., left-padded by a different amount per row (one row
    all padding when b > 2), after w0 readable-or-not prefix slots; slots past the chunk unreadable."""
    def r(*shape, scale=0.1):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    positions = rng.integers(0, 60, (b, length))
    angles = positions[..., None] * (1.0 / 10000 ** (np.arange(0, d, 2) / d))
    angles = np.concatenate([angles, angles], -1)
    key_mask = np.zeros((b, s), np.float32)
    key_mask[:, :w0] = rng.random((b, w0)) > 0.3
    for i in range(b):
        pad = 0 if i == 0 else (length if i == 2 else int(rng.integers(0, length)))
        key_mask[i, w0 + pad:w0 + length] = 1

    def maybe_bias(n):
        return r(n) if bias else np.zeros(n, np.float32)

    return [r(b, length, h, scale=1.0), np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32),
            key_mask, np.array([w0], np.int32), r(b, n_kv, s, d, scale=1.0), r(b, n_kv, s, d, scale=1.0), 1 + r(h),
            r(n_heads * d, h), r(n_kv * d, h), r(n_kv * d, h), r(h, n_heads * d), maybe_bias(n_heads * d),
            maybe_bias(n_kv * d), maybe_bias(n_kv * d), 1 + r(h), r(inter, h), r(inter, h), r(h, inter)]


def _chunk(*args):
    return cpu_ops.llama_chunk_layer(*args, 1e-5)


CHUNK_SHAPES = [  # b, h, n_heads, n_kv, d, s, inter, bias, first slot, chunk length
    (8, 576, 9, 3, 64, 104, 1536, False, 38, 48),   # SmolLM2 at the offline default: the rest after a prompt start
    (2, 576, 9, 3, 64, 38, 1536, False, 0, 38),     # ... and the shared start itself (no prefix)
    (3, 64, 4, 2, 16, 20, 96, True, 5, 7),          # Qwen2's biases, slots after the chunk
    (1, 32, 2, 1, 16, 6, 40, True, 0, 6),           # one row filling the cache
    (5, 96, 6, 6, 16, 12, 64, False, 3, 1),         # one token: a decode step's shape
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", CHUNK_SHAPES)
@pytest.mark.parametrize("mode", [ms.PYNATIVE_MODE, ms.GRAPH_MODE])
def test_chunk_layer_matches_the_numpy_reference(shape, threads, mode):
    ms.set_context(mode=mode)
    cpu_ops.set_cpu_threads(threads)
    try:
        args = make_chunk_case(np.random.default_rng(sum(shape)), *shape)
        want = reference.llama_chunk_layer(*args, 1e-5)
        if mode == ms.GRAPH_MODE:
            got = ms.jit(_chunk)(*map(Tensor, args))
        else:
            got = cpu_ops.llama_chunk_layer(*map(Tensor, args), 1e-5)
    finally:
        cpu_ops.set_cpu_threads(0)
    for name, g, w in zip(("x", "cache_k", "cache_v"), got, want):
        g = g.asnumpy()
        assert g.shape == w.shape and g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * np.abs(w).max(), err_msg=name)
    # padding: its output is its input, and only the real tokens' slots are written
    b, length, w0 = shape[0], shape[-1], shape[-2]
    real = args[3][:, w0:w0 + length] > 0
    np.testing.assert_array_equal(got[0].asnumpy()[~real], args[0][~real])
    written = np.zeros((b, shape[5]), bool)
    written[:, w0:w0 + length] = real
    got_k = got[1].asnumpy().transpose(0, 2, 1, 3)  # [B, S, n_kv, D]
    np.testing.assert_array_equal(got_k[~written], args[5].transpose(0, 2, 1, 3)[~written])


def test_chunk_of_one_token_is_the_decode_step():
    """A chunk of one token at slot w equals the one-token decode layer writing slot w (same reference)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    args = make_case(np.random.default_rng(3), *SHAPES[0])
    slot = SHAPES[0][-1]
    args[3][:, slot + 1:] = 0  # a decode step never reads past its slot
    chunk_args = list(args)
    chunk_args[0] = args[0][:, None]
    chunk_args[1], chunk_args[2] = args[1][:, None], args[2][:, None]
    chunk_args[4] = np.array([slot], np.int32)
    step = cpu_ops.llama_decode_layer(*map(Tensor, args), 1e-5)
    chunk = cpu_ops.llama_chunk_layer(*map(Tensor, chunk_args), 1e-5)
    want = step[0].asnumpy()
    np.testing.assert_allclose(chunk[0].asnumpy()[:, 0], want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    for a, c in zip(step[1:], chunk[1:]):  # the same arithmetic for the new key/value: to the bit
        np.testing.assert_array_equal(c.asnumpy(), a.asnumpy())


def test_chunk_past_the_cache_is_refused():
    ms.set_context(mode=ms.PYNATIVE_MODE)
    args = make_chunk_case(np.random.default_rng(0), *CHUNK_SHAPES[2])
    args[4] = np.array([15], np.int32)  # 15 + 7 > 20 slots
    with pytest.raises(RuntimeError):
        cpu_ops.llama_chunk_layer(*map(Tensor, args), 1e-5)[0].asnumpy()
