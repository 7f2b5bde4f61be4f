"""The DFKD-T3 driver for a token task (NER, task.kind token; docs/METHOD.md, "Token tasks (NER)").

TokenDistiller is train.Distiller with the token task's hooks: the generator's labels are entity types;
the generator step reads the teacher per position (token_steps.TokenGeneratorLoss); the teacher labels
each text's word-pieces; the student learns per word-piece (token_steps.TokenStudentStep, teacher and
student sharing the WordPiece tokenizer: positions align one to one); the student is scored by entity
micro F1. distill_from_texts is train.distill_from_texts for token records.
"""
import logging

import numpy as np
from tqdm import tqdm

from . import build
from .classify import EncoderRunner
from .config import ConfigError
from .ner_data import load_token_split
from .token_classify import TokenEncoderRunner, evaluate_tokens
from .token_steps import TokenGeneratorLoss, TokenStudentStep, b_tag_ids
from .train import Distiller

log = logging.getLogger("ms_dfkd")


def check_shared_tokenizer(t_tok, s_tok):
    """ConfigError unless teacher and student read the same WordPiece vocabulary: the token loop aligns
    their positions one to one (docs/METHOD.md) and has no word-level alignment between two tokenizers."""
    if s_tok is not t_tok and s_tok.backend.get_vocab() != t_tok.backend.get_vocab():
        raise ConfigError("student.arch: the student's tokenizer differs from the teacher's; token tasks need "
                          "the teacher's WordPiece vocabulary (aligning two tokenizers by word is not built)")


class TokenTeacherRunner(EncoderRunner):
    """EncoderRunner of a token teacher: logits [N, L, C] (and pooled features), zero outside each text's
    real word-pieces (position 0 is [CLS]): there every tag ties and the argmax is O."""

    def logits(self, texts, with_features=False, progress=None):
        texts = list(texts)
        out = super().logits(texts, with_features, progress)
        if not texts:
            return out
        lo, fe = out if with_features else (out, None)
        _, mask = self.encode(texts)
        n = mask.sum(1) - 2
        j = np.arange(lo.shape[1])[None, :]
        lo = lo * ((j >= 1) & (j <= n[:, None]))[..., None].astype(lo.dtype)
        return (lo, fe) if with_features else lo


def teacher_type(probs):
    """The entity type whose B- tag is most probable at some word-piece of probs [n, C]; 0 for n = 0."""
    probs = np.asarray(probs, np.float64)
    return int(probs[:, 1::2].max(0).argmax()) if len(probs) else 0


class TokenDistiller(Distiller):
    generator_loss_cls = TokenGeneratorLoss

    def _setup(self):
        # before the models load and the run folder is made: a config error should cost and touch nothing
        check_shared_tokenizer(build.teacher_tokenizer(self.cfg), build.student_tokenizer(self.cfg))
        super()._setup()
        self.tags = build.tag_names(self.cfg)
        self.teacher_run = TokenTeacherRunner(self.teacher, self.t_tok, self.cfg.teacher.max_length, jit=self.jit)
        self._teacher_words = None  # a TokenEncoderRunner of the teacher, built when the teacher is scored

    # ------------------------------------------------------------------ the token task's hooks
    def _student_runner(self):
        return TokenEncoderRunner(self.student, self.s_tok, self.cfg.student.max_length, jit=self.jit)

    def _make_student_step(self):
        cfg = self.cfg
        return TokenStudentStep(self.student, self.s_tok, cfg.student.max_length, cfg.student.batch_size,
                                cfg.student.lr, cfg.loss.kd_temperature, teacher=self.teacher, jit=self.jit,
                                grad_reducer_factory=self.reducer_factory)

    def _load_rows(self, which):
        return load_token_split(self.cfg, which)

    def _real_texts(self, n, step_id):
        """The teacher's train sentences, words joined by spaces, without their tags."""
        idx = self.data_rng.integers(0, len(self.real_examples), size=n)
        return [" ".join(self.real_examples[i][0]) for i in idx], np.full(n, -1), {}

    def _teacher_fields(self, text, probs):
        """The text's word-pieces (as the teacher read them, truncated to teacher.max_length), the teacher's tag
        probabilities at each, its argmax tags, and the type of its most probable B- tag."""
        ids = self.t_tok.encode(text, add_special_tokens=False)[:max(self.cfg.teacher.max_length - 2, 0)]
        p = np.asarray(probs)[1:1 + len(ids)]
        return {"pieces": [self.t_tok.id_to_token(i) for i in ids],
                "teacher_probs": [[round(float(x), 6) for x in row] for row in p],
                "teacher_tags": [self.tags[a] for a in p.argmax(-1)] if len(p) else [],
                "teacher_type": teacher_type(p)}

    def _replay_fields(self, rec):
        """The buffer (and so every checkpoint's header) keeps what the round report reads: a record's
        pieces and per-piece probabilities (kilobytes each) stay in generated.jsonl only."""
        return {k: v for k, v in rec.items() if k not in ("pieces", "teacher_probs", "teacher_tags")}

    def _predicted_label(self, rec):
        return int(rec["teacher_type"])

    def _label_stats(self, probs, labels, info):
        """Specificity rate: the share of samples whose teacher argmax tag is B-<target> at some word-piece;
        bridge agreement: the share for which that finding on the soft path is the same."""
        want = b_tag_ids(np.asarray(labels))[:, None]
        found = (probs.argmax(-1) == want).any(1)
        info["specificity"] = float(found.mean())
        if "soft_argmax" in info:  # [B, T+2] tags, O outside the generator tokens (TokenGeneratorLoss)
            info["bridge_agreement"] = float(np.mean((info.pop("soft_argmax") == want).any(1) == found))

    def _score(self, who, rows, progress=None):
        """Entity-level scores (metrics.entity_f1, words at their first sub-token), micro F1 as entity_f1."""
        if who == "teacher":
            if self._teacher_words is None:
                self._teacher_words = TokenEncoderRunner(self.teacher, self.t_tok, self.cfg.teacher.max_length,
                                                         jit=self.jit)
            runner = self._teacher_words
        else:
            runner = self.student_eval
        res = evaluate_tokens(runner, rows, self.tags, progress=progress)
        res["entity_f1"] = res["micro_f1"]
        return res


def check_token_records(records, texts_path, tokenizer, num_tags):
    """ValueError naming the record unless each has a "text" and per-word-piece "teacher_probs" rows of
    num_tags probabilities, no more rows than the text has word-pieces in the student's tokenizer."""
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str):
            raise ValueError(f"{texts_path}: record {i} is not an object with a \"text\" string: {str(r)[:80]!r}")
        p = r.get("teacher_probs")
        if (not isinstance(p, list) or not all(isinstance(row, list) and len(row) == num_tags for row in p)):
            raise ValueError(f"{texts_path}: record {i} has no per-word-piece teacher_probs of {num_tags} tags "
                             f"(a sequence task's texts, or another tag set?)")
        n = len(tokenizer.encode(r["text"], add_special_tokens=False))
        if len(p) > n:
            raise ValueError(f"{texts_path}: record {i} has {len(p)} teacher_probs rows but its text has {n} "
                             f"word-pieces: it was labelled with another tokenizer")


def distill_from_texts(cfg, records, steps):
    """A new token student trained by ``steps`` student steps on saved token records (check_token_records);
    the targets are the log of the stored per-word-piece probabilities. Batches are drawn with replacement,
    seeded by run.seed. Returns the student."""
    student = build.build_student(cfg)
    tok = build.student_tokenizer(cfg)
    check_shared_tokenizer(build.teacher_tokenizer(cfg), tok)
    step = TokenStudentStep(student, tok, cfg.student.max_length, cfg.student.batch_size, cfg.student.lr,
                            cfg.loss.kd_temperature, jit=cfg.run.mode == "graph")
    texts = [r["text"] for r in records]
    counts = np.array([len(r["teacher_probs"]) for r in records])
    C = len(build.tag_names(cfg))
    t_logits = np.zeros((len(records), int(counts.max()) + 2, C), np.float32)  # [CLS] at 0, as the teacher's
    for i, r in enumerate(records):
        if counts[i]:
            t_logits[i, 1:1 + counts[i]] = np.log(np.clip(np.array(r["teacher_probs"], np.float32), 1e-8, 1.0))
    rng = np.random.default_rng(cfg.run.seed)
    bar = tqdm(range(steps), desc="distill-from-texts", unit="step")
    for i in bar:
        idx = rng.integers(0, len(records), size=cfg.student.batch_size)
        loss = step([texts[j] for j in idx], t_logits[idx], what=f"distill-from-texts step {i}",
                    teacher_counts=counts[idx])
        bar.set_postfix(loss=f"{loss:.3f}")
    return student


def score_student(cfg, student, rows):
    """Entity-level scores of a token student on [(words, tag ids)], micro F1 also as entity_f1."""
    res = evaluate_tokens(TokenEncoderRunner(student, build.student_tokenizer(cfg), cfg.student.max_length),
                          rows, build.tag_names(cfg))
    res["entity_f1"] = res["micro_f1"]
    return res

