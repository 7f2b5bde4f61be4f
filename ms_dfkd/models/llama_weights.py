"""Load a Llama-architecture GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) into LlamaForCausalLM.

Every tensor is dequantised to float32 with ``gguf.quants.dequantize``; the config comes
from the ``llama.*`` metadata. The Q and K projections are un-permuted: llama.cpp's
converter reorders their rows for the adjacent-pair ("GPT-J") rotary form, while
llama.py uses the "rotate half" form of the original Hugging Face weights.

Strict and all-or-nothing: the file is read, every tensor dequantised, renamed and
checked against the model (missing / unexpected / shape) before the first parameter
is assigned. An unsupported quantisation type names the tensor and the type.
"""
import numpy as np

from .checkpoint_io import CheckpointError, check_state, load_state
from .gguf_file import GGUFError, read_gguf
from .llama import LlamaConfig, LlamaForCausalLM


# GGUF tensor name (after "blk.N.") -> HF / llama.py name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_name_to_hf(name):
    """Map a GGUF tensor name to the llama.py parameter name; unknown names pass through
    unchanged so that the strict check reports them as unexpected."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    return name


def unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's Q/K row permutation ([out, in] weight, heads of size out // n_heads).

    llama.cpp stores each head's rows as (pair i: rows 2i, 2i+1) for the adjacent-pair
    rotary form; HF stores (first half, second half). Inverse of
    reshape(n, 2, d/2, in).swapaxes(1, 2).
    """
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(reader, path="<gguf>", compute_dtype="float32"):
    """LlamaConfig from a GGUFFile's ``llama.*`` and ``tokenizer.ggml.*`` metadata."""
    arch = reader.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{path}: general.architecture is {arch!r}; only 'llama' is supported")

    def need(key):
        v = reader.get(f"llama.{key}")
        if v is None:
            raise GGUFError(f"{path}: metadata key llama.{key} is missing")
        return v

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    rope_dim = reader.get("llama.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != hidden // n_heads:
        raise GGUFError(f"{path}: partial rotary (rope.dimension_count {rope_dim} != head dim "
                        f"{hidden // n_heads}) is not supported")
    scaling = reader.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported")
    tokens = reader.get("tokenizer.ggml.tokens")
    vocab = reader.get("llama.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight")
    eos = int(reader.get("tokenizer.ggml.eos_token_id", 2))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(reader.get("llama.attention.head_count_kv", n_heads)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(reader.get("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(reader.get("llama.context_length", 2048)),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        compute_dtype=compute_dtype,
        bos_token_id=int(reader.get("tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=eos,
        pad_token_id=int(reader.get("tokenizer.ggml.padding_token_id", eos)),
    )


def _dequantize(t, path):
    import gguf
    from gguf.quants import dequantize
    try:
        arr = dequantize(t.data, t.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as e:
        qtype = t.tensor_type
        qname = getattr(qtype, "name", str(qtype))
        raise GGUFError(f"{path}: tensor {t.name!r} has quantisation type {qname} ({int(qtype)}), "
                        f"which gguf {getattr(gguf, '__version__', '')} cannot dequantise "
                        f"({type(e).__name__}: {e}); nothing was loaded") from None
    expected = tuple(int(n) for n in reversed(list(t.shape)))  # GGUF lists dims innermost first
    return np.asarray(arr, dtype=np.float32).reshape(expected)


def read_gguf_state(path, compute_dtype="float32"):
    """(LlamaConfig, {llama.py name: float32 array}) with Q/K un-permuted; no model is built."""
    reader = read_gguf(path)
    cfg = config_from_gguf(reader, path, compute_dtype)
    state = {}
    for t in reader.tensors:
        name = gguf_name_to_hf(t.name)
        arr = _dequantize(t, path)
        if name.endswith("self_attn.q_proj.weight"):
            arr = unpermute_rope_rows(arr, cfg.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            arr = unpermute_rope_rows(arr, cfg.num_key_value_heads)
        state[name] = arr
    return cfg, state


def load_gguf_llama(path, compute_dtype="float32"):
    """Return (LlamaConfig, LlamaForCausalLM) with every weight from the GGUF file.

    Raises FileNotFoundError for a missing file, GGUFError (a CheckpointError) for an
    unreadable file, a non-llama architecture, an unsupported quantisation type, or
    missing / unexpected / mis-shaped tensors. The model is returned only when complete.
    """
    cfg, state = read_gguf_state(path, compute_dtype)
    model = LlamaForCausalLM(cfg, init_weights=False)
    try:
        check_state(model, state, source=f"GGUF file {path}")
    except CheckpointError as e:
        raise GGUFError(str(e)) from None
    load_state(model, state, source=f"GGUF file {path}")
    return cfg, model
