"""Run configuration: dataclasses loaded from YAML, with ``--section.key value`` overrides.

Unknown keys and values of the wrong type are errors that name the key, so a
typo in a config never silently runs the default.
"""
import dataclasses
import math
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METHODS = ("random", "corpus", "prompted", "dfkd-t3", "real")


class ConfigError(ValueError):
    pass


TASK_KINDS = ("sequence", "token")
SEQUENCE_DEFAULT_LABELS = ["negative", "positive"]


@dataclass
class TaskConfig:
    name: str = "sentiment"                       # sentiment | sst2 | cola | wnut16 | custom
    kind: str = "sequence"                        # sequence (a label per text) | token (a BIO tag per word, NER)
    # token tasks: the entity types the model tags, in tag-set order (ner_data.bio_tag_names: O, B-t1, I-t1,
    # ...); the data's other types are read as O. Empty = all types of the data: WNUT-16's ten for a
    # wnut16:* task.train, else the types found in the task.train file (sorted). validate() fills it in.
    entity_types: typing.List[str] = field(default_factory=list)
    # Sequence tasks: the class names. Token tasks: the entity types, filled in by validate() from
    # task.entity_types (leave it unset): the generator prompts per label, and for NER a label is a type
    # ("a tweet that mentions a {label}"); the model's outputs are the tags, not these labels.
    label_names: typing.List[str] = field(default_factory=lambda: list(SEQUENCE_DEFAULT_LABELS))
    # One instruction per label; {label} and {text} are filled in.
    prompt_template: str = "Rewrite the text below as a {label} movie review.\n{text}\nReview:"
    # What {label} becomes in the prompt, one phrase per label in label order, where a label's name is no
    # phrase a generator understands (NER's "geo-loc"); empty = the label names themselves.
    label_words: typing.List[str] = field(default_factory=list)
    # Data specs. Sequence tasks: "rotten_tomatoes:<split>" or a labelled .tsv/.csv/.jsonl file (data.load_split).
    # Token tasks: "wnut16:<split>" (train | dev | test | all) or a BIO file, token<TAB>tag lines or CoNLL
    # columns with the tag last, a blank line between sentences (ner_data.load_token_split).
    train: str = "rotten_tomatoes:train"          # teacher's private data (train-teacher, method "real")
    dev: str = "rotten_tomatoes:dev"
    test: str = "rotten_tomatoes:test"
    metric: str = "accuracy"                      # accuracy | mcc | micro_f1; token tasks: entity_f1 (the default)


@dataclass
class CorpusConfig:
    sources: typing.List[str] = field(default_factory=lambda: ["bbc", "political"])
    min_words: int = 8
    max_words: int = 40


@dataclass
class TeacherConfig:
    arch: str = "minilm_l6"        # minilm_l6 | tiny
    checkpoint: str = "runs/teachers/{task}_{arch}.safetensors"  # written by train-teacher
    max_length: int = 64
    # train-teacher
    train_examples: int = 4000     # 0 = all
    epochs: int = 1
    batch_size: int = 32
    lr: float = 5.0e-5
    # tiny arch only
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4


@dataclass
class StudentConfig:
    arch: str = "minilm_l3_onnx"   # minilm_l3_onnx | minilm_l6_layers:N | bert_random:N | tiny
    max_length: int = 64
    batch_size: int = 32
    lr: float = 1.0e-4
    hidden_mse: float = 0.0        # alpha of the optional MSE(W h_S, h_T) on pooled features (distill only)
    hidden_size: int = 64          # tiny / bert_random only
    num_layers: int = 2
    num_heads: int = 4


@dataclass
class GeneratorConfig:
    arch: str = "smollm2"          # smollm2 | qwen2.5-coder-0.5b | qwen2.5-coder-1.5b (opt-in assets) | tiny
    #                                | mindformers_llama | mindformers_tiny (optional extra; build.py)
    trainable: str = "top_k"       # all | top_k | head_norms
    top_k_layers: int = 2
    lr: float = 1.0e-5
    batch_size: int = 8
    # rows a no-gradient sampling call draws (prompted; two_phase dfkd-t3's data phase), handed out batch_size
    # at a time; a multiple of batch_size; 0 = batch_size. Larger calls make a row cheaper (docs/BENCHMARKS.md)
    sample_batch_size: int = 0
    prompt_max_length: int = 96
    max_new_tokens: int = 24
    sample_temperature: float = 1.0
    top_p: float = 0.95
    gumbel_tau: float = 1.0
    chat_template: bool = True
    stop_at_newline: bool = True
    # sampling computes a prompt start that rows share (template and label) once per group of rows
    # (models/llama_sampling.py); false: every prompt row in full
    share_prompt_prefix: bool = True
    # on CPU, a decode step runs each decoder layer as one C++ op (models/llama_sampling.py); false: MindSpore's ops
    fused_decode: bool = True
    # on CPU, the prompt's prefill runs each decoder layer as one C++ op over the real tokens only
    # (models/llama_sampling.py); false: MindSpore's ops
    fused_prefill: bool = True
    # with fused_decode, the decode steps read the weights that do not train from the GGUF file's quantised
    # blocks (the same values; models/llama_sampling.py); false: the float32 weights
    decode_from_gguf_blocks: bool = True
    # dfkd-t3: a trainable vector per label added to the states entering the first trainable layer
    # (steps.GeneratorLoss); it trains at its own learning rate
    label_vectors: bool = False
    label_vector_lr: float = 1.0e-2
    # tiny arch only
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2


@dataclass
class LossConfig:
    spec: float = 1.0
    div: float = 0.5
    adv: float = 0.1
    flu: float = 0.5
    rwl: float = 0.0               # reward-weighted likelihood of the generator's own samples (losses.py)
    kd_temperature: float = 2.0


PRECISIONS = ("float32", "float16", "bfloat16")
SCHEDULES = ("interleaved", "two_phase")
KERNEL_PATHS = ("auto", "composite", "aot", "triton_interpret", "triton")  # kernels/dispatch.py


@dataclass
class RunConfig:
    method: str = "dfkd-t3"
    out_dir: str = "runs/{task}_{method}_seed{seed}"
    seed: int = 0
    rounds: int = 4
    gen_steps_per_round: int = 2   # k_G (dfkd-t3); for the other methods: batches drawn per round
    gen_warmup_steps: int = 0      # dfkd-t3: generator steps before round 1 whose samples train only the
    #                                generator (the student's data budget stays that of every method)
    gen_phase_log_every: int = 0   # warm-up / generator phase: a metrics line every this many steps (its
    #                                curve); 0 = one line for the whole phase
    student_steps_per_round: int = 4  # k_S
    # interleaved: dfkd-t3 updates its generator on every batch it draws (k_G a round).
    # two_phase: the generator trains in the warm-up only (the generator phase, on passages of its own);
    # the rounds then draw every method's samples without gradient from the same passages and noise
    # (the data phase) and train the student on them (the student phase).
    schedule: str = "interleaved"
    generator_from: str = ""       # two_phase dfkd-t3: a run folder whose finished generator phase this run starts
    #                                from instead of its own (one generator phase shared by seeds and by the filter)
    min_confidence: float = 0.0    # prompted / dfkd-t3: keep a sample only if the teacher's probability of
    #                                its target label is at least this; draw batches until a batch is kept
    replay_size: int = 512
    eval_every: int = 1            # rounds; 0 = only at the end
    eval_examples: int = 0         # dev examples for the per-round eval; 0 = all (test is always whole)
    mode: str = "graph"            # graph | pynative
    kernels: str = "auto"          # auto | composite | triton_interpret | aot
    precision: str = "float32"     # compute dtype of all three models: float32 | float16 (dynamic loss
    #                                scaling) | bfloat16 (GPU/Ascend); master weights stay float32
    threads: int = 0               # CPU kernel threads; 0 = the cores this process may use (taskset/affinity)
    checkpoint_every: int = 1      # rounds
    checkpoint_seconds: float = 60.0  # and at least this long after the last save (0: every checkpoint_every
    #                                   rounds); the last round and a Ctrl-C always save
    show_samples: int = 3          # generated texts per label printed at the end
    teacher_test: bool = True      # also evaluate the teacher on test at the end (the results table
    #                                evaluates its one teacher once, with `ms-dfkd eval`, not once a run)


@dataclass
class ResultsConfig:
    """Read by scripts/reproduce_results.py only: the seeds of the results table and its transfer students."""
    seeds: typing.List[int] = field(default_factory=lambda: [0, 1, 2])
    transfer_steps: int = 96       # distill-from-texts steps of the second student; 0 = no transfer rows
    transfer_student: str = "minilm_l6_layers:2"
    min_confidence: float = 0.0    # > 0: also prompted + filter and dfkd-t3 + filter, at this run.min_confidence
    share_generator_phase: bool = False  # two_phase: the first seed's dfkd-t3 run trains the generator phase and
    #                                      every other dfkd-t3 run starts from it (run.generator_from)
    methods: typing.List[str] = field(default_factory=lambda: list(METHODS))  # the table's rows, in this order
    compare_generators: typing.List[str] = field(default_factory=list)  # other generator.arch values: the
    #                                prompted and dfkd-t3 rows again with each (rows name their generator)
    section: str = ""              # "": the task's own table; a name: a section of that name after it in the
    #                                same results file (a profile that varies one setting, e.g. the generator)


@dataclass
class Config:
    task: TaskConfig = field(default_factory=TaskConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)

    def validate(self):
        if self.run.method not in METHODS:
            raise ConfigError(f"run.method: {self.run.method!r} is not one of {METHODS}")
        if self.run.mode not in ("graph", "pynative"):
            raise ConfigError(f"run.mode: {self.run.mode!r} is not 'graph' or 'pynative'")
        if self.run.kernels not in KERNEL_PATHS:
            raise ConfigError(f"run.kernels: {self.run.kernels!r} is not one of {KERNEL_PATHS}")
        if self.run.precision not in PRECISIONS:
            raise ConfigError(f"run.precision: {self.run.precision!r} is not one of {PRECISIONS}")
        if self.generator.trainable not in ("all", "top_k", "head_norms"):
            raise ConfigError(f"generator.trainable: {self.generator.trainable!r} is not all | top_k | head_norms")
        _validate_task(self.task)
        if self.task.kind == "sequence" and len(self.task.label_names) < 2:
            raise ConfigError(f"task.label_names: need at least 2 labels, got {self.task.label_names!r}")
        if self.task.label_words and len(self.task.label_words) != len(self.task.label_names):
            raise ConfigError(f"task.label_words: {len(self.task.label_words)} phrases for the "
                              f"{len(self.task.label_names)} labels {self.task.label_names}; give one per label, "
                              f"in that order (or none)")
        for sec, key in (("generator", "batch_size"), ("generator", "max_new_tokens"), ("student", "batch_size"),
                         ("run", "rounds"), ("teacher", "max_length"), ("student", "max_length"),
                         ("generator", "prompt_max_length"), ("teacher", "batch_size"), ("teacher", "epochs"),
                         ("run", "replay_size"), ("teacher", "lr"), ("student", "lr"), ("generator", "lr"),
                         ("generator", "label_vector_lr")):
            v = getattr(getattr(self, sec), key)
            if v <= 0:
                raise ConfigError(f"{sec}.{key}: must be > 0, got {v}")
        for sec, key in (("run", "gen_steps_per_round"), ("run", "student_steps_per_round"), ("run", "eval_every"),
                         ("run", "threads"),
                         ("run", "eval_examples"), ("run", "checkpoint_every"), ("run", "checkpoint_seconds"),
                         ("run", "show_samples"),
                         ("teacher", "train_examples"), ("student", "hidden_mse"), ("generator", "top_k_layers")):
            v = getattr(getattr(self, sec), key)
            if v < 0:
                raise ConfigError(f"{sec}.{key}: must be >= 0, got {v}")
        for key in ("spec", "div", "adv", "flu", "rwl"):
            if getattr(self.loss, key) < 0:
                raise ConfigError(f"loss.{key}: a loss weight must be >= 0, got {getattr(self.loss, key)}")
        for sec, key in (("run", "out_dir"), ("teacher", "checkpoint")):
            _check_template(f"{sec}.{key}", getattr(getattr(self, sec), key))
        for key in ("gumbel_tau", "sample_temperature"):
            if getattr(self.generator, key) <= 0:
                raise ConfigError(f"generator.{key}: must be > 0, got {getattr(self.generator, key)}")
        if self.run.schedule not in SCHEDULES:
            raise ConfigError(f"run.schedule: {self.run.schedule!r} is not one of {SCHEDULES}")
        if not 0 <= self.run.min_confidence < 1:
            raise ConfigError(f"run.min_confidence: must be in [0, 1), got {self.run.min_confidence}")
        bad = [m for m in self.results.methods if m not in METHODS]
        if bad or not self.results.methods or len(set(self.results.methods)) != len(self.results.methods):
            raise ConfigError(f"results.methods: {self.results.methods!r} must name each of {METHODS} at most once "
                              "(at least one)")
        if self.results.section and not self.results.section.replace("_", "").isalnum():
            raise ConfigError(f"results.section: {self.results.section!r} must be letters, digits and underscores")
        if not 0 <= self.results.min_confidence < 1:
            raise ConfigError(f"results.min_confidence: must be in [0, 1), got {self.results.min_confidence}")
        if self.run.min_confidence and self.run.method not in ("prompted", "dfkd-t3"):
            raise ConfigError(f"run.min_confidence: {self.run.min_confidence} needs a method whose samples have a "
                              f"target label (prompted, dfkd-t3), not {self.run.method!r}")
        if self.generator.label_vectors and self.generator.arch.startswith("mindformers"):
            raise ConfigError(f"generator.label_vectors: not supported with generator.arch {self.generator.arch} "
                              f"(its sampler has no way in for them); use a native arch")
        sb, b = self.generator.sample_batch_size, self.generator.batch_size
        if sb < 0 or (sb and sb % b):
            raise ConfigError(f"generator.sample_batch_size: must be 0 or a multiple of generator.batch_size "
                              f"({b}), got {sb}")
        if not 0 < self.generator.top_p <= 1:
            raise ConfigError(f"generator.top_p: must be in (0, 1], got {self.generator.top_p}")
        if self.loss.kd_temperature <= 0:
            raise ConfigError(f"loss.kd_temperature: must be > 0, got {self.loss.kd_temperature}")
        if self.run.gen_warmup_steps < 0:
            raise ConfigError(f"run.gen_warmup_steps: must be >= 0, got {self.run.gen_warmup_steps}")
        if self.run.gen_phase_log_every < 0:
            raise ConfigError(f"run.gen_phase_log_every: must be >= 0, got {self.run.gen_phase_log_every}")
        if self.run.gen_warmup_steps and self.run.method != "dfkd-t3":
            raise ConfigError(f"run.gen_warmup_steps: {self.run.gen_warmup_steps} needs run.method dfkd-t3 (only it "
                              f"trains a generator), not {self.run.method!r}")
        # a dfkd-t3 run of such a profile trains the phase or starts from one; the other methods have none
        if self.results.share_generator_phase and (self.run.schedule != "two_phase" or (
                self.run.method == "dfkd-t3" and not self.run.gen_warmup_steps and not self.run.generator_from)):
            raise ConfigError(f"results.share_generator_phase: needs run.schedule two_phase and run.gen_warmup_steps "
                              f"> 0 (got {self.run.schedule}, {self.run.gen_warmup_steps})")
        if self.run.generator_from and (self.run.method != "dfkd-t3" or self.run.schedule != "two_phase"
                                        or self.run.gen_warmup_steps):
            raise ConfigError(f"run.generator_from: {self.run.generator_from!r} takes the generator phase from that "
                              f"run, so it needs run.method dfkd-t3, run.schedule two_phase and run.gen_warmup_steps "
                              f"0 (got {self.run.method}, {self.run.schedule}, {self.run.gen_warmup_steps})")
        if self.task.kind == "token":  # docs/METHOD.md, "Token tasks (NER)": what the token loop does not have
            for key, v, why in (("run.min_confidence", self.run.min_confidence, "the teacher-confidence filter"),
                                ("loss.rwl", self.loss.rwl, "the reward-weighted likelihood"),
                                ("student.hidden_mse", self.student.hidden_mse, "the pooled-feature MSE")):
                if v:
                    raise ConfigError(f"{key}: {v}; {why} is not built for token tasks (task.kind token): set it "
                                      f"to 0")
        if self.generator.batch_size % len(self.task.label_names):
            raise ConfigError(f"generator.batch_size: {self.generator.batch_size} must be a multiple of the "
                              f"number of labels ({len(self.task.label_names)}) so that labels are balanced")
        return self

    def fmt(self, template):
        """Fill {task} {method} {seed} {arch} in a path template (checked by validate)."""
        return template.format(task=self.task.name, method=self.run.method, seed=self.run.seed,
                               arch=self.teacher.arch)

    def to_dict(self):
        return dataclasses.asdict(self)


TEMPLATE_FIELDS = ("task", "method", "seed", "arch")
DATA_SPEC_PREFIXES = {"sequence": "rotten_tomatoes:", "token": "wnut16:"}


def _validate_task(task):
    """task.kind and its data specs; for a token task, resolve task.entity_types (empty = all types of the
    data) and set task.label_names to them and task.metric to entity_f1. Idempotent, so that a saved
    config loads back equal."""
    if task.kind not in TASK_KINDS:
        raise ConfigError(f"task.kind: {task.kind!r} is not one of {TASK_KINDS}")
    other = "token" if task.kind == "sequence" else "sequence"
    for which in ("train", "dev", "test"):
        spec = getattr(task, which)
        if spec.startswith(DATA_SPEC_PREFIXES[other]):
            raise ConfigError(f"task.{which}: {spec!r} is {other}-classification data, but task.kind is "
                              f"{task.kind!r}")
    if task.kind == "sequence":
        if task.entity_types:
            raise ConfigError(f"task.entity_types: {task.entity_types!r} is for task.kind token only "
                              f"(task.kind is 'sequence')")
        return
    from . import ner_data
    wnut = [which for which in ("train", "dev", "test") if getattr(task, which).startswith("wnut16:")]
    for which in wnut:
        split = getattr(task, which).split(":", 1)[1]
        if split not in ner_data.WNUT16_SPLITS:
            raise ConfigError(f"task.{which}: {getattr(task, which)!r} has no split {split!r}; use wnut16:"
                              + " | wnut16:".join(ner_data.WNUT16_SPLITS))
    if not task.entity_types:
        if task.train.startswith("wnut16:"):
            task.entity_types = list(ner_data.WNUT16_TYPES)
        else:
            try:
                task.entity_types = ner_data.spec_entity_types(task.train)
            except (OSError, ValueError) as e:
                raise ConfigError(f"task.entity_types: empty, so the types come from task.train="
                                  f"{task.train!r}, which could not be read ({e}); or list them") from None
            if not task.entity_types:
                raise ConfigError(f"task.entity_types: empty, and task.train={task.train!r} has no entities")
    types = list(task.entity_types)
    if len(set(types)) != len(types):
        raise ConfigError(f"task.entity_types: {types} lists a type twice")
    for t in types:
        try:
            ner_data.check_tag(f"B-{t}")
        except ValueError:
            raise ConfigError(f"task.entity_types: {t!r} is not an entity type name (non-empty, no spaces)") from None
    if wnut:
        bad = [t for t in types if t not in ner_data.WNUT16_TYPES]
        if bad:
            raise ConfigError(f"task.entity_types: {bad[0]!r} is not a WNUT-16 type (task.{wnut[0]} is "
                              f"{getattr(task, wnut[0])!r}); its types are {list(ner_data.WNUT16_TYPES)}")
    if list(task.label_names) not in (SEQUENCE_DEFAULT_LABELS, types):
        raise ConfigError(f"task.label_names: {task.label_names} differs from task.entity_types {types}; a "
                          f"token task's labels are its entity types: leave task.label_names unset")
    task.label_names = list(types)
    if task.metric == "accuracy":  # the sequence default
        task.metric = "entity_f1"
    if task.metric != "entity_f1":
        raise ConfigError(f"task.metric: {task.metric!r}; a token task is scored by entity_f1")


def _check_template(key, template):
    """A path template may use {task} {method} {seed} {arch} and nothing else ({{ and }} for braces)."""
    try:
        names = [name for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"{key}: {template!r} is not a valid path template ({e}); use {{{{ and }}}} for "
                          f"literal braces") from None
    bad = [n for n in names if n not in TEMPLATE_FIELDS]
    if bad:
        raise ConfigError(f"{key}: {template!r} uses {{{bad[0]}}}; a path template may use "
                          + " ".join("{" + f + "}" for f in TEMPLATE_FIELDS))


def _coerce(value, typ, key):
    """Convert a YAML or command-line value to the field's type, or raise naming the key."""
    origin = typing.get_origin(typ)
    if origin in (list, typing.List):
        (inner,) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if typ is float:
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):  # nan passes every range check below, and fails much later
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return f
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {typ}")


def _section_types(section):
    return {f.name: f.type for f in dataclasses.fields(section)}


def _set(cfg, dotted, value):
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"config key {dotted!r}: use section.key, sections are {[f.name for f in dataclasses.fields(Config)]}")
    sec_name, key = parts
    if not hasattr(cfg, sec_name) or sec_name not in {f.name for f in dataclasses.fields(Config)}:
        raise ConfigError(f"unknown config section {sec_name!r} in {dotted!r}; "
                          f"sections are {[f.name for f in dataclasses.fields(Config)]}")
    section = getattr(cfg, sec_name)
    types = _section_types(section)
    if key not in types:
        raise ConfigError(f"unknown config key {dotted!r}; {sec_name} has {sorted(types)}")
    setattr(section, key, _coerce(value, types[key], dotted))


def load_config(path=None, overrides=()):
    """Config from an optional YAML file, then ``overrides`` (a list of (dotted_key, value))."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
        for sec_name, body in data.items():
            if not isinstance(body, dict):
                raise ConfigError(f"config file {path}: section {sec_name!r} must be a mapping")
            for key, value in body.items():
                _set(cfg, f"{sec_name}.{key}", value)
    for key, value in overrides:
        _set(cfg, key, value)
    return cfg.validate()


def parse_overrides(argv):
    """['--run.seed', '3', '--loss.div=0.1'] -> [('run.seed', '3'), ('loss.div', '0.1')]."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}: overrides look like --section.key value")
        a = a[2:]
        if "=" in a:
            k, v = a.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override --{a} has no value")
            k, v = a, argv[i + 1]
            i += 2
        out.append((k, v))
    return out


def save_config(cfg, path):
    from .models.checkpoint_io import atomic_write
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
