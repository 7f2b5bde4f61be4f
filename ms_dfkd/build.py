"""Build the tokenizers and the three models of a run from its Config.

Architectures (config ``arch`` strings):
  teacher:   minilm_l6 (real MiniLM-L6 + fresh head, fine-tuned by train-teacher) | tiny
  student:   minilm_l3_onnx | minilm_l6_layers:N (first N layers of MiniLM-L6) | bert_random:N | tiny
  generator: smollm2 (SmolLM2-135M-Instruct GGUF) | qwen2.5-coder-0.5b | qwen2.5-coder-1.5b
             (Qwen2.5-Coder-*-Instruct GGUF, opt-in assets: MS_DFKD_QWEN=1 bash scripts/setup.sh)
             | tiny (random Llama with SmolLM2's tokenizer)
             | mindformers_llama | mindformers_tiny (smollm2's / tiny's weights in mindformers' Llama,
             optional extra: MS_DFKD_MINDFORMERS=1 bash scripts/setup.sh)
The tiny ones keep the real tokenizers, so the smoke run exercises the real vocab bridge.
A token task (task.kind token, NER) gets the same teacher and student architectures with a token head
(BertForTokenClassification) over the tag set ``ner_data.bio_tag_names(task.entity_types)``.
"""
import json
import logging
from dataclasses import asdict
from pathlib import Path


from .assets import asset_path
from .models.bert import BertConfig, BertForSequenceClassification, BertForTokenClassification
from .models.checkpoint_io import CheckpointError, load_safetensors, load_state, safetensors_metadata, \
    save_safetensors, state_of
from .tokenization import bpe_tokenizer_from_gguf, wordpiece_tokenizer

log = logging.getLogger("ms_dfkd")

_TOKENIZERS = {}


def teacher_tokenizer(cfg=None):
    if "wordpiece" not in _TOKENIZERS:
        _TOKENIZERS["wordpiece"] = wordpiece_tokenizer(asset_path("minilm_l6_dir") / "vocab.txt")
    return _TOKENIZERS["wordpiece"]


student_tokenizer = teacher_tokenizer  # all shipped students are uncased-BERT WordPiece models


# generator.arch -> the GGUF asset holding its weights and tokenizer
GENERATOR_GGUF = {"smollm2": "smollm2_gguf", "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b",
                  "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b"}
# mindformers_*: SmolLM2's (or tiny's) weights in mindformers' LlamaForCausalLM; optional extra, see
# models/mindformers_llama.py (MS_DFKD_MINDFORMERS=1 bash scripts/setup.sh)
MINDFORMERS_ARCHS = {"mindformers_llama": "smollm2", "mindformers_tiny": "tiny"}
GENERATOR_ARCHS = tuple(GENERATOR_GGUF) + ("tiny",) + tuple(MINDFORMERS_ARCHS)


def _generator_asset(cfg):
    arch = "smollm2" if cfg is None else cfg.generator.arch
    arch = MINDFORMERS_ARCHS.get(arch, arch)
    if arch == "tiny":
        return GENERATOR_GGUF["smollm2"]  # a random Llama with SmolLM2's tokenizer
    if arch not in GENERATOR_GGUF:
        raise ValueError(f"generator.arch: unknown architecture {arch!r} ({' | '.join(GENERATOR_ARCHS)})")
    return GENERATOR_GGUF[arch]


def generator_tokenizer(cfg=None):
    """The generator's BPE tokenizer (SmolLM2's for cfg None), built once per GGUF file."""
    name = _generator_asset(cfg)
    if ("bpe", name) not in _TOKENIZERS:
        _TOKENIZERS[("bpe", name)] = bpe_tokenizer_from_gguf(asset_path(name))
    return _TOKENIZERS[("bpe", name)]


# task.kind -> the model class; its name is also load_hf_bert's / load_onnx_bert's ``head``
HEADS = {"sequence": BertForSequenceClassification, "token": BertForTokenClassification}


def tag_names(cfg):
    """A token task's tag set: ["O", "B-t1", "I-t1", ...] over task.entity_types (ner_data.bio_tag_names)."""
    from .ner_data import bio_tag_names
    return bio_tag_names(cfg.task.entity_types)


def num_outputs(cfg):
    """The width of the model's head: the labels of a sequence task, the tags of a token task."""
    return len(tag_names(cfg)) if cfg.task.kind == "token" else len(cfg.task.label_names)


def _tiny_bert(vocab, hidden, layers, heads, num_labels, pooling="cls_pooler", head="sequence"):
    if head == "token":
        pooling = "mean"  # a token head has no pooler
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=512,
                     num_labels=num_labels, pooling=pooling, add_pooler=pooling == "cls_pooler")
    return HEADS[head](cfg)


def build_teacher_arch(cfg, pretrained=True):
    """The teacher network: pretrained backbone + fresh head (train-teacher) or an empty shell to load into."""
    K, head = num_outputs(cfg), cfg.task.kind
    arch = cfg.teacher.arch
    if arch == "minilm_l6":
        from .models.bert_weights import load_hf_bert
        return set_compute_dtype(load_hf_bert(asset_path("minilm_l6_dir"), head=head, num_labels=K), cfg)
    if arch == "tiny":
        import mindspore as ms
        ms.set_seed(cfg.run.seed)
        return set_compute_dtype(_tiny_bert(teacher_tokenizer().vocab_size, cfg.teacher.hidden_size,
                                            cfg.teacher.num_layers, cfg.teacher.num_heads, K, head=head), cfg)
    raise ValueError(f"teacher.arch: unknown architecture {arch!r} (minilm_l6 | tiny)")


def teacher_checkpoint_path(cfg):
    return Path(cfg.fmt(cfg.teacher.checkpoint))


def save_teacher(model, cfg, path=None, extra=None):
    path = Path(path or teacher_checkpoint_path(cfg))
    meta = {"format": "ms-dfkd-teacher", "arch": cfg.teacher.arch, "task": cfg.task.name,
            "label_names": json.dumps(cfg.task.label_names), "bert_config": json.dumps(asdict(model.config)),
            "kind": cfg.task.kind}
    if cfg.task.kind == "token":
        meta["tag_names"] = json.dumps(tag_names(cfg))
    meta.update(extra or {})
    save_safetensors(state_of(model), path, metadata=meta)
    return path


def load_teacher(cfg, path=None):
    """The fine-tuned teacher, frozen. A missing file says how to make it."""
    path = Path(path or teacher_checkpoint_path(cfg))
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}. Make it with "
                                f"`ms-dfkd train-teacher --config <cfg>` (or point teacher.checkpoint at yours)")
    state = load_safetensors(path)
    meta = safetensors_metadata(path)
    if meta.get("format") != "ms-dfkd-teacher":
        raise CheckpointError(f"{path} is not an ms-dfkd teacher checkpoint (metadata format={meta.get('format')!r})")
    kind = meta.get("kind", "sequence")  # checkpoints from before token tasks have no kind
    if kind != cfg.task.kind:
        raise CheckpointError(f"{path} is a {kind}-classification teacher, but task.kind is {cfg.task.kind!r}")
    labels = json.loads(meta["label_names"])
    if labels != list(cfg.task.label_names):
        what = "entity types" if kind == "token" else "labels"
        key = "task.entity_types" if kind == "token" else "task.label_names"
        raise CheckpointError(f"{path} was trained for {what} {labels}, but {key} is {cfg.task.label_names}")
    if kind == "token" and json.loads(meta["tag_names"]) != tag_names(cfg):
        raise CheckpointError(f"{path} was trained for the tags {json.loads(meta['tag_names'])}, not {tag_names(cfg)}")
    bcfg = BertConfig(**json.loads(meta["bert_config"]))
    model = HEADS[kind](bcfg)
    load_state(model, state, source=str(path))
    freeze(model)
    return set_compute_dtype(model, cfg)


def build_student(cfg):
    """The student of task.kind's head (num_outputs wide), its backbone pretrained or random per student.arch."""
    K, head = num_outputs(cfg), cfg.task.kind
    arch = cfg.student.arch
    import mindspore as ms
    ms.set_seed(cfg.run.seed)  # model init is shared across ranks and methods
    if arch == "minilm_l3_onnx":
        from .models.bert_weights import load_onnx_bert
        model = load_onnx_bert(asset_path("minilm_l3_onnx"), head=head, num_labels=K)
    elif arch.startswith("minilm_l6_layers:"):
        from .models.bert_weights import load_hf_bert
        n = _arch_int(arch, "student.arch")
        full = load_hf_bert(asset_path("minilm_l6_dir"), head=head, num_labels=K)
        state = {k: v for k, v in state_of(full).items()
                 if not k.startswith("bert.encoder.layer.") or int(k.split(".")[3]) < n}
        model = HEADS[head](BertConfig(**{**asdict(full.config), "num_hidden_layers": n}))
        load_state(model, state, source=f"MiniLM-L6 first {n} layers", allow_missing=("classifier.",))
    elif arch.startswith("bert_random:"):
        n = _arch_int(arch, "student.arch")
        model = _tiny_bert(student_tokenizer().vocab_size, 384, n, 12, K, head=head)
    elif arch == "tiny":
        model = _tiny_bert(student_tokenizer().vocab_size, cfg.student.hidden_size, cfg.student.num_layers,
                           cfg.student.num_heads, K, head=head)
    else:
        raise ValueError(f"student.arch: unknown architecture {arch!r} "
                         f"(minilm_l3_onnx | minilm_l6_layers:N | bert_random:N | tiny)")
    model.set_train(False)  # no dropout in DFKD runs: the step must be reproducible
    return set_compute_dtype(model, cfg)


def _arch_int(arch, key):
    try:
        n = int(arch.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"{key}: {arch!r} needs an integer after ':'") from None
    if n <= 0:
        raise ValueError(f"{key}: {arch!r} needs a positive layer count")
    return n


def build_generator(cfg, seed=None):
    """(model, config). For 'tiny' the init is seeded from run.seed, so that every rank agrees."""
    arch = cfg.generator.arch
    if arch in MINDFORMERS_ARCHS:
        return _build_mindformers_generator(cfg, seed)
    if arch in GENERATOR_GGUF:
        from .models.llama_weights import load_gguf_llama
        lcfg, model = load_gguf_llama(asset_path(GENERATOR_GGUF[arch]))
        return set_compute_dtype(model, cfg), lcfg
    if arch == "tiny":
        from .models.llama import LlamaConfig, LlamaForCausalLM
        g = cfg.generator
        lcfg = LlamaConfig(vocab_size=generator_tokenizer().vocab_size, hidden_size=g.hidden_size,
                           intermediate_size=int(8 * g.hidden_size / 3) // 8 * 8, num_hidden_layers=g.num_layers,
                           num_attention_heads=g.num_heads, num_key_value_heads=g.num_kv_heads,
                           max_position_embeddings=1024)
        return set_compute_dtype(LlamaForCausalLM(lcfg, seed=cfg.run.seed if seed is None else seed), cfg), lcfg
    raise ValueError(f"generator.arch: unknown architecture {arch!r} ({' | '.join(GENERATOR_ARCHS)})")


def _build_mindformers_generator(cfg, seed=None):
    """(model, LlamaConfig) for ``generator.arch`` mindformers_llama (SmolLM2's GGUF weights) or
    mindformers_tiny (the weights of build's ``tiny`` generator, same seed), in run.precision.

    ``generator.trainable head_norms`` is refused: the driver chooses trainable parameters with
    llama.set_trainable, whose head_norms names (``*layernorm.weight``) this model does not have
    (``set_trainable`` here maps them; ``top_k`` and ``all`` agree under both)."""
    import mindspore as ms
    from dataclasses import replace
    from .config import ConfigError
    from .models.mindformers_llama import from_llama, import_mindformers, load_gguf_mindformers
    arch, precision = cfg.generator.arch, cfg.run.precision
    if cfg.generator.trainable == "head_norms":
        raise ConfigError(f"generator.trainable: head_norms is not supported with generator.arch {arch}; "
                          f"use top_k or all")
    if precision == "bfloat16" and ms.get_context("device_target") == "CPU":
        raise ConfigError("run.precision: bfloat16 needs a GPU or Ascend (MindSpore's CPU MatMul has no "
                          "bfloat16 kernel); use float32 or float16 on CPU")
    import_mindformers()  # the one-line error without the extra, before any weights are read
    if arch == "mindformers_llama":
        lcfg, model = load_gguf_mindformers(asset_path("smollm2_gguf"), precision)
        return model, lcfg
    if arch == "mindformers_tiny":
        tiny_cfg = replace(cfg, generator=replace(cfg.generator, arch="tiny"), run=replace(cfg.run, precision="float32"))
        native, _ = build_generator(tiny_cfg, seed)
        model = from_llama(native, compute_dtype=precision)
        return model, model.config
    raise ConfigError(f"generator.arch: {arch!r} is not a mindformers architecture (mindformers_llama | mindformers_tiny)")


def set_compute_dtype(model, cfg):
    """Switch every matmul of a built model to run.precision (float32 | float16 | bfloat16).

    Parameters stay float32 (master weights); the cells cast them at each matmul, and norms,
    softmax and logits stay float32 (see models/bert.py, models/llama.py). Called by every
    builder before anything is compiled, since graph mode reads the dtype at compile time."""
    import mindspore as ms
    name = cfg.run.precision
    dtypes = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
    dtype = dtypes[name]
    if name == "bfloat16" and ms.get_context("device_target") == "CPU":
        from .config import ConfigError
        raise ConfigError("run.precision: bfloat16 needs a GPU or Ascend (MindSpore's CPU MatMul has no "
                          "bfloat16 kernel); use float32 or float16 on CPU")
    for _, cell in model.cells_and_names():
        if any(getattr(cell, "compute_dtype", None) is d for d in dtypes.values()):
            cell.compute_dtype = dtype
        if hasattr(getattr(cell, "config", None), "compute_dtype"):
            cell.config.compute_dtype = name
    return model


def freeze(model):
    for p in model.get_parameters():
        p.requires_grad = False
    model.set_train(False)
    return model
