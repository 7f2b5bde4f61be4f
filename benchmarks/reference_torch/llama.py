"""Llama decoder (SmolLM2) in plain PyTorch, with a KV-cache path for sampling.

Rotary embedding is the *adjacent-pair* form of the RoFormer paper (and of llama.cpp): pair
(2i, 2i+1) of each head turns by position * theta^(-2i/D). That is the layout the GGUF file stores
Q/K in, so the reference reads the file's Q/K rows as they are. ms_dfkd uses the "rotate half"
form on un-permuted weights instead: both are the same attention, reached by different code, which
is what a parity check wants. Weights in Hugging Face layout (ms_dfkd's tiny models) go through
``loading.hf_to_pair_layout`` first.

Parameter names are HF's (``model.layers.0.self_attn.q_proj.weight``), weights [out, in].
Left padding: positions are cumsum(mask) - 1 and padded keys are masked.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_pairs(x, cos, sin):
    """x [B, heads, L, D]; cos, sin [B, 1, L, D/2]: (a, b) -> (a cos - b sin, a sin + b cos) per pair."""
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)

    def forward(self, x, cos, sin, bias, cache=None, slot=None):
        """bias [B, 1, Lq, Lk] additive. With cache=(k, v) [B, n_kv, S, D], this call's key/value is
        written at index ``slot`` (in place) and attention reads the whole cache."""
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, l, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, l, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        if cache is not None:
            cache[0][:, :, slot:slot + l] = k
            cache[1][:, :, slot:slot + l] = v
            k, v = cache
        rep = self.n_heads // self.n_kv              # query head h reads key/value head h // rep
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + bias
        out = scores.softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, l, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, bias, cache=None, slot=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, cache, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids | inputs_embeds, attention_mask) -> logits [B, L, V]; tied LM head."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = Model(cfg)
        d = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def rope(self, positions):
        angles = positions[:, None, :, None].float() * self.inv_freq      # [B, 1, L, D/2]
        return angles.cos(), angles.sin()

    def logits(self, hidden):
        return hidden @ self.model.embed_tokens.weight.T

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, l, _ = x.shape
        if attention_mask is None:
            attention_mask = torch.ones(b, l, dtype=torch.long)
        mask = attention_mask.long()
        cos, sin = self.rope((mask.cumsum(1) - 1).clamp_min(0))
        allowed = torch.ones(l, l, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
        bias = torch.zeros(b, 1, l, l).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        for layer in self.model.layers:
            x = layer(x, cos, sin, bias)
        return self.logits(self.model.norm(x))

    # --- KV cache -----------------------------------------------------------------------------
    def new_cache(self, batch, length):
        c = self.config
        shape = (batch, c.num_key_value_heads, length, c.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(c.num_hidden_layers)]

    def forward_cached(self, input_ids, positions, key_mask, cache, slot):
        """input_ids [B, L] written to cache slots slot..slot+L-1; key_mask [B, S] bool (keys readable
        by every query of this call, before causality inside the call). Returns last-token logits [B, V]."""
        x = self.model.embed_tokens(input_ids)
        b, l, _ = x.shape
        s = key_mask.shape[1]
        cos, sin = self.rope(positions)
        key_pos = torch.arange(s)[None, None, :]
        query_slot = (slot + torch.arange(l))[None, :, None]
        allowed = key_mask[:, None, :] & (key_pos <= query_slot)            # [B, L, S]
        bias = torch.zeros(b, 1, l, s).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        for layer, kv in zip(self.model.layers, cache):
            x = layer(x, cos, sin, bias, kv, slot)
        return self.logits(self.model.norm(x[:, -1]))
