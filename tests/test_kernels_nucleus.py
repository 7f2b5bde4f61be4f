"""The sampler's top-p nucleus: the C++ path (kernels/cpu/nucleus.cc) against the numpy reference
(kernels.nucleus.nucleus), column for column; and the pair-wise Gumbel noise the sampler draws for the
nuclei against the grid of gumbel_np."""
import zlib

import numpy as np
import pytest

from kernels import cpu_ops
from kernels.gumbel_noise import gumbel_np, gumbel_pairs_np
from kernels.nucleus import NUCLEUS_CUTS, nuclei

pytestmark = pytest.mark.skipif(cpu_ops.unavailable_reason("nucleus") is not None,
                                reason=f"the C++ nucleus cannot run: {cpu_ops.unavailable_reason('nucleus')}")


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _rows(kind, rng, b=8, v=49152):
    if kind == "peaked":  # one token near 1, as after a confident step
        x = rng.normal(size=(b, v)).astype(np.float32)
        x[:, 7] += 20.0
        return _softmax(x)
    if kind == "ties":  # few distinct values: many tokens tie with the least one kept
        return _softmax(np.round(rng.normal(size=(b, v)) * 2.0).astype(np.float32))
    if kind == "flat":
        return np.full((b, v), np.float32(1.0 / v))
    if kind == "small":
        return _softmax((rng.normal(size=(b, 64)) * 2.0).astype(np.float32))
    if kind == "wide":  # Qwen's vocabulary, every token below the last cut: the whole-row step's floors
        return _softmax((rng.normal(size=(4, 151936)) * 0.5).astype(np.float32))
    scale = {"lm": 3.0, "broad": 1.0, "sharp": 8.0}[kind]  # language-model-like rows: a long tail
    return _softmax((rng.standard_t(3, size=(b, v)) * scale).astype(np.float32))


@pytest.mark.parametrize("kind", ["lm", "broad", "sharp", "peaked", "ties", "flat", "small", "wide"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("cuts", [NUCLEUS_CUTS, (0.5,), (0.2, 0.05), ()])
def test_the_cpu_nucleus_has_the_columns_of_numpys(kind, top_p, cuts):
    probs = _rows(kind, np.random.default_rng(zlib.crc32(f"{kind} {top_p}".encode())))
    want = nuclei(probs, top_p, cuts, "numpy")
    got = nuclei(probs, top_p, cuts, "cpu")
    for b, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == np.int64
        np.testing.assert_array_equal(g, w, err_msg=f"row {b}")


def test_the_cpu_nucleus_refuses_nan():
    probs = _rows("lm", np.random.default_rng(0))
    probs[3, 100] = np.nan
    with pytest.raises(FloatingPointError, match="row 3"):
        nuclei(probs, 0.9, NUCLEUS_CUTS, "cpu")


def test_an_unknown_path_is_refused():
    with pytest.raises(ValueError, match="'gpu'"):
        nuclei(np.ones((1, 4), np.float32) / 4, 0.9, path="gpu")


def test_pairwise_noise_is_the_grids():
    rng = np.random.default_rng(1)
    rows = np.concatenate([rng.integers(0, 10 ** 6, 20), rng.integers(2 ** 32, 2 ** 33, 17)])
    cols = rng.integers(0, 49152, 301)
    grid = gumbel_np(99, rows, cols)
    np.testing.assert_array_equal(gumbel_pairs_np(99, np.repeat(rows, len(cols)), np.tile(cols, len(rows))),
                                  grid.reshape(-1))
    pick = rng.permutation(grid.size)[:1237]  # another length and order
    r, c = np.divmod(pick, len(cols))
    np.testing.assert_array_equal(gumbel_pairs_np(99, rows[r], cols[c]), grid.reshape(-1)[pick])


@pytest.mark.parametrize("top_p", [0.9, 0.95])
def test_the_sampler_picks_the_same_tokens_with_either_nucleus_path(top_p):
    from ms_dfkd.models.llama_sampling import pick_tokens
    rng = np.random.default_rng(2)
    for step in range(20):
        logits = (rng.standard_t(3, size=(8, 49152)) * 3.0).astype(np.float32)
        rows = np.arange(8, dtype=np.int64) * 24 + step
        a = pick_tokens(logits, 5, rows, np.float32(1 / 0.9), top_p, False, nucleus_path="cpu")
        b = pick_tokens(logits, 5, rows, np.float32(1 / 0.9), top_p, False, nucleus_path="numpy")
        np.testing.assert_array_equal(a, b)
