"""BERT encoder classifier in plain PyTorch: the teacher and student of the DFKD-T3 reference.

Written from the BERT paper's post-LN block (attention -> add -> LayerNorm, GELU FFN -> add ->
LayerNorm), not from ms_dfkd: the parity test compares the two. Parameter names are the Hugging
Face ones (``embeddings.word_embeddings.weight``, ``encoder.layer.0.attention.self.query.weight``,
``bert.`` prefix on the head model) so that HF safetensors load with ``load_state_dict``.

The soft-embedding path of DFKD-T3 calls ``forward(inputs_embeds=...)``: the word lookup is
skipped, position and segment-0 embeddings and the LayerNorm are still applied.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    pooling: str = "cls_pooler"     # "cls_pooler" (tanh dense on [CLS]) | "mean" (masked mean)

    @classmethod
    def from_hf_json(cls, path, **overrides):
        raw = json.loads(Path(path).read_text())
        keep = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        keep.update(overrides)
        return cls(**keep)


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg.hidden_size
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.n_head = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads

    def forward(self, x, bias):
        b, l, _ = x.shape

        def heads(t):
            return t.view(b, l, self.n_head, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
        ctx = scores.softmax(-1) @ v
        return ctx.transpose(1, 2).reshape(b, l, -1)


class DenseAddNorm(nn.Module):
    """LayerNorm(residual + dense(x)): HF's BertSelfOutput / BertOutput."""

    def __init__(self, n_in, cfg):
        super().__init__()
        self.dense = nn.Linear(n_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.add_module("self", SelfAttention(cfg))   # HF name: attention.self.*
        self.output = DenseAddNorm(cfg.hidden_size, cfg)

    def forward(self, x, bias):
        return self.output(self._modules["self"](x, bias), x)


class Intermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))      # exact erf GELU


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseAddNorm(cfg.intermediate_size, cfg)

    def forward(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, bias):
        for layer in self.layer:
            x = layer(x, bias)
        return x


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        length = inputs_embeds.shape[1]
        x = inputs_embeds + self.position_embeddings.weight[:length] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class Pooler(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class Bert(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg) if cfg.pooling == "cls_pooler" else None


class BertClassifier(nn.Module):
    """forward(...) -> (logits [B, K], features [B, H]); features are what the classifier reads."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = Bert(cfg)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def input_embeddings(self):
        return self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        x = self.bert.embeddings(input_ids, inputs_embeds)
        keep = attention_mask.to(x.dtype)
        # padded keys get the most negative float: a row with no key left stays finite (uniform)
        bias = (1.0 - keep)[:, None, None, :] * torch.finfo(x.dtype).min
        h = self.bert.encoder(x, bias)
        if self.bert.pooler is not None:
            feat = self.bert.pooler(h)
        else:
            w = keep[..., None]
            feat = (h * w).sum(1) / w.sum(1).clamp_min(1e-9)
        return self.classifier(feat), feat


def load_bert_state(model, state):
    """Strict load of {HF name: numpy array} (``bert.`` prefix optional; HF's position_ids buffer
    and, for a mean-pooled model, pooler weights are dropped). A missing ``classifier.*`` is an error:
    give the head too."""
    own = {}
    for name, arr in state.items():
        if name.endswith("position_ids"):
            continue
        if not name.startswith(("bert.", "classifier.")):
            name = "bert." + name
        if name.startswith("bert.pooler.") and model.bert.pooler is None:
            continue
        own[name] = torch.tensor(np.asarray(arr, np.float32))
    model.load_state_dict(own, strict=True)
    return model
