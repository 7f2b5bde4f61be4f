"""ms-dfkd command line: train-teacher, distill, generate, distill-from-texts, select-passages, eval, inspect.

Every subcommand takes --config FILE and any number of --section.key value overrides.
"""
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("ms_dfkd")


def _setup_logging(verbose=False):
    os.environ.setdefault("GLOG_v", "3")  # MindSpore's C++ log: errors only
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")


def _mode(cfg, device_target=None):
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE if cfg.run.mode == "graph" else ms.PYNATIVE_MODE)
    if device_target:
        try:
            ms.set_context(device_target=device_target)
        except RuntimeError as e:  # e.g. GPU asked of the CPU wheel: MindSpore's first line says so
            raise ValueError(f"--device-target {device_target}: {str(e).splitlines()[0]}") from None
        if device_target != "CPU" and "DEVICE_ID" in os.environ:  # msrun and the standalone scripts set it
            ms.set_context(device_id=int(os.environ["DEVICE_ID"]))
    from .cpu_runtime import configure_runtime  # before the first op: see there
    configure_runtime(cfg.run.threads)
    ms.set_seed(cfg.run.seed)


def _load_cfg(args, extra):
    from .config import load_config, parse_overrides
    return load_config(args.config, parse_overrides(extra))


# ---------------------------------------------------------------------------------- subcommands

def cmd_train_teacher(cfg, args):
    """Fine-tune the teacher on task.train; cached: an existing checkpoint is kept unless --force."""
    if cfg.task.kind == "token":
        from . import token_cli
        return token_cli.train_teacher(cfg, args)
    import numpy as np
    from . import build
    from .classify import EncoderRunner, evaluate, train_classifier
    from .data import load_split
    path = build.teacher_checkpoint_path(cfg)
    if path.exists() and not args.force:
        log.info(f"teacher checkpoint exists, reusing it: {path} (--force retrains)")
        return {"checkpoint": str(path), "cached": True}
    train = load_split(cfg, "train")
    n = cfg.teacher.train_examples
    if n and n < len(train):
        idx = np.random.default_rng(cfg.run.seed).permutation(len(train))[:n]
        train = [train[i] for i in sorted(idx)]
    tok = build.teacher_tokenizer(cfg)
    model = build.build_teacher_arch(cfg)
    runner = EncoderRunner(model, tok, cfg.teacher.max_length, jit=cfg.run.mode == "graph")
    try:
        dev = load_split(cfg, "dev")
    except (FileNotFoundError, ValueError) as e:
        log.warning(f"no dev evaluation: {e}")
        dev = None
    curve = []

    def on_epoch_end(epoch):  # a dev curve, so that the number of epochs can be chosen from one run
        if dev is not None:
            r = evaluate(runner, dev, cfg.task.metric, progress="eval dev")
            curve.append({"epoch": epoch, **r})
            log.info(f"epoch {epoch}: dev {cfg.task.metric} {r[cfg.task.metric]:.4f}")

    log.info(f"training the {cfg.teacher.arch} teacher on {len(train)} examples of {cfg.task.train}")
    t0 = time.time()
    train_classifier(model, tok, train, max_length=cfg.teacher.max_length, batch_size=cfg.teacher.batch_size,
                     lr=cfg.teacher.lr, epochs=cfg.teacher.epochs, seed=cfg.run.seed, jit=cfg.run.mode == "graph",
                     on_epoch_end=on_epoch_end)
    model.set_train(False)
    res = {"train_s": round(time.time() - t0, 1), "train_examples": len(train)}
    if curve:
        # the last epoch's scores are the trained model's (dropout is off throughout training)
        res["dev"] = {k: v for k, v in curve[-1].items() if k != "epoch"}
        res["dev_by_epoch"] = curve
    build.save_teacher(model, cfg, extra={"dev": json.dumps(res.get("dev")),
                                          "dev_by_epoch": json.dumps(res.get("dev_by_epoch"))})
    res["checkpoint"] = str(path)
    log.info(f"teacher saved to {path}: {res}")
    return res


def _distiller_class(cfg):
    """train.Distiller, or for a token task (NER) token_distill.TokenDistiller."""
    if cfg.task.kind == "token":
        from .token_distill import TokenDistiller
        return TokenDistiller
    from .train import Distiller
    return Distiller


def cmd_distill(cfg, args):
    from . import distributed
    from .run_checkpoint import dump_parameters
    Distiller = _distiller_class(cfg)
    rank, world, reducer = 0, 1, None
    if distributed.launched_by_msrun():  # scripts/run_distributed.sh: one process per device
        rank, world = distributed.init_data_parallel()
        reducer = distributed.grad_reducer_factory(world) if world > 1 else None
    d = Distiller(cfg, rank=rank, world_size=world, grad_reducer_factory=reducer)
    t0 = time.time()
    hist = d.run(resume=not args.fresh)
    if args.dump_params:
        dump_parameters(d)
    if hist is None:
        return {"interrupted": True, "out_dir": str(d.out)}
    if rank > 0:  # rank 0 evaluates and reports
        return {"rank": rank, "out_dir": str(d.out)}
    report = d.final_report()
    report["wall_s"] = round(time.time() - t0, 1)
    report["out_dir"] = str(d.out)
    _print_report(cfg, report)
    return report


def _print_report(cfg, report):
    m = cfg.task.metric
    print()
    print(f"== {cfg.run.method} on {cfg.task.name} ({report.get('wall_s', '?')} s) ==")
    if "teacher_test" in report:
        print(f"teacher test {m}: {report['teacher_test'][m]:.4f}  (n={report['teacher_test']['n']})")
    if "student_test" in report:
        print(f"student test {m}: {report['student_test'][m]:.4f}  (n={report['student_test']['n']})")
    for label, texts in report.get("samples", {}).items():
        print(f"-- generated, target '{label}':")
        for t in texts:
            print(f"   {t!r}")
    print(f"run folder: {report['out_dir']}")


def cmd_generate(cfg, args):
    """Texts only: the (pretrained or a run's trained) generator rewrites corpus passages per label.

    Batch i's texts depend only on the settings and i (its passages are the stream's i-th batch, its noise
    a function of the seed and i), so a rerun after an interruption continues the file where it stopped,
    and a larger --num extends it; other settings are refused (``run_files.resume_output_file``)."""
    from .run_files import FileLock, JsonlWriter, resume_output_file
    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    out = Path(args.out)
    with FileLock(out.with_name(f".{out.name}.lock"), f"--out {out}", "choose another --out"):
        done = resume_output_file(out, _generate_settings(cfg, args))
        if done >= args.num:
            if done > args.num:
                raise ValueError(f"--out {out} already holds {done} texts, more than --num {args.num}; "
                                 f"choose another --out for a smaller set")
            log.info(f"{out} already holds its {done} texts; nothing to do")
            return {"out": str(out), "resumed_at": done}
        Distiller = _distiller_class(cfg)
        cfg.run.method = "prompted" if not args.from_run else "dfkd-t3"
        if args.from_run:
            cfg.run.out_dir = args.from_run
        d = Distiller(cfg)
        if args.from_run:
            d.load_checkpoint()
        B = cfg.generator.batch_size
        first = done // B
        for _ in range(first):  # the passages of the batches already written
            d.corpus_sampler.next_batch(B)
        if done:
            log.info(f"{out} holds {done} texts: continuing from batch {first}")
        w = JsonlWriter(out)
        from tqdm import tqdm
        for i in tqdm(range(first, -(-args.num // B)), desc="generate", unit="batch", initial=first,
                      total=-(-args.num // B)):
            s = d.generate_batch(10_000_000 + i)  # a noise stream of its own, apart from training steps
            probs = d.teacher_run.probs(s["texts"])
            recs = [{"text": t, "target": int(y), **d._teacher_fields(t, p)}
                    for t, y, p in zip(s["texts"], s["labels"], probs)]
            w.write(recs[max(done - i * B, 0):args.num - i * B])  # a batch written in part is completed
    log.info(f"wrote {args.num - done} texts to {out}" + (f" (it held {done})" if done else ""))
    return {"out": str(out), "resumed_at": done}


def _generate_settings(cfg, args):
    """What generate's texts depend on, recorded beside its output so that a rerun continues it only with
    the same (--num may grow)."""
    from .models.checkpoint_io import safetensors_metadata
    d = cfg.to_dict()
    settings = {sec: d[sec] for sec in ("task", "corpus", "teacher", "generator")}
    settings["run"] = {"seed": cfg.run.seed, "mode": cfg.run.mode}
    if args.from_run:
        ck = Path(args.from_run) / "checkpoint.safetensors"
        settings["from_run"] = {"folder": str(Path(args.from_run).resolve()),
                                "checkpoint_sha256": safetensors_metadata(ck).get("sha256") if ck.is_file() else None}
    return settings


def cmd_select_passages(cfg, args):
    """The corpus passages the teacher is most confident about, per label it predicts, written to a file that
    corpus.sources can name (file:PATH): passages chosen with the teacher alone, no task data."""
    import numpy as np
    from . import build
    from .classify import EncoderRunner
    from .corpus import Corpus, CorpusSampler, select_confident
    from .models.checkpoint_io import atomic_write
    if cfg.task.kind != "sequence":
        raise ValueError(f"select-passages: task.kind={cfg.task.kind!r}; it ranks passages by a sequence "
                         f"teacher's label probability (task.kind sequence)")
    if not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.max_passages < 0:
        raise ValueError(f"--max-passages must be >= 0 (0 = the whole corpus), got {args.max_passages}")
    out = Path(args.out)
    if out.suffix.lower() not in (".jsonl", ".txt"):
        raise ValueError(f"--out {out}: name a .jsonl (text and teacher probabilities) or .txt (one passage a "
                         f"line) file")
    corpus = Corpus(cfg.corpus.sources, cfg.corpus.min_words, cfg.corpus.max_words)
    n = min(args.max_passages or len(corpus), len(corpus))
    passages = CorpusSampler(corpus, cfg.run.seed).next_batch(n)  # the run's seeded order, first n
    runner = EncoderRunner(build.load_teacher(cfg), build.teacher_tokenizer(cfg), cfg.teacher.max_length,
                           jit=cfg.run.mode == "graph")
    probs = runner.probs(passages, progress="teacher on the corpus")
    keep = select_confident(probs, args.fraction)
    if out.suffix.lower() == ".jsonl":
        text = "".join(json.dumps({"text": passages[i], "teacher_probs": [round(float(x), 6) for x in probs[i]]})
                       + "\n" for i in keep)
    else:
        text = "".join(passages[i] + "\n" for i in keep)
    atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    names = cfg.task.label_names
    pred = probs.argmax(1)
    res = {"out": str(out), "scored": n, "kept": int(len(keep)),
           "kept_per_predicted_label": {names[y]: int((pred[keep] == y).sum()) for y in range(len(names))},
           "scored_per_predicted_label": {names[y]: int((pred == y).sum()) for y in range(len(names))},
           "min_kept_confidence": round(float(probs[keep, pred[keep]].min()), 4)}
    log.info(f"kept {res['kept']} of {n} passages in {out}; use it with --corpus.sources file:{out}")
    print(json.dumps(res, indent=2))
    return res


def cmd_distill_from_texts(cfg, args):
    """A new student from saved generated texts (their stored teacher probabilities are the targets)."""
    from . import build
    from .classify import EncoderRunner, evaluate
    from .data import load_split
    from .run_files import read_jsonl
    from .train import distill_from_texts
    if cfg.student.hidden_mse:
        # saved texts carry the teacher's probabilities only, not the features the MSE term needs
        raise ValueError(f"student.hidden_mse={cfg.student.hidden_mse}: distill-from-texts trains on the stored "
                         f"teacher probabilities and has no teacher features to match; set it to 0")
    recs = read_jsonl(args.texts)
    if not recs:
        raise ValueError(f"no records in {args.texts}")
    if cfg.task.kind == "token":
        from . import token_cli
        student, res = token_cli.distill_from_texts(cfg, args, recs)
        test_scores = lambda: token_cli.score_on_test(cfg, student)  # noqa: E731
    else:
        K = len(cfg.task.label_names)
        for i, r in enumerate(recs):
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise ValueError(f"{args.texts}: record {i} is not an object with a \"text\" string: "
                                 f"{str(r)[:80]!r}")
            probs = r.get("teacher_probs")
            if (not isinstance(probs, list) or len(probs) != K
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in probs)):
                raise ValueError(f"{args.texts}: record {i} has no {K}-class teacher_probs (K numbers)")
        steps = args.steps or cfg.run.rounds * cfg.run.student_steps_per_round
        student = distill_from_texts(cfg, recs, steps)
        res = {"steps": steps, "texts": len(recs)}
        test_scores = lambda: evaluate(  # noqa: E731
            EncoderRunner(student, build.student_tokenizer(cfg), cfg.student.max_length),
            load_split(cfg, "test"), cfg.task.metric)
    # saved before the test evaluation, so that a Ctrl-C or an error there does not lose the trained student
    res = {"checkpoint": str(save_student(cfg, student, args.out)), **res}
    try:
        res["student_test"] = test_scores()
    except (FileNotFoundError, ValueError) as e:
        log.warning(f"no test evaluation: {e}")
    print(json.dumps(res, indent=2))
    return res


def save_student(cfg, student, out):
    """Write a distill-from-texts student to ``out`` (.safetensors); returns its path."""
    from .models.checkpoint_io import save_safetensors, state_of
    out = Path(out)
    save_safetensors({"student/" + k: v for k, v in state_of(student).items()}, out,
                     metadata={"format": "ms-dfkd-student", "arch": cfg.student.arch})
    return out


def load_student_weights(cfg, path):
    """A student from a run folder (its checkpoint) or a distill-from-texts .safetensors file."""
    from . import build
    from .models.checkpoint_io import load_safetensors, load_state
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.safetensors"
    arrays = load_safetensors(path)
    student = build.build_student(cfg)
    names = dict(student.parameters_and_names())
    state = {}
    for k, v in arrays.items():
        if not k.startswith("student/"):
            continue
        name = k[len("student/"):]
        if name.startswith("student."):
            name = name[len("student."):]
        if name in names:
            state[name] = v
    load_state(student, state, source=str(path))
    return student


def _eval_sequence(cfg, args):
    from . import build
    from .classify import EncoderRunner, evaluate
    from .data import load_labelled_file, load_split
    rows = (load_labelled_file(args.file, cfg.task.label_names) if args.file else load_split(cfg, args.split))
    res = {}
    if not args.no_teacher:
        res["teacher"] = evaluate(EncoderRunner(build.load_teacher(cfg), build.teacher_tokenizer(cfg),
                                                cfg.teacher.max_length), rows, cfg.task.metric)
    if args.student:
        st = load_student_weights(cfg, args.student)
        res["student"] = evaluate(EncoderRunner(st, build.student_tokenizer(cfg), cfg.student.max_length), rows,
                                  cfg.task.metric)
    return res


def cmd_eval(cfg, args):
    if cfg.task.kind == "token":
        from . import token_cli
        res = token_cli.evaluate(cfg, args, load_student_weights)
    else:
        res = _eval_sequence(cfg, args)
    print(json.dumps(res, indent=2))
    if args.json_out:
        from .models.checkpoint_io import atomic_write
        atomic_write(args.json_out, lambda tmp: Path(tmp).write_text(json.dumps(res, indent=2)))
    return res


INSPECT_KEYS = ("phase", "warmup_steps", "round", "loss_g", "loss_spec", "loss_div", "loss_flu", "specificity",
                "bridge_agreement", "distinct_2", "self_bleu", "perplexity_g0", "loss_s")


def cmd_inspect(args):
    from .run_files import read_jsonl
    run = Path(args.run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    metrics = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    for m in metrics:
        keys = [k for k in INSPECT_KEYS if k in m]
        keys += [k for k in m if k.startswith("student_dev_")]
        print("  ".join(f"{k}={m[k]:.4g}" if isinstance(m[k], float) else f"{k}={m[k]}" for k in keys))
    recs = read_jsonl(run)  # merges per-rank shards generated*.jsonl
    print(f"{len(recs)} generated texts in {run}")
    by = {}
    for r in recs:
        by.setdefault(r.get("target", -1), []).append(r)
    for y, rs in sorted(by.items()):
        print(f"-- target {y} ({len(rs)} texts):")
        for r in rs[-args.n:]:
            p = r.get("teacher_probs")
            if "teacher_tags" in r:  # a token task's record: the word-pieces the teacher tagged as entities
                ents = [f"{pc}/{tg}" for pc, tg in zip(r.get("pieces", []), r["teacher_tags"]) if tg != "O"]
                print(f"   [{' '.join(ents) or 'no entity'}] {r['text']!r}")
                continue
            print(f"   [{'/'.join(f'{x:.2f}' for x in p) if p else '-'}] {r['text']!r}")
    return {"records": len(recs)}


# ---------------------------------------------------------------------------------- entry point

def build_parser():
    p = argparse.ArgumentParser(prog="ms-dfkd", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_cfg(name, help):
        s = sub.add_parser(name, help=help)
        s.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
        s.add_argument("-v", "--verbose", action="store_true")
        s.add_argument("--device-target", default=None, choices=["CPU", "GPU", "Ascend"],
                       help="MindSpore device (default: the one the installed MindSpore wheel targets)")
        return s
    s = with_cfg("train-teacher", "fine-tune the teacher classifier on task.train")
    s.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    s = with_cfg("distill", "run a method (run.method) and report the student's test metric")
    s.add_argument("--fresh", action="store_true", help="start a new run; refuses when run.out_dir already "
                                                        "holds a checkpoint (nothing is overwritten)")
    s.add_argument("--dump-params", action="store_true", help="also write this rank's final trainable "
                   "parameters to RUN_DIR/params.rank<r>.safetensors (to check that ranks agree)")
    s = with_cfg("generate", "generate texts only")
    s.add_argument("--num", type=int, default=32)
    s.add_argument("--out", required=True)
    s.add_argument("--from-run", default=None, help="use the trained generator of a dfkd-t3 run folder")
    s = with_cfg("distill-from-texts", "distil a new student from saved generated texts")
    s.add_argument("--texts", required=True, help="a generated*.jsonl file or a run folder")
    s.add_argument("--steps", type=int, default=0)
    s.add_argument("--out", required=True, help="student checkpoint (.safetensors)")
    s = with_cfg("select-passages", "keep the corpus passages the teacher is most confident about")
    s.add_argument("--out", required=True, help="a .jsonl or .txt file, for --corpus.sources file:OUT")
    s.add_argument("--fraction", type=float, default=0.2, help="share kept of the passages the teacher assigns "
                   "to each label (default 0.2)")
    s.add_argument("--max-passages", type=int, default=0, help="score only the first N passages of the seeded "
                   "corpus stream (default 0: all)")
    s = with_cfg("eval", "accuracy / MCC / F1 of the teacher and a student")
    s.add_argument("--split", default="test", choices=["train", "dev", "test"])
    s.add_argument("--file", default=None, help="a labelled .tsv/.csv/.jsonl file instead of a split (token "
                   "tasks: a BIO file, token<TAB>tag lines or CoNLL columns)")
    s.add_argument("--student", default=None, help="a run folder or a student .safetensors")
    s.add_argument("--no-teacher", action="store_true")
    s.add_argument("--json-out", default=None, help="also write the result to this JSON file")
    s = sub.add_parser("inspect", help="print the metrics and samples of a run")
    s.add_argument("run_dir")
    s.add_argument("-n", type=int, default=5, help="samples per label")
    s.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv=None):
    if argv is None:  # run as a program
        from .cpu_runtime import restart_with_huge_pages
        restart_with_huge_pages()  # malloc's huge pages first: a restart (see cpu_runtime)
        if os.environ.get("MS_ROLE") is None:
            # not under msrun (msrun stops all ranks on Ctrl-C itself): take Ctrl-C away from MindSpore's
            # own handler before mindspore is imported (see interrupts.py)
            from . import interrupts
            interrupts.install()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    from .config import ConfigError
    from .run_files import FileBusy
    try:
        if args.cmd == "inspect":
            if extra:
                parser.error(f"unexpected arguments: {extra}")
            cmd_inspect(args)
            return 0
        cfg = _load_cfg(args, extra)
        _mode(cfg, args.device_target)
        if args.cmd == "distill" and args.fresh:
            from .train import CKPT_NAME
            ck = Path(cfg.fmt(cfg.run.out_dir)) / CKPT_NAME
            if ck.exists():
                raise ConfigError(f"--fresh: {ck} exists and would be overwritten; choose another --run.out_dir "
                                  f"or remove it yourself")
        fn = {"train-teacher": cmd_train_teacher, "distill": cmd_distill, "generate": cmd_generate,
              "distill-from-texts": cmd_distill_from_texts, "select-passages": cmd_select_passages,
              "eval": cmd_eval}[args.cmd]
        result = fn(cfg, args)
        return 130 if isinstance(result, dict) and result.get("interrupted") else 0
    except (ConfigError, OSError, ValueError, FileBusy) as e:
        # a user's mistake or the machine's (a missing, unreadable, read-only or full path): one line
        # that names the key or the file, no traceback. OSError's text carries the path.
        print(f"ms-dfkd {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a non-finite loss: nothing was saved after the last good checkpoint
        print(f"ms-dfkd {args.cmd}: error: {e}; the run folder resumes from its last checkpoint", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = "; run the same command again to continue" if args.cmd == "generate" else ""
        print(f"ms-dfkd {args.cmd}: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
