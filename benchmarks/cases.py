"""One DFKD-T3 step's worth of identical inputs for ms_dfkd and the PyTorch reference, and the
MindSpore side that runs them.

A ``Case`` is framework-neutral numpy: the three models' weights (or the GGUF path for SmolLM2),
the vocabulary bridge, one generator batch (prompts, sampled tokens and mask, labels, noise seed)
and one student batch (the same texts in the teacher's and the student's tokenization).
``make_case`` builds it with ms_dfkd's own builders (so tiny models and fresh heads are ms_dfkd's
seeded inits); ``MSSide`` runs ms_dfkd's GeneratorLoss / StudentLoss on it, and
``reference_torch.harness.TorchSide`` runs the reference on the same case.

Torch is never imported here.
"""
import json
import zlib
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"smoke": ROOT / "configs" / "smoke.yaml", "real": ROOT / "configs" / "sentiment_offline.yaml"}

PASSAGES = [
    "The committee met on Tuesday to discuss the new budget for the city's schools and parks.",
    "Shares in the company fell sharply after it warned that profits would be lower this year.",
    "A small band played old songs in the square while the rain kept most people indoors.",
    "The minister said the plan would create thousands of jobs over the next decade.",
    "Fans queued overnight for tickets to the final, which sold out within an hour.",
    "Researchers found that the new battery lasts twice as long in cold weather.",
    "The old bridge will close for repairs, and traffic will use the ferry until spring.",
    "She wrote the novel in six weeks, mostly at night, after her shifts at the hospital.",
]
REVIEWS = [
    "a gorgeous, funny and moving film that never puts a foot wrong",
    "the plot is thin, the jokes are stale and the ending drags on forever",
    "an uneven but often charming comedy with a terrific lead performance",
    "dull, overlong and curiously lifeless despite its talented cast",
    "one of the smartest thrillers of the year",
    "i wanted to like it, but it is a mess",
    "warm, wise and beautifully shot",
    "a tedious exercise in style over substance",
]


@dataclass
class Case:
    name: str
    gen_trainable: str                 # ms_dfkd set_trainable mode: "all" | "top_k"
    gen_top_k: int
    weights: dict                      # spec, div, adv, flu
    kd_temperature: float
    tau: float
    lr_g: float
    lr_s: float
    alpha: float                       # hidden-MSE weight of the student step
    teacher_cfg: dict                  # ms_dfkd BertConfig fields
    student_cfg: dict
    gen_cfg: dict                      # ms_dfkd LlamaConfig fields
    seed: int                          # Gumbel noise seed of the generator batch
    gguf: str = None                   # generator weights from this GGUF (else gen_state)
    arrays: dict = field(default_factory=dict, repr=False)   # states (prefixed) + batch arrays

    # --- arrays by prefix -----------------------------------------------------------------------
    def state(self, prefix):
        p = prefix + "/"
        return {k[len(p):]: v for k, v in self.arrays.items() if k.startswith(p)}

    def gen_delta(self):
        """Perturbation added to G (not G0) so that KL(G || G0) is not zero, HF layout."""
        return self.state("gen_delta")

    def save(self, path):
        path = Path(path)
        meta = {k: v for k, v in asdict(self).items() if k != "arrays"}
        np.savez(path.with_suffix(".npz"), **self.arrays)
        path.with_suffix(".json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path):
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        with np.load(path.with_suffix(".npz")) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(**meta, arrays=arrays)


def _delta(name, shape, scale):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def make_case(kind, batch=4, prompt_len=16, new_tokens=8, student_batch=8, student_len=32,
              gen_trainable="all", gen_top_k=2, perturb=True, alpha=0.5, seed=20240611, sample_graph=True,
              keep_generator=True):
    """Build the case with ms_dfkd's builders (MindSpore is imported here).

    keep_generator: also store SmolLM2's weights (as ms_dfkd loaded them) in the case, so that MSSide
    need not read the GGUF again; the reference always reads the GGUF itself. perturb: G = G0 + small
    seeded noise, so that the fluency term and its gradient are not zero."""
    import mindspore as ms
    from ms_dfkd import build
    from ms_dfkd.config import load_config
    from ms_dfkd.models.checkpoint_io import state_of
    from ms_dfkd.models.llama_sampling import sample
    from ms_dfkd.vocab_bridge import build_vocab_bridge

    if kind not in CONFIGS:
        raise ValueError(f"case kind must be one of {sorted(CONFIGS)}, got {kind!r}")
    cfg = load_config(CONFIGS[kind])
    g_tok, t_tok = build.generator_tokenizer(cfg), build.teacher_tokenizer(cfg)
    ms.set_seed(cfg.run.seed)
    teacher = build.build_teacher_arch(cfg)           # tiny random, or MiniLM-L6 + seeded random head
    student = build.build_student(cfg)
    arrays = {}
    rng = np.random.default_rng(seed)
    for prefix, model in (("teacher", teacher), ("student", student)):
        for k, v in state_of(model).items():
            arrays[f"{prefix}/{k}"] = v
        # The fresh heads' std-0.02 init gives logits ~1e-2 (and, on the tiny random encoders, nearly
        # identical pooled features): KL and cosine terms would be float noise. O(1) weights make
        # every term count. The real encoders keep their pretrained pooler.
        h = model.config.hidden_size
        for k in ("classifier.weight",) + (("bert.pooler.dense.weight",) if kind == "smoke" else ()):
            if f"{prefix}/{k}" in arrays:
                shape = arrays[f"{prefix}/{k}"].shape
                arrays[f"{prefix}/{k}"] = (rng.standard_normal(shape) * 2 / np.sqrt(h)).astype(np.float32)
    gguf = None
    if cfg.generator.arch == "smollm2":
        from ms_dfkd.assets import asset_path
        from ms_dfkd.models.llama_weights import load_gguf_llama
        gguf = str(asset_path("smollm2_gguf"))
        g_cfg, gen = load_gguf_llama(gguf)
        if keep_generator:
            for k, v in state_of(gen).items():
                arrays[f"gen/{k}"] = v
    else:
        gen, g_cfg = build.build_generator(cfg)
        for k, v in state_of(gen).items():
            arrays[f"gen/{k}"] = v
    if perturb:
        norm_scale, matrix_scale = (0.05, 0.01) if kind == "smoke" else (0.01, 0.002)
        for k, v in state_of(gen).items():
            arrays[f"gen_delta/{k}"] = _delta(k, v.shape, norm_scale if v.ndim == 1 else matrix_scale)

    bridge = _bridge(g_tok, t_tok)
    arrays.update({"bridge/data": bridge.data, "bridge/indices": bridge.indices, "bridge/indptr": bridge.indptr,
                   "bridge/shape": np.asarray(bridge.shape, np.int64),
                   "specials": np.asarray([t_tok.bos_id, t_tok.eos_id], np.int64)})

    # generator batch: left-padded prompts of different lengths, tokens sampled by ms_dfkd
    labels = np.arange(batch, dtype=np.int32) % len(cfg.task.label_names)
    p_ids = np.full((batch, prompt_len), g_tok.pad_id, np.int32)
    p_mask = np.zeros((batch, prompt_len), np.int32)
    for i in range(batch):
        text = f"Rewrite as a {cfg.task.label_names[labels[i]]} movie review: {PASSAGES[i % len(PASSAGES)]}"
        row = g_tok.encode(text, add_special_tokens=False)[:prompt_len - 3 * (i % 2)]
        p_ids[i, prompt_len - len(row):], p_mask[i, prompt_len - len(row):] = row, 1
    gen_ids, gen_mask = sample(gen, p_ids, p_mask, new_tokens, seed, temperature=1.0, eos_id=g_tok.eos_id,
                               graph=sample_graph)
    arrays.update({"sampled/ids": gen_ids.copy(), "sampled/mask": gen_mask.copy()})
    if batch > 1 and gen_mask[1].sum() > new_tokens - 3:      # make sure one row stops early
        stop = new_tokens - 3
        gen_ids[1, stop], gen_ids[1, stop + 1:], gen_mask[1, stop:] = g_tok.eos_id, g_cfg.pad_token_id, 0
    arrays.update({"batch/prompt_ids": p_ids, "batch/prompt_mask": p_mask, "batch/gen_ids": gen_ids,
                   "batch/gen_mask": gen_mask, "batch/labels": labels})

    texts = [REVIEWS[i % len(REVIEWS)] for i in range(student_batch)]
    t_ids, t_mask = t_tok.encode_batch(texts, max_length=student_len, padding="max_length")
    s_ids, s_mask = t_tok.encode_batch(texts, max_length=student_len, padding="max_length")  # same WordPiece
    hs, ht = student.config.hidden_size, teacher.config.hidden_size
    arrays.update({"sbatch/teacher_ids": t_ids, "sbatch/teacher_mask": t_mask,
                   "sbatch/student_ids": s_ids, "sbatch/student_mask": s_mask,
                   "proj/weight": (rng.standard_normal((ht, hs)) / np.sqrt(hs)).astype(np.float32),
                   "proj/bias": np.zeros(ht, np.float32)})
    return Case(name=kind, gen_trainable=gen_trainable, gen_top_k=gen_top_k,
                weights={k: float(getattr(cfg.loss, k)) for k in ("spec", "div", "adv", "flu")},
                kd_temperature=float(cfg.loss.kd_temperature), tau=float(cfg.generator.gumbel_tau),
                lr_g=float(cfg.generator.lr), lr_s=float(cfg.student.lr), alpha=alpha,
                teacher_cfg=asdict(teacher.config), student_cfg=asdict(student.config),
                gen_cfg=asdict(g_cfg), seed=int(seed), gguf=gguf, arrays=arrays)


_BRIDGES = {}


def _bridge(g_tok, t_tok):
    from ms_dfkd.vocab_bridge import build_vocab_bridge
    if "b" not in _BRIDGES:          # ~8 s: built once per process
        _BRIDGES["b"] = build_vocab_bridge(g_tok, t_tok).matrix.tocsr()
    return _BRIDGES["b"]


def bridge_matrix(case):
    import scipy.sparse as sp
    a = case.arrays
    return sp.csr_matrix((a["bridge/data"], a["bridge/indices"], a["bridge/indptr"]),
                         shape=tuple(a["bridge/shape"]))


def noise(case):
    """The Gumbel noise of the generator batch, [B*T, V]: rows b*T + t, columns 0..V-1."""
    from kernels.gumbel_noise import gumbel_np
    B, T = case.arrays["batch/gen_ids"].shape
    return gumbel_np(case.seed, np.arange(B * T), np.arange(case.gen_cfg["vocab_size"]))


# --- the MindSpore side ----------------------------------------------------------------------------

def _bind_kernel_names():
    """MindSpore's graph parser reads ``kernels.kd_loss`` from the module's __dict__ and does not see
    names that kernels/__init__.py serves lazily through __getattr__ ("Namespace:kernels object has no
    attribute soft_embedding"). Bind them until kernels/__init__.py does it itself."""
    import kernels
    for name in ("soft_embedding", "kd_loss"):
        if name not in vars(kernels):
            setattr(kernels, name, getattr(kernels, name))


class MSSide:
    """ms_dfkd's steps on a case: losses and gradients (parity) or full optimizer steps (benchmark)."""

    def __init__(self, case, jit=True):
        import mindspore as ms
        from mindspore import nn
        from ms_dfkd.models.bert import BertConfig, BertForSequenceClassification
        from ms_dfkd.models.checkpoint_io import load_state
        from ms_dfkd.models.llama import LlamaConfig, LlamaForCausalLM, set_trainable
        from ms_dfkd.steps import GeneratorLoss, StudentLoss, soft_sequence_layout
        from ms_dfkd.vocab_bridge import VocabBridge

        _bind_kernel_names()
        self.case, self.ms, self.jit = case, ms, jit
        a = case.arrays
        self.teacher = BertForSequenceClassification(BertConfig(**case.teacher_cfg))
        load_state(self.teacher, case.state("teacher"))
        self.student = BertForSequenceClassification(BertConfig(**case.student_cfg))
        load_state(self.student, case.state("student"))
        for m in (self.teacher, self.student):
            m.set_train(False)
        g_state = case.state("gen")
        if not g_state:
            from ms_dfkd.models.llama_weights import read_gguf_state
            _, g_state = read_gguf_state(case.gguf)
        self.gen = LlamaForCausalLM(LlamaConfig(**case.gen_cfg), init_weights=False)
        self.frozen = LlamaForCausalLM(LlamaConfig(**case.gen_cfg), init_weights=False)
        self.frozen.update_parameters_name("g0.")
        load_state(self.frozen, g_state)
        delta = case.gen_delta()
        load_state(self.gen, {k: v + delta[k] if k in delta else v for k, v in g_state.items()})
        del g_state
        set_trainable(self.frozen, "none")
        self.gen_params = set_trainable(self.gen, case.gen_trainable, case.gen_top_k)
        for p in self.teacher.get_parameters():
            p.requires_grad = False
        for p in self.student.get_parameters():
            p.requires_grad = True

        bridge = VocabBridge(bridge_matrix(case), 1.0, 0, 0)
        cls_id, sep_id = (int(i) for i in a["specials"])
        E_t = self.teacher.get_input_embeddings().asnumpy()
        E_s = self.student.get_input_embeddings().asnumpy()
        T_ = ms.Tensor
        self.tables = (T_(bridge.table(E_t)), T_(bridge.table(E_s)))
        self.specials = (T_(E_t[cls_id]), T_(E_t[sep_id]), T_(E_s[cls_id]), T_(E_s[sep_id]))
        cls_sel, tok_sel, sep_sel, enc_mask = soft_sequence_layout(a["batch/gen_mask"])
        full_ids = np.concatenate([a["batch/prompt_ids"], a["batch/gen_ids"]], 1)
        full_mask = np.concatenate([a["batch/prompt_mask"], a["batch/gen_mask"]], 1)
        self.P = a["batch/prompt_ids"].shape[1]
        B, self.T = a["batch/gen_ids"].shape
        self.full = (T_(full_ids), T_(full_mask))
        self.gen_rest = (T_(a["batch/gen_ids"]), T_(a["batch/gen_mask"]))
        self.layout = tuple(T_(x) for x in (cls_sel, tok_sel, sep_sel, enc_mask))
        self.labels, self.seed = T_(a["batch/labels"]), T_(np.int64(case.seed))

        w = type("W", (), case.weights)
        self.gen_loss = GeneratorLoss(self.gen, self.teacher, self.student, self.P, self.T,
                                      case.teacher_cfg["num_labels"], w,
                                      case.kd_temperature, case.tau)
        self.stu_loss = StudentLoss(self.student, case.kd_temperature, case.alpha,
                                    self.student.config.hidden_size, self.teacher.config.hidden_size)
        if self.stu_loss.proj is not None:
            self.stu_loss.proj.weight.set_data(T_(a["proj/weight"]))
            self.stu_loss.proj.bias.set_data(T_(a["proj/bias"]))
        self.stu_params = self.stu_loss.trainable_params()
        self.sbatch = tuple(T_(a[f"sbatch/{k}"]) for k in ("teacher_ids", "teacher_mask", "student_ids",
                                                            "student_mask"))
        P, T, frozen, teacher = self.P, self.T, self.frozen, self.teacher
        from mindspore import ops

        def frozen_fwd(ids, mask):
            return ops.stop_gradient(frozen(input_ids=ids, attention_mask=mask)[:, P - 1:P - 1 + T, :])

        def teacher_fwd(ids, mask):
            lo, fe = teacher(input_ids=ids, attention_mask=mask, return_features=True)
            return ops.stop_gradient(lo), ops.stop_gradient(fe)

        self.frozen_fwd = self._jit(frozen_fwd)
        self.teacher_fwd = self._jit(teacher_fwd)
        self._gen_grad = self._jit(self._grad_fn(self.gen_loss, self.gen_params))
        self._stu_grad = self._jit(self._grad_fn(self.stu_loss, self.stu_params))
        self._gen_step = self._stu_step = None

    def _jit(self, fn):
        return self.ms.jit(fn) if self.jit else fn

    def _grad_fn(self, cell, params):
        grad_fn = self.ms.value_and_grad(cell, None, params, has_aux=True)

        def fn(*inputs):
            (loss, *aux), grads = grad_fn(*inputs)
            return loss, aux, grads
        return fn

    def _gen_inputs(self):
        B = self.gen_rest[0].shape[0]
        frozen = self.frozen_fwd(*self.full)
        return (*self.full, *self.gen_rest, frozen.reshape(B * self.T, -1), self.labels, self.seed,
                *self.tables, *self.specials, *self.layout)

    def _stu_inputs(self):
        t_logits, t_feat = self.teacher_fwd(*self.sbatch[:2])
        return (*self.sbatch[2:], t_logits, t_feat)

    def generator_losses_and_grads(self):
        """({term: float}, teacher logits, {param name: grad}) for the generator step."""
        loss, (spec, div, adv, flu, t_logits, _), grads = self._gen_grad(*self._gen_inputs())
        terms = {"total": loss, "spec": spec, "div": div, "adv": adv, "flu": flu}
        return ({k: float(v.asnumpy()) for k, v in terms.items()}, t_logits.asnumpy(),
                self._named(self.gen, self.gen_params, grads))

    def student_losses_and_grads(self):
        loss, _, grads = self._stu_grad(*self._stu_inputs())
        return {"total": float(loss.asnumpy())}, self._named(self.stu_loss, self.stu_params, grads)

    @staticmethod
    def _named(cell, params, grads):
        names = {id(p): n for n, p in cell.parameters_and_names()}
        return {names[id(p)]: g.asnumpy() for p, g in zip(params, grads)}

    # --- timing pieces (benchmark profile): each returns after the result is on the host ----------
    def frozen_forward(self):
        return float(self.frozen_fwd(*self.full)[0, 0, 0].asnumpy())

    def generator_forward(self):
        """The generator loss without gradients (G0 forward included, as in the step)."""
        if not hasattr(self, "_gen_fwd"):
            loss_cell = self.gen_loss

            def loss_only(*inputs):
                return loss_cell(*inputs)[0]
            self._gen_fwd = self._jit(loss_only)
        return float(self._gen_fwd(*self._gen_inputs()).asnumpy())

    def generator_grad(self):
        """Loss and gradients, no optimizer update."""
        loss, _, grads = self._gen_grad(*self._gen_inputs())
        grads[-1].asnumpy()
        return float(loss.asnumpy())

    def sample(self, eos_id=-1):
        from ms_dfkd.models.llama_sampling import sample
        a = self.case.arrays
        ids, _ = sample(self.frozen, a["batch/prompt_ids"], a["batch/prompt_mask"], self.T, self.case.seed,
                        temperature=1.0, eos_id=eos_id, graph=self.jit)
        return ids

    # --- full steps with the optimizer, as ms_dfkd's driver runs them ---------------------------
    def generator_step(self):
        from kernels import adam_weight_decay
        from ms_dfkd.steps import make_train_step
        if self._gen_step is None:
            opt = adam_weight_decay(self.gen_params, learning_rate=self.case.lr_g, weight_decay=0.0)
            self._gen_step = make_train_step(self.gen_loss, opt, jit=self.jit)
        return float(self._gen_step(*self._gen_inputs())[0].asnumpy())

    def student_step(self):
        from kernels import adam_weight_decay
        from ms_dfkd.steps import make_train_step
        if self._stu_step is None:
            opt = adam_weight_decay(self.stu_params, learning_rate=self.case.lr_s, weight_decay=0.01)
            self._stu_step = make_train_step(self.stu_loss, opt, jit=self.jit)
        return float(self._stu_step(*self._stu_inputs())[0].asnumpy())
