"""Config parsing, counter-based Gumbel noise and the vocabulary bridge."""
import numpy as np
import pytest

from ms_dfkd.config import ConfigError, load_config, parse_overrides
from ms_dfkd import gumbel


# ----------------------------------------------------------------------------- config

def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  seed: 3\n  rounds: 2\nloss:\n  div: 0.25\n")
    cfg = load_config(p, parse_overrides(["--run.rounds", "5", "--corpus.sources=bbc,political",
                                          "--generator.chat_template", "false"]))
    assert cfg.run.seed == 3 and cfg.run.rounds == 5 and cfg.loss.div == 0.25
    assert cfg.corpus.sources == ["bbc", "political"] and cfg.generator.chat_template is False


@pytest.mark.parametrize("text, needle", [
    ("run:\n  sede: 3\n", "run.sede"),
    ("rnu:\n  seed: 3\n", "rnu"),
    ("run:\n  seed: three\n", "run.seed"),
    ("run:\n  method: magic\n", "run.method"),
    ("generator:\n  top_p: 1.5\n", "generator.top_p"),
    ("generator:\n  batch_size: 3\n", "generator.batch_size"),
    ("run: [1, 2]\n", "section 'run'"),
    ("run:\n  seed: [\n", "not valid YAML"),
])
def test_bad_config_names_the_key(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_errors():
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--run.seed"])
    with pytest.raises(ConfigError, match="unknown config key 'loss.spc'"):
        load_config(None, [("loss.spc", "1")])


# ----------------------------------------------------------------------------- Gumbel noise

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
    assert list(gumbel.mix32_np(np.array(xs))) == [_mix_reference(x) for x in xs]
    seed, row, col = 77, 5, 9
    h = _mix_reference(_mix_reference(_mix_reference(seed) ^ row) ^ _mix_reference(col))
    u = ((h >> 9) + 0.5) / 2 ** 23
    assert gumbel.uniform_np(seed, [row], [col])[0, 0] == np.float32(u)


def test_million_draws_finite_and_gumbel_distributed():
    g = gumbel.gumbel_np(1234, np.arange(1000), np.arange(1000))
    assert g.shape == (1000, 1000)
    assert np.isfinite(g).all()
    # Gumbel(0,1): mean = Euler-Mascheroni 0.5772, variance = pi^2/6
    assert abs(g.mean() - 0.5772) < 0.01
    assert abs(g.var() - np.pi ** 2 / 6) < 0.02
    u = gumbel.uniform_np(1234, np.arange(1000), np.arange(1000))
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
    assert np.abs(hist - 0.1).max() < 0.003


def test_mindspore_noise_equals_numpy_and_is_finite():
    import mindspore as ms
    rows, cols = np.arange(1000), np.arange(1000)
    keys = gumbel.row_keys_np(99, rows)
    g = gumbel.gumbel_ms(ms.Tensor(keys), ms.Tensor(cols.astype(np.int64))).asnumpy()
    ref = gumbel.gumbel_np(99, rows, cols)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)


def test_seeds_differ_by_rank_and_step():
    seeds = {gumbel.derive_seed(0, r, s, 1) for r in range(4) for s in range(50)}
    assert len(seeds) == 200
    a = gumbel.gumbel_np(gumbel.derive_seed(0, 0, 3, 1), np.arange(4), np.arange(50))
    b = gumbel.gumbel_np(gumbel.derive_seed(0, 1, 3, 1), np.arange(4), np.arange(50))
    assert not np.allclose(a, b)


# ----------------------------------------------------------------------------- vocab bridge

@pytest.fixture(scope="module")
def tokenizers_pair():
    from ms_dfkd import build
    return build.generator_tokenizer(), build.teacher_tokenizer()


def test_bridge_rows_follow_wordpiece(tokenizers_pair):
    from ms_dfkd.vocab_bridge import build_vocab_bridge
    g, t = tokenizers_pair
    br = build_vocab_bridge(g, t)
    assert br.shape == (g.vocab_size, t.vocab_size)
    m = br.matrix
    sums = np.asarray(m.sum(1)).ravel()
    assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0))
    # " great" is one BPE token and one word-piece
    gid = g.encode(" great", add_special_tokens=False)
    assert len(gid) == 1
    row = m.getrow(gid[0])
    assert list(row.indices) == [t.token_to_id("great")] and row.data[0] == pytest.approx(1.0)
    assert 0.9 < br.coverage <= 1.0
    # special tokens contribute nothing
    assert sums[g.eos_id] == 0
    E = np.random.default_rng(0).normal(size=(t.vocab_size, 4)).astype(np.float32)
    tab = br.table(E)
    np.testing.assert_allclose(tab[gid[0]], E[t.token_to_id("great")], rtol=1e-6)


def test_bridge_identity_for_same_tokenizer(tokenizers_pair):
    from ms_dfkd.vocab_bridge import build_vocab_bridge
    _, t = tokenizers_pair
    br = build_vocab_bridge(t, t)
    assert br.identity and br.coverage == 1.0
