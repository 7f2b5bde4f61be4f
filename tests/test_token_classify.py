"""Token classification: the word-to-sub-token alignment on a hand-written WordPiece vocabulary (checked by
hand), the first-sub-token labels and read-back, and a few training steps of a tiny random BERT tagger."""
import numpy as np
import pytest

import mindspore as ms

from ms_dfkd.models.bert import BertConfig, BertForTokenClassification
from ms_dfkd.token_classify import (IGNORE, TokenEncoderRunner, evaluate_tokens, first_subtoken_labels,
                                    first_subtoken_positions, train_token_classifier)
from ms_dfkd.tokenization import wordpiece_tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",          # 0..4
         "new", "york", "play", "##ing", "alice", "bob",         # 5..10
         "paris", "loves", "in", "the", "city", "is", "big", "'", "don", "t"]   # 11..20
TAGS = ["O", "B-person", "I-person", "B-geo-loc", "I-geo-loc"]


@pytest.fixture(autouse=True)
def _pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    p = tmp_path_factory.mktemp("wp") / "vocab.txt"
    p.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return wordpiece_tokenizer(p)


def test_alignment_by_hand(tok):
    words = [["New", "York", "playing", "xyz", "\u200b", "don't"], ["Alice"]]
    ids, mask, wid = tok.encode_words_batch(words, max_length=12, padding="max_length")
    # [CLS] new york play ##ing [UNK] don ' t [SEP]; the zero-width space (word 4) gives no token
    assert ids[0].tolist() == [2, 5, 6, 7, 8, 1, 19, 18, 20, 3, 0, 0]
    assert wid[0].tolist() == [-1, 0, 1, 2, 2, 3, 5, 5, 5, -1, -1, -1]
    assert mask[0].tolist() == [1] * 10 + [0] * 2
    assert ids[1].tolist()[:3] == [2, 9, 3] and wid[1].tolist() == [-1, 0] + [-1] * 10
    assert first_subtoken_positions(wid[0], 6).tolist() == [1, 2, 3, 5, -1, 6]
    labels = first_subtoken_labels(wid, [[3, 4, 0, 1, 2, 0], [1]])
    I = IGNORE
    assert labels[0].tolist() == [I, 3, 4, 0, I, 1, 0, I, I, I, I, I]   # word 4 (no token) is lost
    assert labels[1].tolist() == [I, 1] + [I] * 10


def test_truncation_keeps_sep_and_drops_the_words_past_the_cut(tok):
    ids, mask, wid = tok.encode_words_batch([["New", "York", "playing"]], max_length=4)
    assert ids.tolist() == [[2, 5, 6, 3]] and wid.tolist() == [[-1, 0, 1, -1]]
    assert first_subtoken_positions(wid[0], 3).tolist() == [1, 2, -1]
    # unchanged behaviour of encode_batch on the same text
    assert tok.encode_batch(["New York playing"], max_length=4)[0].tolist() == [[2, 5, 6, 3]]
    with pytest.raises(TypeError):
        tok.encode_words_batch(["New York"])


def test_alignment_with_the_minilm_tokenizer(asset_or_skip):
    t = wordpiece_tokenizer(asset_or_skip("minilm_l6_dir"))
    _, _, wid = t.encode_words_batch([["@paulwalk", "It", "'s", "Empire"]])
    # [CLS] @ paul ##walk it ' s empire [SEP]
    assert wid[0].tolist() == [-1, 0, 0, 0, 1, 2, 2, 3, -1]


def _model(seed=0):
    ms.set_seed(seed)
    cfg = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=len(TAGS))
    return BertForTokenClassification(cfg)


def _toy(n, seed):
    """Sentences of known words; alice/bob are persons, paris and "new york" places, the rest O."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.integers(2, 7)):
            k = rng.integers(0, 6)
            if k == 0:
                words += ["new", "york"]
                tags += [3, 4]
            elif k == 1:
                words.append(["alice", "bob"][rng.integers(0, 2)])
                tags.append(1)
            elif k == 2:
                words.append("Paris")
                tags.append(3)
            else:
                words.append(["loves", "in", "the", "city", "is", "playing"][rng.integers(0, 6)])
                tags.append(0)
        out.append((words, tags))
    return out


def test_word_read_back_is_the_first_subtoken(tok):
    model = _model()
    model.set_train(False)
    sents = [["playing", "New", "York"], ["the", "city", "\u200b"], []]
    run = TokenEncoderRunner(model, tok, max_length=8, batch_size=4, jit=False)
    ids, mask, wid = tok.encode_words_batch(sents, max_length=8, padding="max_length")
    full = model(input_ids=ms.Tensor(ids), attention_mask=ms.Tensor(mask)).asnumpy()
    wl = run.word_logits(sents)
    # row 0: [CLS] play ##ing new york [SEP]: words at positions 1, 3, 4
    np.testing.assert_allclose(wl[0], full[0, [1, 3, 4]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(wl[1][:2], full[1, [1, 2]], rtol=1e-6, atol=1e-6)
    assert np.all(wl[1][2] == 0) and wl[2].shape == (0, len(TAGS))
    preds = run.predict(sents, fill=0)
    assert preds[0] == full[0, [1, 3, 4]].argmax(-1).tolist()
    assert preds[1][2] == 0 and preds[2] == []
    np.testing.assert_allclose(run.word_probs(sents)[0].sum(-1), 1.0, rtol=1e-6)


def test_a_few_steps_lower_the_loss(tok):
    # jitted step and forward, as train-teacher runs them (PyNative gives the same losses, ~3x slower)
    train = _toy(48, 0)
    model = _model()
    run = TokenEncoderRunner(model, tok, max_length=24, batch_size=16, jit=True)
    before = evaluate_tokens(run, train, TAGS)
    losses = train_token_classifier(model, tok, train, max_length=24, batch_size=8, lr=3e-3, epochs=4,
                                    seed=0, jit=True)
    assert len(losses) == 24 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    after = evaluate_tokens(run, train, TAGS)
    assert after["n"] == 48 and after["micro_f1"] > max(0.5, before["micro_f1"])
