"""Encoder classifiers outside the DFKD loop: batched prediction with fixed shapes,
evaluation, and fine-tuning a teacher on labelled data (``ms-dfkd train-teacher``)."""
import logging
import time

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from tqdm import tqdm

from kernels.adamw import adam_weight_decay

from . import metrics as M

log = logging.getLogger("ms_dfkd")


def softmax_np(z, axis=-1):
    z = z - z.max(axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis, keepdims=True)


class EncoderRunner:
    """Jitted no-grad forward of a sequence classifier over fixed [batch, max_length] shapes.

    Texts go through in chunks of ``batch_size``; a shorter chunk (the 8 texts of a generator batch,
    the tail of an evaluation) is padded with empty rows only up to the next power of two, so graph
    mode compiles a handful of shapes and labelling 8 texts does not run 64 rows."""

    def __init__(self, model, tokenizer, max_length, batch_size=64, jit=True):
        self.model, self.tok, self.L, self.B = model, tokenizer, max_length, batch_size

        def fwd(ids, mask):
            logits, feat = self.model(input_ids=ids, attention_mask=mask, return_features=True)
            return ops.stop_gradient(logits), ops.stop_gradient(feat)

        self.fwd = ms.jit(fwd) if jit else fwd

    def encode(self, texts):
        return self.tok.encode_batch(list(texts), max_length=self.L, padding="bucket")

    def logits(self, texts, with_features=False, progress=None):
        texts = list(texts)
        outs, feats = [], []
        it = range(0, len(texts), self.B)
        if progress:
            it = tqdm(it, desc=progress, unit="batch", leave=False)
        for i in it:
            chunk = texts[i:i + self.B]
            n = len(chunk)
            rows = min(self.B, 1 << (n - 1).bit_length())
            ids, mask = self.encode(chunk + [""] * (rows - n))
            lo, fe = self.fwd(ms.Tensor(ids), ms.Tensor(mask))
            outs.append(lo.asnumpy()[:n])
            if with_features:
                feats.append(fe.asnumpy()[:n])
        lo = np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
        if with_features:
            return lo, (np.concatenate(feats) if feats else None)
        return lo

    def probs(self, texts, progress=None):
        return softmax_np(self.logits(texts, progress=progress))


def evaluate(runner, examples, metric="accuracy", progress=None):
    """{metric: value, 'n': count} on [(text, label)]."""
    if not examples:
        raise ValueError("evaluation set is empty")
    texts = [t for t, _ in examples]
    labels = np.array([l for _, l in examples])
    preds = runner.logits(texts, progress=progress).argmax(-1)
    return {metric: float(M.compute_metric(metric, preds, labels)), "n": len(examples)}


class _CELoss(nn.Cell):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, ids, mask, labels):
        logits = self.model(input_ids=ids, attention_mask=mask)
        logp = ops.log_softmax(logits, -1)
        onehot = ops.one_hot(labels, logits.shape[-1], 1.0, 0.0)
        return -(onehot * logp).sum(-1).mean(), logits


def train_classifier(model, tokenizer, examples, *, max_length, batch_size, lr, epochs, seed,
                     jit=True, desc="train-teacher", should_stop=lambda: False, on_epoch_end=None):
    """Plain cross-entropy fine-tuning (AdamW, linear decay). Returns a list of per-step losses.
    ``on_epoch_end(epoch)`` (1-based) runs after each epoch, as in ``fit``."""
    if not examples:
        raise ValueError("no training examples")

    def batch(idx):
        ids, mask = tokenizer.encode_batch([examples[i][0] for i in idx], max_length=max_length,
                                           padding="bucket")
        return ids, mask, np.array([examples[i][1] for i in idx], np.int32)
    return fit(model, _CELoss(model), len(examples), batch, batch_size=batch_size, lr=lr, epochs=epochs,
               seed=seed, jit=jit, desc=desc, should_stop=should_stop, on_epoch_end=on_epoch_end)


def fit(model, loss_cell, n_examples, batch, *, batch_size, lr, epochs, seed, jit=True, desc="train",
        should_stop=lambda: False, on_epoch_end=None):
    """The fine-tuning loop of every classifier: AdamW with linear decay to 1%, dropout off, shuffled
    batches of ``batch(indices) -> (ids, mask, labels)`` scored by ``loss_cell(ids, mask, labels) -> (loss,
    logits)``. ``on_epoch_end(epoch)`` (1-based) runs after each epoch. Returns the per-step losses."""
    from .steps import make_train_step
    rng = np.random.default_rng(seed)
    steps_per_epoch = max(1, n_examples // batch_size)
    total = steps_per_epoch * epochs
    lr_sched = [float(lr * (1.0 - 0.99 * i / total)) for i in range(total)]  # linear decay to 1%
    for p in model.get_parameters():
        p.requires_grad = True
    model.set_train(False)  # dropout off: MiniLM fine-tunes fine without it, and steps stay reproducible
    opt = adam_weight_decay(model.trainable_params(), learning_rate=lr_sched, weight_decay=0.01)
    step = make_train_step(loss_cell, opt, jit=jit)
    losses, t0, seen = [], time.time(), 0
    bar = tqdm(total=total, desc=desc, unit="step")
    for ep in range(epochs):
        order = rng.permutation(n_examples)
        for s in range(steps_per_epoch):
            if should_stop():
                bar.close()
                return losses
            idx = order[s * batch_size:(s + 1) * batch_size]
            ids, mask, labels = batch(idx)
            loss, _ = step(ms.Tensor(ids), ms.Tensor(mask), ms.Tensor(labels))
            losses.append(float(loss.asnumpy()))
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", ex_s=f"{seen / (time.time() - t0):.0f}")
        if on_epoch_end is not None:
            on_epoch_end(ep + 1)
    bar.close()
    return losses
