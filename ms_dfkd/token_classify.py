"""Token classification (NER) with an encoder outside the DFKD loop: word-to-sub-token alignment,
fine-tuning a token-tagging teacher, and word-level prediction and evaluation.

Convention (training and prediction alike): a word is represented by its first sub-token. The word's
tag is the label of that position; the word's other sub-tokens, the special tokens ([CLS], [SEP]) and
padding carry the label IGNORE (-100) and add nothing to the loss; a word's prediction is the argmax of
the logits at its first sub-token. A word with no sub-token (cut off by truncation, or a character the
normalizer deletes) gets no loss and is predicted as ``fill`` (tag id 0, O in ner_data.bio_tag_names).
"""
import logging

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from tqdm import tqdm

from . import metrics as M
from .classify import fit, softmax_np

log = logging.getLogger("ms_dfkd")

IGNORE = -100


def first_subtoken_positions(word_ids, n_words):
    """Position of each word's first sub-token in one row of word_ids (-1: special or padding); -1 for a
    word with no sub-token. -> int64 [n_words]."""
    pos = np.full(n_words, -1, np.int64)
    for j, w in enumerate(np.asarray(word_ids).tolist()):
        if 0 <= w < n_words and pos[w] < 0:
            pos[w] = j
    return pos


def first_subtoken_labels(word_ids, word_tags, ignore=IGNORE):
    """Sub-token labels int32 [B, L] from word_ids [B, L] (tokenizer.encode_words_batch) and one list of
    word tag ids per row: the word's tag at its first sub-token, ``ignore`` everywhere else."""
    word_ids = np.asarray(word_ids)
    if len(word_tags) != word_ids.shape[0]:
        raise ValueError(f"{len(word_tags)} tag rows for {word_ids.shape[0]} token rows")
    labels = np.full(word_ids.shape, ignore, np.int32)
    for b, tags in enumerate(word_tags):
        pos = first_subtoken_positions(word_ids[b], len(tags))
        have = pos >= 0
        labels[b, pos[have]] = np.asarray(tags, np.int32)[have]
    return labels


class _TokenCELoss(nn.Cell):
    """Mean cross-entropy over the positions whose label is not negative (IGNORE)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, ids, mask, labels):
        logits = self.model(input_ids=ids, attention_mask=mask)
        valid = labels >= 0
        safe = ops.where(valid, labels, ops.zeros_like(labels))
        logp = ops.log_softmax(logits, -1)
        onehot = ops.one_hot(safe, logits.shape[-1], 1.0, 0.0)
        nll = -(onehot * logp).sum(-1) * valid.astype(ms.float32)
        return nll.sum() / ops.maximum(valid.astype(ms.float32).sum(), 1.0), logits


def train_token_classifier(model, tokenizer, examples, *, max_length, batch_size, lr, epochs, seed,
                           jit=True, desc="train-teacher", should_stop=lambda: False, on_epoch_end=None):
    """Token-level cross-entropy fine-tuning of a token classifier (e.g. BertForTokenClassification).

    examples: [(words, tag_ids)], one tag id per word. Only each word's first sub-token is scored (the
    module's convention: other sub-tokens, special tokens and padding are IGNORE); the loss of a batch is
    the mean over its scored positions. AdamW with linear decay to 1% and dropout off, as
    classify.train_classifier. ``on_epoch_end(epoch)`` (1-based), if given, is called after each epoch with
    the model in eval mode (e.g. to score dev). Returns the list of per-step losses.
    """
    if not examples:
        raise ValueError("no training examples")
    for i, (words, tags) in enumerate(examples):
        if len(words) != len(tags):
            raise ValueError(f"example {i}: {len(words)} words but {len(tags)} tags")

    def batch(idx):
        ids, mask, word_ids = tokenizer.encode_words_batch([examples[i][0] for i in idx], max_length=max_length,
                                                           padding="max_length")
        return ids, mask, first_subtoken_labels(word_ids, [examples[i][1] for i in idx])
    return fit(model, _TokenCELoss(model), len(examples), batch, batch_size=batch_size, lr=lr, epochs=epochs,
               seed=seed, jit=jit, desc=desc, should_stop=should_stop, on_epoch_end=on_epoch_end)


class TokenEncoderRunner:
    """Jitted no-grad forward of a token classifier over fixed [rows, max_length] shapes, read back per
    word (first sub-token). Like classify.EncoderRunner, a short chunk is padded with empty rows only up
    to the next power of two."""

    def __init__(self, model, tokenizer, max_length, batch_size=64, jit=True):
        self.model, self.tok, self.L, self.B = model, tokenizer, max_length, batch_size

        def fwd(ids, mask):
            return ops.stop_gradient(self.model(input_ids=ids, attention_mask=mask))

        self.fwd = ms.jit(fwd) if jit else fwd

    def encode(self, sentences):
        return self.tok.encode_words_batch([list(s) for s in sentences], max_length=self.L,
                                           padding="max_length")

    def _word_rows(self, sentences, progress=None):
        """[(logits [n_words, C] float32, found bool [n_words])], zeros where a word has no sub-token."""
        sentences = [list(s) for s in sentences]
        out = []
        it = range(0, len(sentences), self.B)
        if progress:
            it = tqdm(it, desc=progress, unit="batch", leave=False)
        for i in it:
            chunk = sentences[i:i + self.B]
            n = len(chunk)
            rows = min(self.B, 1 << (n - 1).bit_length())
            ids, mask, word_ids = self.encode(chunk + [[]] * (rows - n))
            lo = self.fwd(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
            for b, words in enumerate(chunk):
                pos = first_subtoken_positions(word_ids[b], len(words))
                found = pos >= 0
                wl = np.zeros((len(words), lo.shape[-1]), np.float32)
                wl[found] = lo[b, pos[found]]
                out.append((wl, found))
        return out

    def word_logits(self, sentences, progress=None):
        """Per sentence, the logits [n_words, C] at each word's first sub-token (zeros for a word with none)."""
        return [wl for wl, _ in self._word_rows(sentences, progress)]

    def word_probs(self, sentences, progress=None):
        return [softmax_np(wl) for wl in self.word_logits(sentences, progress)]

    def predict(self, sentences, fill=0, progress=None):
        """Per sentence, a tag id per word: the argmax at its first sub-token, ``fill`` for a word with none."""
        return [np.where(found, wl.argmax(-1), fill).astype(np.int64).tolist() if len(wl) else []
                for wl, found in self._word_rows(sentences, progress)]


def evaluate_tokens(runner, examples, tag_names, progress=None):
    """Entity-level scores (metrics.entity_f1) of the runner's word predictions on [(words, tag_ids)], plus
    'n' (sentences); tag_names maps tag ids to BIO tags (ner_data.bio_tag_names)."""
    if not examples:
        raise ValueError("evaluation set is empty")
    preds = runner.predict([w for w, _ in examples], progress=progress)
    true = [[tag_names[i] for i in tags] for _, tags in examples]
    res = M.entity_f1(true, [[tag_names[i] for i in p] for p in preds])
    res["n"] = len(examples)
    return res
