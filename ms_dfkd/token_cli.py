"""The token-classification (NER, task.kind token) bodies of ``ms-dfkd train-teacher`` and ``ms-dfkd eval``.

cli.py branches here on task.kind. Scores are entity-level (metrics.entity_f1 through
token_classify.evaluate_tokens): micro F1 with precision, recall and support, and the same per type.
"""
import json
import logging
import time
from collections import Counter

import numpy as np

log = logging.getLogger("ms_dfkd")


def format_entity_scores(res, title):
    """Log lines of an entity_f1 result: micro P/R/F1, then one line per type."""
    lines = [f"{title}: entity micro F1 {res['micro_f1']:.4f} (P {res['precision']:.4f}, R {res['recall']:.4f}, "
             f"{res['support']} true / {res['predicted']} predicted entities, {res.get('n', '?')} sentences)"]
    for typ, r in res["per_type"].items():
        lines.append(f"  {typ:<12} F1 {r['f1']:.4f}  P {r['precision']:.4f}  R {r['recall']:.4f}  "
                     f"support {r['support']}")
    return "\n".join(lines)


def _type_counts(examples, tags):
    """{type: entities} over [(words, tag ids)], as metrics.bio_entities reads the tags."""
    from .metrics import bio_entities
    counts = Counter(e[0] for _, ids in examples for e in bio_entities([tags[i] for i in ids]))
    return {t[2:]: counts[t[2:]] for t in tags[1::2]}


def train_teacher(cfg, args):
    """Fine-tune a token-classification teacher on task.train, score it on task.dev after each epoch, and save
    it with its last dev scores (and the curve) in the checkpoint metadata. Cached like the sequence teacher."""
    from . import build
    from .ner_data import load_token_split
    from .token_classify import TokenEncoderRunner, evaluate_tokens, train_token_classifier
    path = build.teacher_checkpoint_path(cfg)
    if path.exists() and not args.force:
        log.info(f"teacher checkpoint exists, reusing it: {path} (--force retrains)")
        return {"checkpoint": str(path), "cached": True}
    tags = build.tag_names(cfg)
    train = load_token_split(cfg, "train")
    counts = _type_counts(train, tags)
    missing = [t for t, c in counts.items() if c == 0]
    if missing:
        raise ValueError(f"task.entity_types: {missing[0]!r} has no entity in task.train={cfg.task.train!r}, so "
                         f"the teacher cannot learn it; drop it from task.entity_types")
    n = cfg.teacher.train_examples
    if n and n < len(train):
        idx = np.random.default_rng(cfg.run.seed).permutation(len(train))[:n]
        train = [train[i] for i in sorted(idx)]
    try:
        dev = load_token_split(cfg, "dev")
    except (FileNotFoundError, ValueError) as e:
        log.warning(f"no dev evaluation: {e}")
        dev = None
    tok = build.teacher_tokenizer(cfg)
    model = build.build_teacher_arch(cfg)
    jit = cfg.run.mode == "graph"
    runner = TokenEncoderRunner(model, tok, cfg.teacher.max_length, jit=jit)
    curve, last = [], {}

    def on_epoch_end(epoch):
        if dev is not None:
            r = last[epoch] = evaluate_tokens(runner, dev, tags, progress="eval dev")
            curve.append({"epoch": epoch, "micro_f1": r["micro_f1"],
                          "per_type_f1": {t: v["f1"] for t, v in r["per_type"].items()}})
            log.info(f"epoch {epoch}: dev entity micro F1 {r['micro_f1']:.4f}")

    log.info(f"training the {cfg.teacher.arch} token teacher ({len(tags)} tags: {tags}) on {len(train)} "
             f"sentences of {cfg.task.train}; entities per type {_type_counts(train, tags)}")
    t0 = time.time()
    train_token_classifier(model, tok, train, max_length=cfg.teacher.max_length, batch_size=cfg.teacher.batch_size,
                           lr=cfg.teacher.lr, epochs=cfg.teacher.epochs, seed=cfg.run.seed, jit=jit,
                           on_epoch_end=on_epoch_end)
    model.set_train(False)
    res = {"train_s": round(time.time() - t0, 1), "train_examples": len(train)}
    if dev is not None:
        # the last epoch's scores are the trained model's (set_train(False) throughout: no dropout)
        res["dev"] = last.get(cfg.teacher.epochs) or evaluate_tokens(runner, dev, tags, progress="eval dev")
        res["dev_by_epoch"] = curve
        log.info(format_entity_scores(res["dev"], f"teacher dev ({cfg.task.dev})"))
    build.save_teacher(model, cfg, extra={"dev": json.dumps(res.get("dev")),
                                          "dev_by_epoch": json.dumps(res.get("dev_by_epoch"))})
    res["checkpoint"] = str(path)
    log.info(f"teacher saved to {path} ({res['train_s']} s of training)")
    return res


def load_rows(cfg, args):
    """[(words, tag ids)] of ``--file`` (a BIO file) or ``--split``."""
    from .ner_data import load_token_split, prepare, read_bio_file
    if args.file:
        rows = prepare(read_bio_file(args.file), cfg.task.entity_types)
        if not rows:
            raise ValueError(f"{args.file}: no sentences; expected token<TAB>tag lines (or CoNLL columns with "
                             f"the tag last), a blank line between sentences")
        return rows
    return load_token_split(cfg, args.split)


def evaluate(cfg, args, load_student_weights):
    """{teacher, student}: entity-level scores on the rows of ``load_rows``."""
    from . import build
    from .token_classify import TokenEncoderRunner, evaluate_tokens
    rows = load_rows(cfg, args)
    tags = build.tag_names(cfg)
    where = args.file or f"{args.split} ({getattr(cfg.task, args.split)})"
    res = {}
    if not args.no_teacher:
        runner = TokenEncoderRunner(build.load_teacher(cfg), build.teacher_tokenizer(cfg), cfg.teacher.max_length)
        res["teacher"] = evaluate_tokens(runner, rows, tags)
        log.info(format_entity_scores(res["teacher"], f"teacher on {where}"))
    if args.student:
        st = load_student_weights(cfg, args.student)
        runner = TokenEncoderRunner(st, build.student_tokenizer(cfg), cfg.student.max_length)
        res["student"] = evaluate_tokens(runner, rows, tags)
        log.info(format_entity_scores(res["student"], f"student on {where}"))
    return res


def distill_from_texts(cfg, args, records):
    """The token task's body of ``ms-dfkd distill-from-texts``: a new student from saved token records (their
    per-word-piece teacher probabilities are the targets); returns (student, {steps, texts})."""
    from . import build
    from .token_distill import check_shared_tokenizer, check_token_records, distill_from_texts as distill
    # the tokenizer check first: records labelled by another vocabulary would otherwise be named instead
    check_shared_tokenizer(build.teacher_tokenizer(cfg), build.student_tokenizer(cfg))
    check_token_records(records, args.texts, build.student_tokenizer(cfg), len(build.tag_names(cfg)))
    steps = args.steps or cfg.run.rounds * cfg.run.student_steps_per_round
    return distill(cfg, records, steps), {"steps": steps, "texts": len(records)}


def score_on_test(cfg, student):
    """A distill-from-texts token student's entity scores on the test split."""
    from .ner_data import load_token_split
    from .token_distill import score_student
    return score_student(cfg, student, load_token_split(cfg, "test"))
