"""The sparse generator-to-teacher vocabulary bridge, on the offline tokenizers."""
import numpy as np
import pytest


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
