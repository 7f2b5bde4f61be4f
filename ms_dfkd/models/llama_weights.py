"""Load a Llama- or Qwen2-architecture GGUF file into LlamaForCausalLM.

Files: SmolLM2-135M-Instruct.Q4_1.gguf (``llama``), Qwen2.5-Coder-0.5B/1.5B-Instruct Q4_K_M
(``qwen2``: biases on q/k/v, an untied ``output.weight``, rope base 1e6; see llama.py).

Every tensor is dequantised to float32 with ``gguf.quants.dequantize`` (the gguf package's
numpy dequantisers; tests/test_gguf.py checks each type the shipped files use against a
reference written from ggml's block layouts); the config comes from the ``<arch>.*``
metadata. For ``llama`` the Q and K projections are un-permuted: llama.cpp's converter
reorders their rows for the adjacent-pair ("GPT-J") rotary form, while llama.py uses the
"rotate half" form of the original Hugging Face weights. ``qwen2`` files keep the HF order
(llama.cpp runs them with the rotate-half, "NEOX", rotary form), so nothing is permuted.

Strict and all-or-nothing: the file is read, every tensor dequantised, renamed and
checked against the model (missing / unexpected / shape) before the first parameter
is assigned. An unsupported quantisation type names the tensor and the type.
"""
import numpy as np

from kernels.cpu_ops import GGUF_BLOCK_BYTES  # the types whose blocks the sampler's kernels read

from .checkpoint_io import CheckpointError, check_state
from .gguf_file import GGUFError, read_gguf
from .llama import LlamaConfig, LlamaForCausalLM



# GGUF tensor name (after "blk.N.") -> HF / llama.py name (after "model.layers.N.")
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",      # qwen2
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
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


ARCHITECTURES = ("llama", "qwen2")  # general.architecture values this loader reads


def config_from_gguf(reader, path="<gguf>", compute_dtype="float32"):
    """LlamaConfig from a GGUFFile's ``<arch>.*`` and ``tokenizer.ggml.*`` metadata (arch: llama | qwen2)."""
    arch = reader.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; supported: "
                        + ", ".join(repr(a) for a in ARCHITECTURES))

    def get(key, default=None):
        return reader.get(f"{arch}.{key}", default)

    def need(key):
        v = get(key)
        if v is None:
            raise GGUFError(f"{path}: metadata key {arch}.{key} is missing")
        return v

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != hidden // n_heads:
        raise GGUFError(f"{path}: partial rotary (rope.dimension_count {rope_dim} != head dim "
                        f"{hidden // n_heads}) is not supported")
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise GGUFError(f"{path}: rope scaling {scaling!r} is not supported")
    tokens = reader.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = next(int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight")
    eos = int(reader.get("tokenizer.ggml.eos_token_id", 2))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get("attention.head_count_kv", n_heads)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        qkv_bias=arch == "qwen2",
        compute_dtype=compute_dtype,
        bos_token_id=int(reader.get("tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=eos,
        pad_token_id=int(reader.get("tokenizer.ggml.padding_token_id", eos)),
    )


def _gguf_error(t, path, e):
    import gguf
    qtype = t.tensor_type
    qname = getattr(qtype, "name", str(qtype))
    return GGUFError(f"{path}: tensor {t.name!r} has quantisation type {qname} ({int(qtype)}), "
                     f"which gguf {getattr(gguf, '__version__', '')} cannot dequantise "
                     f"({type(e).__name__}: {e}); nothing was loaded")


def _hf_shape(t):
    return tuple(int(n) for n in reversed(list(t.shape)))  # GGUF lists dims innermost first


def _gguf_dequantize(t, data, path):
    """gguf's dequantiser on (part of) a tensor's data; a type it cannot read is a GGUFError naming it.
    (gguf raises NotImplementedError, KeyError or ValueError for those, depending on the type.)"""
    from gguf.quants import dequantize
    try:
        return dequantize(data, t.tensor_type)
    except (NotImplementedError, KeyError, ValueError) as e:
        raise _gguf_error(t, path, e) from None


def _dequantize(t, path):
    """float32 array of a GGUFTensor in the [out, in] order of llama.py."""
    return np.asarray(_gguf_dequantize(t, t.data, path), dtype=np.float32).reshape(_hf_shape(t))


def _check_dequantisable(t, path):
    """Dequantise the tensor's first row only: an unsupported type fails here, before any work."""
    _gguf_dequantize(t, t.data[:1], path)


def _fix_rows(name, arr, cfg, arch):
    """Undo llama.cpp's Q/K row permutation (llama files only)."""
    if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
        return unpermute_rope_rows(arr, cfg.num_attention_heads)
    if arch == "llama" and name.endswith("self_attn.k_proj.weight"):
        return unpermute_rope_rows(arr, cfg.num_key_value_heads)
    return arr


def read_gguf_state(path, compute_dtype="float32"):
    """(LlamaConfig, {llama.py name: float32 array}), Q/K un-permuted for llama; no model is built."""
    reader = read_gguf(path)
    cfg = config_from_gguf(reader, path, compute_dtype)
    arch = reader.get("general.architecture")
    return cfg, {gguf_name_to_hf(t.name): _fix_rows(gguf_name_to_hf(t.name), _dequantize(t, path), cfg, arch)
                 for t in reader.tensors}


def load_gguf_llama(path, compute_dtype="float32"):
    """Return (LlamaConfig, LlamaForCausalLM) with every weight from the GGUF file (llama or qwen2).

    Raises FileNotFoundError for a missing file, GGUFError (a CheckpointError) for an
    unreadable file, an unsupported architecture or quantisation type, or missing /
    unexpected / mis-shaped tensors. All of these are checked (names and shapes from the
    file's tensor table, each type on one row) before the first parameter is assigned;
    then the tensors are dequantised one at a time into the model, so that the peak memory
    is the float32 model plus one tensor (Qwen2.5-Coder-0.5B: 2.5 GB + 0.5 GB), not twice the model.

    ``model.gguf_blocks`` keeps the file's Q4_1 and Q8_0 matrices as they are ({llama.py name: uint8 Parameter
    [out, in / 32, bytes per block]}, not among the model's parameters, rows in llama.py's order; 96 MB for
    SmolLM2): the sampler's decode steps read the weights that do not train from them
    (models/llama_sampling.py). They stand for the float32 weights only while those keep the file's values:
    nothing in ms-dfkd writes a weight that does not train.
    """
    import mindspore as ms
    reader = read_gguf(path)
    cfg = config_from_gguf(reader, path, compute_dtype)
    arch = reader.get("general.architecture")
    tensors = {gguf_name_to_hf(t.name): t for t in reader.tensors}
    model = LlamaForCausalLM(cfg, init_weights=False)
    shapes = {name: np.broadcast_to(np.float32(0), _hf_shape(t)) for name, t in tensors.items()}  # no memory
    try:
        params = check_state(model, shapes, source=f"GGUF file {path}")
    except CheckpointError as e:
        raise GGUFError(str(e)) from None
    for t in tensors.values():
        _check_dequantisable(t, path)
    blocks = {}
    for name, t in tensors.items():
        params[name].set_data(ms.Tensor(_fix_rows(name, _dequantize(t, path), cfg, arch), dtype=ms.float32))
        size = GGUF_BLOCK_BYTES.get(getattr(t.tensor_type, "name", None))
        if size and len(t.shape) == 2:
            raw = np.array(t.data, np.uint8).reshape(_hf_shape(t)[0], -1, size)
            # rows as the weights'; a Parameter (not the model's: a plain dict) so that the decode steps read it
            # as a graph parameter rather than an input of every step (llama_sampling.KVCacheDecoder.block_set)
            blocks[name] = ms.Parameter(ms.Tensor(np.ascontiguousarray(_fix_rows(name, raw, cfg, arch))),
                                        name=f"gguf_blocks.{name}", requires_grad=False)
    model.gguf_blocks = blocks
    return cfg, model


# the loader reads both families; the old name stays for its callers
load_gguf = load_gguf_llama
