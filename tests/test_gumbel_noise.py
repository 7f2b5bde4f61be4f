"""The counter-based Gumbel noise of kernels/gumbel_noise.py (numpy): the hash, the distribution, seeds.

Each kernel path's noise is checked against gumbel_np in its own tests (test_kernels_composite.py,
test_kernels_triton.py; the aot kernels' on a GPU by scripts/gpu_check_kernels.py)."""
import numpy as np

from kernels import gumbel_noise


def _mix_reference(x):
    """The 32-bit mixer written with Python ints (arbitrary precision, explicit mod 2**32)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x45D9F3B) % 2 ** 32
    x ^= x >> 16
    x = (x * 0x45D9F3B) % 2 ** 32
    x ^= x >> 16
    return x


def test_hash_matches_python_ints():
    xs = [0, 1, 2, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]
    assert list(gumbel_noise.mix32_np(np.array(xs))) == [_mix_reference(x) for x in xs]
    seed, row, col = 77, 5, 9
    h = _mix_reference(_mix_reference(_mix_reference(seed) ^ row) ^ _mix_reference(col))
    u = ((h >> 9) + 0.5) / 2 ** 23
    assert gumbel_noise.uniform_np(seed, [row], [col])[0, 0] == np.float32(u)


def test_million_draws_finite_and_gumbel_distributed():
    g = gumbel_noise.gumbel_np(1234, np.arange(1000), np.arange(1000))
    assert g.shape == (1000, 1000)
    assert np.isfinite(g).all()
    # Gumbel(0,1): mean = Euler-Mascheroni 0.5772, variance = pi^2/6
    assert abs(g.mean() - 0.5772) < 0.01
    assert abs(g.var() - np.pi ** 2 / 6) < 0.02
    u = gumbel_noise.uniform_np(1234, np.arange(1000), np.arange(1000))
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
    assert np.abs(hist - 0.1).max() < 0.003


def test_seeds_differ_by_rank_and_step():
    seeds = {gumbel_noise.derive_seed(0, r, s, 1) for r in range(4) for s in range(50)}
    assert len(seeds) == 200
    a = gumbel_noise.gumbel_np(gumbel_noise.derive_seed(0, 0, 3, 1), np.arange(4), np.arange(50))
    b = gumbel_noise.gumbel_np(gumbel_noise.derive_seed(0, 1, 3, 1), np.arange(4), np.arange(50))
    assert not np.allclose(a, b)


def test_a_block_of_noise_depends_only_on_its_seed_rows_and_columns():
    """What lets every path draw any block of the noise on its own (slabs, kernel tiles, the backward's
    redraw): a block equals that block of a bigger draw, and seeds and rows count mod 2**32."""
    full = gumbel_noise.gumbel_np(5, np.arange(40), np.arange(300))
    block = gumbel_noise.gumbel_np(5, np.arange(7, 19), np.arange(100, 250))
    np.testing.assert_array_equal(block, full[7:19, 100:250])
    wrapped = gumbel_noise.gumbel_np(5 + 2 ** 32, np.arange(40) + 2 ** 32, np.arange(300))
    np.testing.assert_array_equal(wrapped, full)
    assert 0 <= gumbel_noise.derive_seed(2 ** 40, -1, 7) < 2 ** 32
