"""mindformers' Llama as the DFKD-T3 generator (``generator.arch: mindformers_llama | mindformers_tiny``).

An optional backend for users who run their Llama-family models through mindformers on Ascend
(flash attention, fused RMSNorm). The network is ``mindformers.LlamaForCausalLM``: its token
embedding, decoder layers, final RMSNorm and LM head do every computation. This module only
drives them behind the interface of ms-dfkd's own ``llama.LlamaForCausalLM``, which the driver,
``steps.GeneratorLoss`` and ``llama_sampling.sample`` use:

- ``hidden_states(input_ids=..., inputs_embeds=..., attention_mask=...)``, ``logits_from_hidden``,
  ``construct`` (logits), ``get_input_embeddings``, ``lm_head_weight``, ``trunk_states`` /
  ``top_hidden_states`` (the frozen bottom layers run once a step with ``trainable: top_k``);
- ``config``: ms-dfkd's ``LlamaConfig`` (``compute_dtype``, ``num_hidden_layers``, ``vocab_size``,
  ``pad_token_id``, ...); mindformers' own config is ``mf_config``;
- ``model.prefill`` / ``model.decode_step`` for the sampler (see "Sampling" below);
- ``set_trainable`` here, with llama.set_trainable's modes and meaning.

Why not mindformers' own ``construct``: it derives the attention mask from ``pad_token_id``
(SmolLM2's pad is ``<|im_end|>``, which also occurs inside every chat prompt) and the positions
from the absolute index. Here, as in llama.py, the mask comes from ``attention_mask`` and the
rotary positions from its cumulative sum (position = cumsum(mask) - 1), so a left-padded row has
the logits of the unpadded row at its real positions, and any sequence length works (no padding
to mindformers' ``seq_length``: the decoder layers take their length from the input).

Flags by device target (``mindformers_flags``): on CPU and GPU ``use_flash_attention=False``,
``fused_rms_norm=False`` (their kernels are Ascend-only); on Ascend fused RMSNorm, and flash
attention when the compute dtype is float16 or bfloat16 (FlashAttentionScore takes no float32).
``use_rope_slice=True`` everywhere (the swap-matrix form fails to broadcast on CPU). The Ascend
settings are not tested: this project has no Ascend machine.

Sampling: mindformers' KV cache (``use_past``: ApplyRotaryPosEmb, ReshapeAndCache, paged
attention) has no CPU kernels, so ``prefill`` / ``decode_step`` re-run the whole sequence:
the "cache" is the token buffer [B, S]; each step writes its token into the buffer and runs one
full forward over S slots, reading the hidden state of the written slot. Causal masking makes
this the same computation as a KV cache, at S times the cost per step (a batch of the offline
default samples 5.7x slower than llama.py's; the generator step itself is no slower). CPU memory is
about twice llama.py's: mindformers' RMSNorm and rotary embedding multiply with broadcasting, which
keeps index tables per compiled graph on MindSpore's CPU backend (docs/BENCHMARKS.md).

Parameter names are mindformers' (``model.tok_embeddings.embedding_weight``,
``model.layers.N.attention.wq.weight``, ``model.layers.N.feed_forward.w1.weight``, ...), except
the final norm, ``model.norm.weight`` (mindformers: ``model.norm_out.weight``), so that
``llama.set_trainable``'s ``top_k`` and ``all`` pick the same parameters here as on llama.py. The
driver calls llama.set_trainable, so build refuses ``generator.trainable head_norms`` for this
backend (its ``*layernorm.weight`` names do not exist here); ``set_trainable`` below maps every mode.
``hf_to_mindformers_name`` maps llama.py's (Hugging Face) names; weights come from the GGUF file
through ``llama_weights.read_gguf_state``.

Importing mindformers: ``import_mindformers`` points its log and output folders
(``LOG_MF_PATH``, ``LOCAL_DEFAULT_PATH``) at a temporary folder unless they are set, before the
import (it would write ``./output/log/`` into the working directory), and keeps its console
logging out of ms-dfkd's output (everything stays in the log files). Without the extra the error
is one line naming the setup flag.
"""
import contextlib
import getpass
import io
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .llama import TRAIN_MODES

log = logging.getLogger("ms_dfkd")

SETUP_HINT = "MS_DFKD_MINDFORMERS=1 bash scripts/setup.sh"
_MASK_VALUE = -10000.0          # additive mask: finite in float16, exp() of it is 0 in float32


class MindformersNotInstalled(ValueError, ImportError):
    """The optional mindformers extra is missing or broken. A ValueError too, so the CLI prints one line."""


def mindformers_log_dir():
    """Where mindformers writes its logs: $LOG_MF_PATH if set, else <tmp>/ms_dfkd_mindformers_<user>/log."""
    if os.environ.get("LOG_MF_PATH"):
        return Path(os.environ["LOG_MF_PATH"])
    return _output_root() / "log"


def _output_root():
    if os.environ.get("LOCAL_DEFAULT_PATH"):
        return Path(os.environ["LOCAL_DEFAULT_PATH"])
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"ms_dfkd_mindformers_{user}"


def import_mindformers():
    """Import mindformers with its output folders outside the working directory and a quiet console.

    Returns the module. Raises MindformersNotInstalled (one line naming the setup flag) when the
    extra is not installed or does not import."""
    if "mindformers" in sys.modules and hasattr(sys.modules["mindformers"], "LlamaForCausalLM"):
        return sys.modules["mindformers"]
    root = _output_root()
    os.environ.setdefault("LOCAL_DEFAULT_PATH", str(root))
    os.environ.setdefault("LOG_MF_PATH", str(root / "log"))
    buf = io.StringIO()
    try:
        # mindformers' logger prints INFO to the sys.stdout of the moment it is created (during the
        # import: warnings about models this backend does not use); its files keep everything
        with contextlib.redirect_stdout(buf), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mindformers
            from mindformers.tools.logger import get_logger
            mf_logger = get_logger()
    except ImportError as e:
        if (e.name or "").split(".")[0] == "mindformers":
            raise MindformersNotInstalled(
                f"generator.arch mindformers_*: the optional mindformers extra is not installed; "
                f"run {SETUP_HINT}") from None
        raise MindformersNotInstalled(
            f"generator.arch mindformers_*: mindformers does not import ({type(e).__name__}: {e}); "
            f"reinstall the extra with {SETUP_HINT}") from None
    for h in list(mf_logger.handlers):
        if getattr(h, "stream", None) is buf:
            mf_logger.removeHandler(h)
    log.info(f"mindformers {getattr(mindformers, '__version__', '?')} imported; its logs: {mindformers_log_dir()}")
    return mindformers


def mindformers_available():
    try:
        import_mindformers()
        return True
    except MindformersNotInstalled:
        return False


def mindformers_flags(device_target=None, compute_dtype="float32"):
    """The mindformers switches that run on this device (see the module docstring)."""
    target = device_target or ms.get_context("device_target")
    if target == "Ascend":
        return dict(use_flash_attention=compute_dtype in ("float16", "bfloat16"), fused_rms_norm=True,
                    use_rope_slice=True)
    return dict(use_flash_attention=False, fused_rms_norm=False, use_rope_slice=True)


# llama.py (Hugging Face) name -> this module's name; within "model.layers.N."
_LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.q_proj.bias": "attention.wq.bias",
    "self_attn.k_proj.bias": "attention.wk.bias",
    "self_attn.v_proj.bias": "attention.wv.bias",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_NAMES_BACK = {v: k for k, v in _LAYER_NAMES.items()}
_TOP_NAMES_BACK = {v: k for k, v in _TOP_NAMES.items()}


def _split_layer(name):
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return parts[2], parts[3]
    return None, None


def hf_to_mindformers_name(name):
    """llama.py parameter name -> this module's; unknown names pass through (a strict load reports them)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    i, rest = _split_layer(name)
    if rest in _LAYER_NAMES:
        return f"model.layers.{i}.{_LAYER_NAMES[rest]}"
    return name


def mindformers_to_hf_name(name):
    """Inverse of hf_to_mindformers_name."""
    if name in _TOP_NAMES_BACK:
        return _TOP_NAMES_BACK[name]
    i, rest = _split_layer(name)
    if rest in _LAYER_NAMES_BACK:
        return f"model.layers.{i}.{_LAYER_NAMES_BACK[rest]}"
    return name


def mindformers_config(cfg, flags):
    """mindformers.LlamaConfig for an ms-dfkd LlamaConfig: float32 parameters, norms, softmax and rotary;
    the matmuls in cfg.compute_dtype."""
    mf = import_mindformers()
    return mf.LlamaConfig(
        batch_size=1, seq_length=min(2048, cfg.max_position_embeddings),
        max_position_embedding=cfg.max_position_embeddings,
        hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps, theta=cfg.rope_theta, qkv_has_bias=cfg.qkv_bias,
        tie_word_embeddings=cfg.tie_word_embeddings, init_method_std=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        compute_dtype=cfg.compute_dtype, param_init_type="float32", embedding_init_type="float32",
        layernorm_compute_type="float32", softmax_compute_type="float32", rotary_dtype="float32",
        use_past=False, **flags)


class MindformersLlamaModel(nn.Cell):
    """mindformers' embedding, decoder layers and final norm, driven with an explicit attention mask.

    ``construct(inputs_embeds, attention_mask)`` -> normed hidden states [B, L, H] (compute dtype);
    ``prefill`` / ``decode_step`` serve llama_sampling.sample by re-running the sequence."""

    def __init__(self, mf_model, compute_dtype, use_flash_attention):
        super().__init__()
        self.tok_embeddings = mf_model.tok_embeddings
        self.layers = mf_model.layers
        self.norm = mf_model.norm_out
        fm = mf_model.freqs_mgr
        self.freqs_cos, self.freqs_sin, self.swap_mask = fm.freqs_cos, fm.freqs_sin, fm.swap_mask  # constants
        self.compute_dtype = compute_dtype
        self.use_flash_attention = use_flash_attention
        self.n_heads = mf_model.n_head

    def embed(self, input_ids):
        return ops.cast(self.tok_embeddings(input_ids.astype(ms.int32)), self.compute_dtype)

    def rope_and_mask(self, attention_mask):
        """Rotary tables at positions cumsum(mask) - 1 ([B, 1, L, D] each) and the causal + padding mask:
        additive [B, 1, L, L] (0 / -1e4) for mindformers' plain attention, uint8 (1 = masked) for its
        flash attention."""
        mask = attention_mask.astype(ms.int32)
        positions = ops.relu(ops.cumsum(mask, 1) - 1)
        b, l = mask.shape
        cos = ops.gather(self.freqs_cos, positions, 0).reshape(b, 1, l, -1)
        sin = ops.gather(self.freqs_sin, positions, 0).reshape(b, 1, l, -1)
        causal = ops.tril(ops.ones((l, l), ms.int32)).expand_dims(0)
        allowed = (causal * mask.expand_dims(1)).expand_dims(1)           # [B, 1, L, L]
        if self.use_flash_attention:
            att = (1 - allowed).astype(ms.uint8)
        else:
            # broadcast to the scores' shape here, once for all layers: a broadcasting add in every layer
            # keeps index tables of about 4x the scores on MindSpore's CPU backend (see llama.RMSNorm)
            att = ((1 - allowed).astype(ms.float32) * _MASK_VALUE).astype(self.compute_dtype)
            att = ops.broadcast_to(att, (b, self.n_heads, l, l))
        return (cos, sin, self.swap_mask), att

    def construct(self, inputs_embeds, attention_mask, start=0, stop=None, final_norm=True):
        """Layers [start, stop) over inputs_embeds (the states entering layer ``start``), then the final
        norm unless final_norm=False: llama.LlamaModel's contract, for trunk_states / top_hidden_states."""
        freqs, att = self.rope_and_mask(attention_mask)
        x = ops.cast(inputs_embeds, self.compute_dtype)
        stop = len(self.layers) if stop is None else stop
        for i, layer in enumerate(self.layers):
            if start <= i < stop:  # python ints: resolved while the graph compiles
                x = layer(x, freqs, att)
        return self.norm(x) if final_norm else x

    def prefill(self, input_ids, attention_mask, cache_len):
        """Forward over a left-padded prompt [B, P]; returns (hidden [B, P, H], (token buffer [B, cache_len],))."""
        hidden = self.construct(self.embed(input_ids), attention_mask)
        b, p = input_ids.shape
        buf = ops.concat((input_ids.astype(ms.int32), ops.zeros((b, cache_len - p), ms.int32)), 1)
        return hidden, (buf,)

    def decode_step(self, input_ids, positions, key_mask, write_slot, caches):
        """One token per row into slot ``write_slot`` of the buffer, then a full forward over the buffer
        with ``key_mask``; returns (hidden of that slot [B, 1, H], (buffer,)). ``positions`` is implied by
        key_mask (its cumulative sum) and not read."""
        buf = caches[0]
        slot = write_slot.reshape(1, -1)
        buf = ops.where(slot, ops.broadcast_to(input_ids.astype(ms.int32), buf.shape), buf)
        hidden = self.construct(self.embed(buf), key_mask)
        index = ops.argmax(write_slot.astype(ms.int32), 0).reshape(1)
        return ops.gather(hidden, index, 1), (buf,)


class MindformersLlamaForCausalLM(nn.Cell):
    """mindformers' LlamaForCausalLM behind llama.LlamaForCausalLM's interface (see the module docstring).

    ``config`` is an ms-dfkd LlamaConfig; its ``compute_dtype`` is fixed at build time (the
    mindformers cells read it then). ``state`` ({llama.py name: float32 array}) fills every
    parameter, strictly; without it the weights are mindformers' random init.
    """

    def __init__(self, config, state=None, device_target=None):
        super().__init__()
        mf = import_mindformers()
        if config.compute_dtype == "bfloat16" and (device_target or ms.get_context("device_target")) == "CPU":
            raise ValueError("mindformers_llama: bfloat16 needs Ascend or a GPU (no CPU MatMul kernel)")
        self.config = config
        self.flags = mindformers_flags(device_target, config.compute_dtype)
        self.mf_config = mindformers_config(config, self.flags)
        with contextlib.redirect_stdout(io.StringIO()):
            net = mf.LlamaForCausalLM(self.mf_config)
        self.compute_dtype = {"float32": ms.float32, "float16": ms.float16,
                              "bfloat16": ms.bfloat16}[config.compute_dtype]
        self.tie_word_embeddings = config.tie_word_embeddings
        self.model = MindformersLlamaModel(net.model, self.compute_dtype, self.flags["use_flash_attention"])
        self.lm_head = net.lm_head  # when tied, its weight IS the embedding table (listed once, as the table)
        self.update_parameters_name()  # Parameter.name = the structural name (optimizer states use it)
        if state is not None:
            self.load_hf_state(state)

    def load_hf_state(self, state, source="state"):
        """Assign {llama.py name: array}: names mapped, every parameter checked before the first is set."""
        from .checkpoint_io import load_state
        load_state(self, {hf_to_mindformers_name(k): v for k, v in state.items()}, source=source)
        return self

    def get_input_embeddings(self):
        return self.model.tok_embeddings.embedding_weight

    def lm_head_weight(self):
        """[V, H] output projection (the embedding table when tied)."""
        if self.tie_word_embeddings:
            return self.model.tok_embeddings.embedding_weight
        return self.lm_head.weight

    def logits_from_hidden(self, hidden):
        return ops.cast(self.lm_head(hidden), ms.float32)

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        """Last normed hidden states [B, L, H] (compute dtype)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.model.embed(input_ids)
        if attention_mask is None:
            attention_mask = ops.ones(inputs_embeds.shape[:2], ms.int32)
        return self.model(inputs_embeds, attention_mask)

    def trunk_states(self, input_ids, attention_mask, n_top):
        """The states entering the top ``n_top`` layers [B, L, H] (as llama.LlamaForCausalLM.trunk_states:
        the driver runs the frozen bottom layers once a step for the trained and the frozen model)."""
        stop = self.config.num_hidden_layers - n_top
        return self.model(self.model.embed(input_ids), attention_mask, 0, stop, False)

    def top_hidden_states(self, trunk, attention_mask, n_top, rows=None):
        """The top ``n_top`` layers and the final norm over ``trunk_states``: normed hidden [B, L, H]; with
        rows = (start, n) positions start .. start + n - 1 of it (mindformers' layers compute them all)."""
        hidden = self.model(trunk, attention_mask, self.config.num_hidden_layers - n_top)
        return hidden if rows is None else hidden[:, rows[0]:rows[0] + rows[1]]

    def construct(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        return self.logits_from_hidden(self.hidden_states(input_ids, inputs_embeds, attention_mask))


def set_trainable(model, mode="all", k=None):
    """llama.set_trainable for either model class: the same modes, the same parameters (by llama.py name)."""
    if not isinstance(model, MindformersLlamaForCausalLM):
        from .llama import set_trainable as llama_set_trainable
        return llama_set_trainable(model, mode, k)
    if mode not in TRAIN_MODES:
        raise ValueError(f"unknown trainable mode {mode!r}; choose one of {TRAIN_MODES}")
    n_layers = model.config.num_hidden_layers
    if mode == "top_k" and (k is None or not 1 <= k <= n_layers):
        raise ValueError(f"mode 'top_k' needs 1 <= k <= {n_layers}, got k={k!r}")
    top = {f"model.layers.{i}." for i in range(n_layers - (k or 0), n_layers)} if mode == "top_k" else set()
    head = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    for name, p in model.parameters_and_names():
        hf = mindformers_to_hf_name(name)
        is_norm = hf.endswith("layernorm.weight") or hf == "model.norm.weight"
        p.requires_grad = {"all": True, "none": False,
                           "top_k": hf == "model.norm.weight" or any(hf.startswith(t) for t in top),
                           "head_norms": hf == head or is_norm, "norms": is_norm}[mode]
    return model.trainable_params()


def load_gguf_mindformers(path, compute_dtype="float32", device_target=None):
    """(LlamaConfig, MindformersLlamaForCausalLM) with every weight from a llama (or qwen2) GGUF file."""
    from .llama_weights import read_gguf_state
    cfg, state = read_gguf_state(path, compute_dtype)
    model = MindformersLlamaForCausalLM(cfg, device_target=device_target)
    model.load_hf_state(state, source=f"GGUF file {path}")
    return cfg, model


def from_llama(llama_model, compute_dtype=None, device_target=None):
    """A MindformersLlamaForCausalLM with the weights and config of an ms-dfkd llama.LlamaForCausalLM
    (its compute dtype unless ``compute_dtype`` is given)."""
    from .checkpoint_io import state_of
    cfg = replace(llama_model.config, compute_dtype=compute_dtype or llama_model.config.compute_dtype)
    return MindformersLlamaForCausalLM(cfg, state=state_of(llama_model), device_target=device_target)


def state_of_hf(model):
    """{llama.py name: array} of a MindformersLlamaForCausalLM (the inverse of load_hf_state)."""
    return {mindformers_to_hf_name(n): p.asnumpy() for n, p in model.parameters_and_names()}


def _pins(path):
    import re
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, ver = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = ver.strip()
    return pins


def check_extra(lock, base_lock):
    """What setup.sh runs after installing the extra: every pin of ``lock`` installed at its version,
    mindspore and numpy still at ``base_lock``'s, no unmet requirement (``pip check``) of a package of
    the extra other than mindformers' own (it declares mindspore~=2.11 and packages its Llama does not
    import), and mindformers imports with LlamaForCausalLM. Returns a list of problems (empty: good)."""
    import subprocess
    from importlib import metadata
    problems = []
    pins, base = _pins(lock), _pins(base_lock)
    for name in ("mindspore", "numpy"):
        pins[name] = base[name]
    for name, ver in sorted(pins.items()):
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            got = None
        if got != ver:
            problems.append(f"{name}: {got or 'not installed'}, pinned {ver}")
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True).stdout
    import re
    for line in out.splitlines():
        who = re.sub(r"[-_.]+", "-", line.split(" ", 1)[0]).lower()
        if who in pins and who != "mindformers":
            problems.append(f"pip check: {line}")
    try:
        mf = import_mindformers()
        if not hasattr(mf, "LlamaForCausalLM"):
            problems.append("mindformers has no LlamaForCausalLM")
    except MindformersNotInstalled as e:
        problems.append(str(e))
    return problems


if __name__ == "__main__":  # python -m ms_dfkd.models.mindformers_llama check LOCK BASE_LOCK
    if len(sys.argv) != 4 or sys.argv[1] != "check":
        sys.exit("usage: python -m ms_dfkd.models.mindformers_llama check requirements-mindformers.lock requirements.lock")
    found = check_extra(sys.argv[2], sys.argv[3])
    for p in found:
        print(f"mindformers extra: {p}", file=sys.stderr)
    if not found:
        import mindformers
        print(f"mindformers extra: mindformers {mindformers.__version__} with mindspore {ms.__version__}, "
              f"numpy {np.__version__}: pins hold, imports")
    sys.exit(1 if found else 0)
