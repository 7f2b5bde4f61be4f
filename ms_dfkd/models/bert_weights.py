"""Load BERT weights into the MindSpore models of bert.py.

Two sources:
  * HF ``config.json`` + ``model.safetensors`` (MiniLM-L6, the teacher backbone; also what
    ``save_bert`` writes). Our parameter names are HF's, so the mapping is only the
    ``bert.`` prefix of the head models.
  * the 3-layer paraphrase-MiniLM ONNX export (student init). Its Linear weights are
    anonymous ``onnx::MatMul_NNN`` initializers stored (in, out); the consuming MatMul
    node's name says layer and role, and the Add node after it holds the bias.

Loading is strict (checkpoint_io.load_state): every key and shape is checked before the
first parameter is assigned. The only parameters allowed to stay fresh are a new
classification head's.
"""
import re
from pathlib import Path

import numpy as np

from .bert import BertConfig, BertModel, BertForSequenceClassification, BertForTokenClassification
from .checkpoint_io import CheckpointError, load_safetensors, load_state, save_safetensors, state_of

HEADS = {"model": BertModel, "sequence": BertForSequenceClassification, "token": BertForTokenClassification}

# Buffers in HF checkpoints that are not parameters: position_ids is arange(max_pos),
# which BertEmbeddings computes itself. Dropped by name, nothing else is.
_HF_BUFFERS = ("embeddings.position_ids",)


def _build(cfg, head):
    if head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    return HEADS[head](cfg)


def _resolve_hf_files(model_dir_or_files):
    """A folder holding config.json + model.safetensors, or a (config, weights) pair."""
    if isinstance(model_dir_or_files, (list, tuple)):
        if len(model_dir_or_files) != 2:
            raise ValueError("give a model folder or a (config.json, model.safetensors) pair")
        cfg_path, w_path = (Path(p) for p in model_dir_or_files)
    else:
        d = Path(model_dir_or_files)
        if not d.is_dir():
            raise FileNotFoundError(f"BERT model folder not found: {d}")
        cfg_path, w_path = d / "config.json", d / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"BERT model file not found: {p}")
    return cfg_path, w_path


def hf_to_model_state(state, model):
    """Rename an HF BERT state dict ({name: array}) to ``model``'s parameter names.

    Accepts both bare BertModel keys (``encoder.layer.0...``) and head-model keys
    (``bert.encoder...``, ``classifier.*``). Pooler weights are dropped when the model
    has no pooler (token head, or mean pooling): they are unused there, not lost.
    """
    is_head = not isinstance(model, BertModel)
    has_pooler = (model if not is_head else model.bert).pooler is not None
    out = {}
    for name, arr in state.items():
        base = name[5:] if name.startswith("bert.") else name
        if base in _HF_BUFFERS:
            continue
        if base.startswith("pooler.") and not has_pooler:
            continue
        if base.startswith(("embeddings.", "encoder.", "pooler.")):
            out[("bert." + base) if is_head else base] = arr
        else:
            out[name] = arr        # classifier.* or a foreign key: check_state reports it
    return out


def load_hf_weights(model, weights, allow_fresh_head=True, source=None):
    """Strictly load an HF safetensors file (path) or state dict into an existing model.

    With ``allow_fresh_head`` a checkpoint without ``classifier.*`` leaves the head at
    its random init (a backbone-only checkpoint); everything else must match exactly.
    """
    if isinstance(weights, (str, Path)):
        source = source or str(weights)
        weights = load_safetensors(weights)      # FileNotFoundError / CheckpointError (truncated)
    state = hf_to_model_state(weights, model)
    allow = ("classifier.",) if allow_fresh_head and not isinstance(model, BertModel) else ()
    return load_state(model, state, source=source or "state dict", allow_missing=allow)


def load_hf_bert(model_dir_or_files, head="sequence", num_labels=None, pooling=None,
                 allow_fresh_head=True, **config_overrides):
    """HF config.json + model.safetensors -> a model in eval mode.

    head: "sequence" (BertForSequenceClassification), "token" or "model" (bare BertModel).
    num_labels / pooling: None keeps the config's value (HF default 2 / "cls_pooler").
    pooling="mean" builds the model without a pooler.
    """
    cfg_path, w_path = _resolve_hf_files(model_dir_or_files)
    over = dict(config_overrides)
    if num_labels is not None:
        over["num_labels"] = num_labels
    if pooling is not None:
        over["pooling"] = pooling
        if pooling == "mean":
            over["add_pooler"] = False
    cfg = BertConfig.from_hf_json(cfg_path, **over)
    state = load_safetensors(w_path)       # read (and validate the file) before building
    model = _build(cfg, head)
    load_hf_weights(model, state, allow_fresh_head, source=f"{w_path} (config {cfg_path})")
    model.set_train(False)
    return model


def save_bert(model, out_dir):
    """Write config.json + model.safetensors that load_hf_bert reads back."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.to_hf_json(out_dir / "config.json")
    save_safetensors(state_of(model), out_dir / "model.safetensors",
                     metadata={"format": "ms-dfkd-bert", "class": type(model).__name__})


# --- ONNX (paraphrase-MiniLM-L3) -------------------------------------------------------------

# MatMul node name (the part after ``encoder/``) -> HF parameter path
_ONNX_LINEAR = re.compile(r"encoder/layer\.(\d+)/(attention/self/query|attention/self/key|"
                          r"attention/self/value|attention/output/dense|intermediate/dense|"
                          r"output/dense)/MatMul$")


def _onnx_const(graph, inits, name):
    """Value of a tensor that is an initializer or a Constant node's output."""
    from onnx import numpy_helper
    if name in inits:
        return numpy_helper.to_array(inits[name])
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def read_onnx_bert(path):
    """ONNX BERT export -> ({HF name: float32 array}, BertConfig with no pooler, mean pooling)."""
    import onnx
    from onnx import numpy_helper
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model file not found: {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as e:            # protobuf DecodeError and friends on a damaged file
        raise CheckpointError(f"corrupt or truncated ONNX file {path}: {type(e).__name__}: {e}") from None
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    consumers = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    def hf_name(onnx_name):            # "model.0.auto_model.encoder.layer.0..." -> "encoder.layer.0..."
        m = re.search(r"(embeddings|encoder|pooler)\..*$", onnx_name)
        return m.group(0) if m else None

    state, used = {}, set()
    for name, t in inits.items():      # named initializers: embeddings, LayerNorms, biases
        hn = hf_name(name)
        if hn is not None:
            state[hn] = numpy_helper.to_array(t).astype(np.float32)
            used.add(name)
    for node in g.node:                # anonymous Linear weights, named by their MatMul node
        m = _ONNX_LINEAR.search(node.name) if node.op_type == "MatMul" else None
        if m is None:
            continue
        w_in = [i for i in node.input if i in inits]
        if len(w_in) != 1:
            raise CheckpointError(f"{path}: MatMul {node.name} has {len(w_in)} weight initializers, expected 1")
        prefix = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}"
        state[prefix + ".weight"] = numpy_helper.to_array(inits[w_in[0]]).T.astype(np.float32)  # (in,out)->(out,in)
        used.add(w_in[0])
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        b_in = [i for n in adds for i in n.input if i in inits]
        if len(b_in) != 1:
            raise CheckpointError(f"{path}: no single bias Add after MatMul {node.name}")
        bias = numpy_helper.to_array(inits[b_in[0]]).astype(np.float32)
        if prefix + ".bias" in state and not np.array_equal(state[prefix + ".bias"], bias):
            raise CheckpointError(f"{path}: bias {b_in[0]} after {node.name} disagrees with its name")
        state[prefix + ".bias"] = bias
        used.add(b_in[0])
    unmapped = sorted(set(inits) - used)
    if unmapped:
        raise CheckpointError(f"{path}: ONNX initializers with no BERT parameter: {unmapped[:20]}")

    ops_used = {n.op_type for n in g.node}
    if "Erf" not in ops_used:
        raise CheckpointError(f"{path}: no Erf node, so the activation is not exact GELU; not supported")
    eps = next(a.f for n in g.node if n.op_type == "LayerNormalization"
               for a in n.attribute if a.name == "epsilon")
    # heads: the first attention block divides its scores by sqrt(head_dim)
    div = next((n for n in g.node if n.op_type == "Div" and "layer.0/attention/self/" in n.name), None)
    scale = _onnx_const(g, inits, div.input[1]) if div is not None else None
    if scale is None:
        raise CheckpointError(f"{path}: cannot find the attention scale to infer the number of heads")
    hidden = state["embeddings.word_embeddings.weight"].shape[1]
    head_dim = int(round(float(np.asarray(scale).reshape(-1)[0]) ** 2))
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layer.")}
    cfg = BertConfig(
        vocab_size=state["embeddings.word_embeddings.weight"].shape[0], hidden_size=hidden,
        num_hidden_layers=len(layers), num_attention_heads=hidden // head_dim,
        intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
        layer_norm_eps=float(np.float32(eps)), add_pooler=any(k.startswith("pooler.") for k in state),
        pooling="mean")
    return state, cfg


def load_onnx_bert(path, head="sequence", num_labels=2, **config_overrides):
    """The ONNX BERT as a MindSpore model in eval mode; mean pooling (the export has no pooler)."""
    from dataclasses import asdict
    state, cfg = read_onnx_bert(path)
    cfg = BertConfig(**{**asdict(cfg), "num_labels": num_labels, **config_overrides})
    model = _build(cfg, head)
    load_hf_weights(model, state, allow_fresh_head=True, source=str(path))
    model.set_train(False)
    return model
