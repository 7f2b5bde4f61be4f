"""BERT encoders in MindSpore: the teacher and student classifiers of ms-dfkd.

Post-LN BERT as in HF transformers' modeling_bert.py. Parameter names (cell
relative) are the HF names, e.g. ``embeddings.word_embeddings.weight`` or
``encoder.layer.0.attention.self.query.weight``, so HF checkpoints load with no
renaming beyond the ``bert.`` prefix of the heads (see bert_weights.py).

Every model takes either ``input_ids`` or ``inputs_embeds``: the soft-embedding
path of DFKD-T3 feeds e_t = y_t . E in place of the word-embedding lookup, and
position/type embeddings plus LayerNorm are still added on top.

Mixed precision: ``compute_dtype`` "float16"/"bfloat16" runs the matmuls in
that dtype (on GPU and Ascend; the CPU kernels compute the linear layers in float32); parameters, the
residual stream, LayerNorm and softmax stay float32.

GELU, LayerNorm and the linear layers come from kernels/ (kernels.encoder_ops): on CPU, C++ kernels
(GELU and LayerNorm several times faster than MindSpore's own CPU ops; the linear layers' backward
without MindSpore's transposes); elsewhere MindSpore's ops. The path is logged.

Given an attention mask, the layers' linear layers compute the real positions only (the CPU kernels skip
padding, about a third of a generated batch) and give 0 at padded positions on every path, so a padded
position's hidden state is not HF's (HF computes it; nothing reads it: padded keys are masked out, the
mean pooling skips them and the pooler reads the first position).
"""
import json
import math
from dataclasses import dataclass, asdict, fields
from pathlib import Path

import mindspore as ms
from mindspore import nn, ops, Parameter
from mindspore.common.initializer import initializer, Normal

from kernels.encoder_ops import gelu, layer_norm, linear  # by name: graph mode cannot see kernels' lazy __getattr__

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


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
    hidden_act: str = "gelu"            # exact erf GELU, as HF "gelu"
    num_labels: int = 2
    add_pooler: bool = True
    pooling: str = "cls_pooler"         # sequence head: "cls_pooler" | "mean"
    compute_dtype: str = "float32"      # "float32" | "float16" | "bfloat16"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float = None    # None: same as hidden_dropout
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in ("gelu", "gelu_new", "relu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} not supported (gelu, gelu_new, relu)")
        if self.pooling not in ("cls_pooler", "mean"):
            raise ValueError(f"pooling must be 'cls_pooler' or 'mean', got {self.pooling!r}")
        if self.pooling == "cls_pooler" and not self.add_pooler:
            raise ValueError("pooling='cls_pooler' needs add_pooler=True (use pooling='mean')")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(_DTYPES)}, got {self.compute_dtype!r}")

    # HF config.json key -> our field, where the names differ
    _HF_RENAME = {"hidden_dropout_prob": "hidden_dropout",
                  "attention_probs_dropout_prob": "attention_dropout"}

    @classmethod
    def from_hf_json(cls, path, **overrides):
        """Read an HF BERT config.json; unknown HF keys are ignored, ``overrides`` win."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"BERT config file not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path} is not valid JSON: {e}") from None
        if "id2label" in raw and "num_labels" not in raw:
            raw["num_labels"] = len(raw["id2label"])
        names = {f.name for f in fields(cls)}
        kw = {cls._HF_RENAME.get(k, k): v for k, v in raw.items()}
        kw = {k: v for k, v in kw.items() if k in names}
        kw.update(overrides)
        return cls(**kw)

    def to_hf_json(self, path):
        """Write config.json that from_hf_json (and HF, for the shared keys) reads back."""
        d = asdict(self)
        d["hidden_dropout_prob"] = d.pop("hidden_dropout")
        d["attention_probs_dropout_prob"] = d.pop("attention_dropout")
        d.update(model_type="bert", architectures=["BertModel"])
        Path(path).write_text(json.dumps(d, indent=2))


# --- building blocks with HF parameter names ------------------------------------------------

class Linear(nn.Cell):
    """y = x W^T + b with W [out, in] as torch stores it; matmul in compute dtype."""

    def __init__(self, n_in, n_out, std, compute_dtype=ms.float32):
        super().__init__()
        self.weight = Parameter(initializer(Normal(std), (n_out, n_in), ms.float32))
        self.bias = Parameter(initializer("zeros", (n_out,), ms.float32))
        self.compute_dtype = compute_dtype

    def construct(self, x, rows=None):
        cdt = self.compute_dtype
        return linear(x.astype(cdt), self.weight.astype(cdt), self.bias.astype(cdt), rows)


class LayerNorm(nn.Cell):
    """LayerNorm over the last axis, always in float32 (returns float32)."""

    def __init__(self, n, eps):
        super().__init__()
        self.weight = Parameter(initializer("ones", (n,), ms.float32))
        self.bias = Parameter(initializer("zeros", (n,), ms.float32))
        self.eps = eps

    def construct(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)


class Embedding(nn.Cell):
    def __init__(self, n, dim, std):
        super().__init__()
        self.weight = Parameter(initializer(Normal(std), (n, dim), ms.float32))

    def construct(self, ids):
        return ops.gather(self.weight, ids, 0)


def _dropout(x, p, training):
    return ops.dropout(x, p=p) if training and p > 0 else x


def _act(x, name):
    if name == "gelu":
        return gelu(x)
    if name == "gelu_new":
        return ops.gelu(x, approximate="tanh")
    return ops.relu(x)


class BertEmbeddings(nn.Cell):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        std = cfg.initializer_range
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, std)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size, std)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, std)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.p = cfg.hidden_dropout
        self.max_pos = cfg.max_position_embeddings

    def construct(self, input_ids=None, token_type_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        seq_len = inputs_embeds.shape[1]
        if seq_len > self.max_pos:
            raise ValueError("sequence longer than max_position_embeddings")
        x = inputs_embeds.astype(ms.float32)
        x = x + ops.broadcast_to(self.position_embeddings.weight[:seq_len], x.shape)
        if token_type_ids is None:
            x = x + ops.broadcast_to(self.token_type_embeddings.weight[0], x.shape)  # all segment 0, as HF
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return _dropout(self.LayerNorm(x), self.p, self.training)


class BertSelfAttention(nn.Cell):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        cdt, std, h = _DTYPES[cfg.compute_dtype], cfg.initializer_range, cfg.hidden_size
        self.query = Linear(h, h, std, cdt)
        self.key = Linear(h, h, std, cdt)
        self.value = Linear(h, h, std, cdt)
        self.n_head = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.p = cfg.attention_dropout
        self.compute_dtype = cdt

    def _heads(self, x):                       # [B, L, H] -> [B, nh, L, dh]
        b, l, _ = x.shape
        return x.reshape(b, l, self.n_head, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x, additive_mask, rows):
        q, k, v = self._heads(self.query(x, rows)), self._heads(self.key(x, rows)), self._heads(self.value(x, rows))
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)).astype(ms.float32) * self.scale
        probs = ops.softmax(scores + additive_mask, axis=-1)          # fp32 softmax
        probs = _dropout(probs, self.p, self.training)
        ctx = ops.matmul(probs.astype(self.compute_dtype), v)                   # [B, nh, L, dh]
        b, _, l, _ = ctx.shape
        return ctx.transpose(0, 2, 1, 3).reshape(b, l, self.n_head * self.head_dim)


class BertSelfOutput(nn.Cell):
    def __init__(self, cfg, n_in):
        super().__init__()
        self.dense = Linear(n_in, cfg.hidden_size, cfg.initializer_range, _DTYPES[cfg.compute_dtype])
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.p = cfg.hidden_dropout

    def construct(self, h, residual, rows):
        h = _dropout(self.dense(h, rows).astype(ms.float32), self.p, self.training)
        return self.LayerNorm(h + residual)                            # post-LN


class BertAttention(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        setattr(self, "self", BertSelfAttention(cfg))     # HF name "attention.self.*"
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def construct(self, x, additive_mask, rows):
        return self.output(getattr(self, "self")(x, additive_mask, rows), x, rows)


class BertIntermediate(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range,
                            _DTYPES[cfg.compute_dtype])
        self.act = cfg.hidden_act

    def construct(self, x, rows):
        return _act(self.dense(x, rows), self.act)


class BertLayer(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)   # same shape of block as HF BertOutput

    def construct(self, x, additive_mask, rows):
        x = self.attention(x, additive_mask, rows)
        return self.output(self.intermediate(x, rows), x, rows)


class BertEncoder(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.CellList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])

    def construct(self, x, additive_mask, rows):
        for layer in self.layer:
            x = layer(x, additive_mask, rows)
        return x


class BertPooler(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, cfg.initializer_range,
                            _DTYPES[cfg.compute_dtype])

    def construct(self, h):
        return ops.tanh(self.dense(h[:, 0]).astype(ms.float32))


def mean_pool(hidden, attention_mask):
    """Mean of hidden [B, L, H] over positions where attention_mask [B, L] is 1."""
    m = attention_mask.astype(ms.float32).expand_dims(-1)
    return (hidden * m).sum(1) / ops.clamp(m.sum(1), min=1e-9)


# --- models -----------------------------------------------------------------------------------

class BertModel(nn.Cell):
    """construct(...) -> (sequence_output [B, L, H] float32, pooled_output [B, H] or None)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if cfg.add_pooler else None

    def get_input_embeddings(self):
        """The word-embedding table, Parameter [V, H]."""
        return self.embeddings.word_embeddings.weight

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        rows = None  # the positions the layers' linear layers compute (the cpu kernels skip the others)
        if attention_mask is None:
            additive_mask = ops.zeros((x.shape[0], 1, 1, x.shape[1]), ms.float32)
        else:
            rows = attention_mask.astype(ms.float32)
            # [B, L] 1 = keep, 0 = pad -> [B, 1, 1, L] added to the scores; the float32 minimum
            # (not -inf) so that a fully padded row gives a uniform softmax, not NaN
            keep = rows.reshape(x.shape[0], 1, 1, x.shape[1])
            additive_mask = (1.0 - keep) * -3.4028234663852886e38
        # broadcast once to the scores' shape [B, heads, L, L], shared by all layers (see LayerNorm)
        b, l = x.shape[0], x.shape[1]
        additive_mask = ops.broadcast_to(additive_mask, (b, self.config.num_attention_heads, l, l))
        h = self.encoder(x, additive_mask, rows)
        pooled = self.pooler(h) if self.pooler is not None else None
        return h, pooled


class BertForSequenceClassification(nn.Cell):
    """Logits [B, num_labels] from the pooler ("cls_pooler") or the masked mean of the
    last hidden states ("mean"). ``return_features=True`` returns (logits, features), the
    pooled vector the classifier reads (DFKD-T3's diversity loss uses it)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, cfg.initializer_range,
                                 _DTYPES[cfg.compute_dtype])
        self.p = cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.use_mean = cfg.pooling == "mean"

    def get_input_embeddings(self):
        return self.bert.get_input_embeddings()

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                  return_features=False):
        h, pooled = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds)
        if self.use_mean:
            if attention_mask is None:
                pooled = h.mean(1)
            else:
                pooled = mean_pool(h, attention_mask)
        logits = self.classifier(_dropout(pooled, self.p, self.training)).astype(ms.float32)
        if return_features:
            return logits, pooled
        return logits


class BertForTokenClassification(nn.Cell):
    """Logits [B, L, num_labels]; no pooler (as HF). ``return_features=True`` also returns the masked mean
    of the last hidden states."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.add_pooler:
            cfg = BertConfig(**{**asdict(cfg), "add_pooler": False, "pooling": "mean"})
        self.config = cfg
        self.bert = BertModel(cfg)
        self.classifier = Linear(cfg.hidden_size, cfg.num_labels, cfg.initializer_range,
                                 _DTYPES[cfg.compute_dtype])
        self.p = cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout

    def get_input_embeddings(self):
        return self.bert.get_input_embeddings()

    def construct(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                  return_features=False):
        h, _ = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds)
        logits = self.classifier(_dropout(h, self.p, self.training)).astype(ms.float32)
        if return_features:  # (logits, the masked mean of the last hidden states [B, H]): DFKD's diversity term
            return logits, (h.mean(1) if attention_mask is None else mean_pool(h, attention_mask))
        return logits
