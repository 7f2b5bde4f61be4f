"""Weights for the reference models: GGUF (SmolLM2), HF safetensors (MiniLM-L6), numpy state dicts.

The GGUF reader is the reference's own (``gguf`` package, dequantised to float32). Q/K rows stay as
the file stores them, in the adjacent-pair rotary layout that ``llama.py`` expects; weights in Hugging
Face layout (e.g. exported from ms_dfkd's tiny models) are moved into it by ``hf_to_pair_layout``,
the permutation llama.cpp's converter applies.
"""
from pathlib import Path

import numpy as np
import torch

from .bert import BertClassifier, BertConfig, load_bert_state
from .llama import LlamaConfig, LlamaForCausalLM

_GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def read_gguf_llama(path):
    """(LlamaConfig, {HF name: float32 array}) from a llama GGUF; Q/K in adjacent-pair layout."""
    import gguf
    from gguf.quants import dequantize
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = gguf.GGUFReader(str(path))

    def meta(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            if default is None:
                raise KeyError(f"{path}: GGUF metadata key {key} is missing")
            return default
        return f.contents()

    if meta("general.architecture") != "llama":
        raise ValueError(f"{path}: not a llama GGUF ({meta('general.architecture')!r})")
    state = {}
    for t in reader.tensors:
        arr = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        arr = arr.reshape([int(n) for n in reversed(list(t.shape))])   # GGUF lists dims innermost first
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = arr
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = arr
        elif t.name.startswith("blk."):
            _, layer, kind, _ = t.name.split(".")
            state[f"model.layers.{layer}.{_GGUF_BLOCK[kind]}.weight"] = arr
        else:
            raise ValueError(f"{path}: tensor {t.name} is not handled (untied output head?)")
    cfg = LlamaConfig(
        vocab_size=state["model.embed_tokens.weight"].shape[0],
        hidden_size=int(meta("llama.embedding_length")),
        intermediate_size=int(meta("llama.feed_forward_length")),
        num_hidden_layers=int(meta("llama.block_count")),
        num_attention_heads=int(meta("llama.attention.head_count")),
        num_key_value_heads=int(meta("llama.attention.head_count_kv")),
        rms_norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("llama.rope.freq_base", 10000.0)))
    return cfg, state


def pair_permutation(n_heads, head_dim):
    """Row order that takes HF's (first half, second half) per head to adjacent pairs: new row
    2i + s of a head is old row s * D/2 + i."""
    i = np.arange(head_dim // 2)
    per_head = np.stack([i, i + head_dim // 2], 1).reshape(-1)
    return (np.arange(n_heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


def hf_to_pair_layout(state, cfg):
    """HF-layout Llama state -> the reference's layout (Q/K rows permuted, everything else as is)."""
    out = dict(state)
    q_rows = pair_permutation(cfg.num_attention_heads, cfg.head_dim)
    k_rows = pair_permutation(cfg.num_key_value_heads, cfg.head_dim)
    for name in state:
        if name.endswith("self_attn.q_proj.weight"):
            out[name] = state[name][q_rows]
        elif name.endswith("self_attn.k_proj.weight"):
            out[name] = state[name][k_rows]
    return out


def pair_layout_to_hf(name, arr, cfg):
    """Inverse of hf_to_pair_layout for one tensor (e.g. a gradient, to compare with HF layout)."""
    if name.endswith("self_attn.q_proj.weight"):
        rows = pair_permutation(cfg.num_attention_heads, cfg.head_dim)
    elif name.endswith("self_attn.k_proj.weight"):
        rows = pair_permutation(cfg.num_key_value_heads, cfg.head_dim)
    else:
        return arr
    out = np.empty_like(arr)
    out[rows] = arr
    return out


def build_llama(cfg, state):
    """LlamaForCausalLM with every weight from ``state`` (reference layout); strict."""
    model = LlamaForCausalLM(cfg)
    model.load_state_dict({k: torch.tensor(np.asarray(v, np.float32)) for k, v in state.items()}, strict=True)
    return model


def build_bert(cfg: BertConfig, state):
    return load_bert_state(BertClassifier(cfg), state)


def read_hf_bert(model_dir):
    """(BertConfig, {HF name: array}) from a folder with config.json + model.safetensors."""
    from safetensors.numpy import load_file
    model_dir = Path(model_dir)
    return BertConfig.from_hf_json(model_dir / "config.json"), load_file(str(model_dir / "model.safetensors"))


def bridge_table(bridge_csr, embedding):
    """E_hat = B @ E with B a scipy CSR [V_G, V_T] and E a torch [V_T, H] table -> [V_G, H]."""
    coo = bridge_csr.tocoo()
    b = torch.sparse_coo_tensor(np.stack([coo.row, coo.col]).astype(np.int64), coo.data.astype(np.float32),
                                coo.shape, check_invariants=True)
    return torch.sparse.mm(b, embedding)
