"""Choose the teacher-confidence filter's threshold (run.min_confidence, results.min_confidence) on dev,
from the saved texts of one finished run:

    python scripts/choose_min_confidence.py --config configs/results_v2.yaml \
        --texts runs/results_v2/dfkd-t3_seed0 --thresholds 0 0.5 0.8 0.95 --steps 768

For each threshold, the texts whose stored teacher probability of their target label is at least it;
from those, the same number of texts for every threshold (--texts-per-student, default the number kept
at the highest), drawn at random, so that no student sees more texts than another; then one student per
--seeds seed, trained by distill-from-texts's step for --steps steps, and its dev accuracy. The test
split is not read. Prints a table; --save-students DIR keeps each student (DIR/t{threshold}_seed{seed}
.safetensors, for `ms-dfkd eval --student`). Other arguments are config overrides (--key value).

A proxy, which the table's reader should know: a filter run draws texts until it keeps its N, where
these students see a fixed subset of one run's texts.
"""
import argparse
import time
from pathlib import Path

import numpy as np

SUBSET_SEED = 12345  # the random subsets: the same for every student seed, so seeds vary only the student


def target_probs(records, num_labels, source):
    """The teacher's probability of each record's target label; SystemExit naming the first bad record."""
    out = []
    for i, r in enumerate(records):
        probs, target = (r.get("teacher_probs"), r.get("target")) if isinstance(r, dict) else (None, None)
        if (not isinstance(probs, list) or len(probs) != num_labels or isinstance(target, bool)
                or not isinstance(target, int) or not 0 <= target < num_labels or not isinstance(r.get("text"), str)):
            raise SystemExit(f"{source}: record {i} needs \"text\", an integer \"target\" below {num_labels} and "
                             f"{num_labels} \"teacher_probs\" (texts of a prompted or dfkd-t3 run): {str(r)[:80]!r}")
        out.append(float(probs[target]))
    return np.array(out)


def kept_subset(p_target, threshold, n, seed=SUBSET_SEED):
    """Indices of n records drawn without replacement from those with p_target >= threshold (sorted)."""
    kept = np.flatnonzero(p_target >= threshold)
    if n > len(kept):
        raise SystemExit(f"--texts-per-student {n}: only {len(kept)} texts are kept at threshold {threshold}")
    return np.sort(np.random.default_rng(seed).choice(kept, size=n, replace=False))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--texts", required=True, help="a run folder or a generated*.jsonl file")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.95])
    ap.add_argument("--texts-per-student", type=int, default=0,
                    help="texts each student sees (default: the number kept at the highest threshold)")
    ap.add_argument("--steps", type=int, default=0, help="student steps (default: the run's whole budget, "
                    "run.rounds x run.student_steps_per_round)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="student seeds (run.seed)")
    ap.add_argument("--save-students", default=None, help="a folder to keep each student in")
    args, rest = ap.parse_known_args(argv)

    import mindspore as ms
    from ms_dfkd import build
    from ms_dfkd.classify import EncoderRunner, evaluate
    from ms_dfkd.cli import save_student
    from ms_dfkd.config import load_config, parse_overrides
    from ms_dfkd.data import load_split
    from ms_dfkd.run_files import read_jsonl
    from ms_dfkd.train import distill_from_texts
    cfg = load_config(args.config, parse_overrides(rest))
    if cfg.task.kind != "sequence":
        raise SystemExit(f"choose_min_confidence: task.kind {cfg.task.kind}: the filter is built for sequence tasks")
    if args.steps < 0 or args.texts_per_student < 0 or min(args.seeds) < 0:
        raise SystemExit(f"--steps {args.steps}, --texts-per-student {args.texts_per_student}, --seeds "
                         f"{args.seeds}: none may be negative")
    bad = [t for t in args.thresholds if not 0 <= t < 1]
    if bad:
        raise SystemExit(f"--thresholds: each must be in [0, 1) as run.min_confidence, got {bad[0]}")
    if not Path(args.texts).exists():
        raise SystemExit(f"--texts {args.texts}: no such file or folder")
    records = read_jsonl(args.texts)
    if not records:
        raise SystemExit(f"--texts {args.texts}: no generated texts there")
    p_target = target_probs(records, len(cfg.task.label_names), args.texts)
    thresholds = sorted(set(args.thresholds))
    n = args.texts_per_student or int((p_target >= thresholds[-1]).sum())
    if n < 1:
        raise SystemExit(f"no text is kept at threshold {thresholds[-1]}: lower it")
    subsets = {t: kept_subset(p_target, t, n) for t in thresholds}  # every refusal before any training
    steps = args.steps or cfg.run.rounds * cfg.run.student_steps_per_round
    dev = load_split(cfg, "dev")
    save_dir = Path(args.save_students) if args.save_students else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
    ms.set_context(mode=ms.GRAPH_MODE if cfg.run.mode == "graph" else ms.PYNATIVE_MODE)
    from ms_dfkd.cpu_runtime import configure_runtime  # as ms-dfkd's command line sets it up
    configure_runtime(cfg.run.threads)

    tokenizer = build.student_tokenizer(cfg)
    rows = []
    for t in thresholds:
        subset = [records[i] for i in subsets[t]]
        accs = []
        for seed in args.seeds:
            cfg.run.seed = seed
            start = time.perf_counter()
            student = distill_from_texts(cfg, subset, steps)
            if save_dir:
                save_student(cfg, student, save_dir / f"t{t}_seed{seed}.safetensors")
            runner = EncoderRunner(student, tokenizer, cfg.student.max_length)
            accs.append(evaluate(runner, dev, cfg.task.metric)[cfg.task.metric])
            print(f"threshold {t}, seed {seed}: dev {cfg.task.metric} {accs[-1]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        rows.append((t, float((p_target >= t).mean()), accs))

    print(f"\n{len(records)} texts from {args.texts}; {n} texts and {steps} student steps a student; "
          f"dev {cfg.task.metric} ({len(dev)} examples)\n")
    print(f"| threshold | texts kept | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|---|" + "---|" * (len(args.seeds) + 1))
    for t, share, accs in rows:
        print(f"| {t} | {share:.1%} | " + " | ".join(f"{a:.4f}" for a in accs) + f" | {np.mean(accs):.4f} |")
    best = max(rows, key=lambda r: np.mean(r[2]))
    print(f"\nbest on dev: {best[0]} (mean {np.mean(best[2]):.4f})")
    return rows


if __name__ == "__main__":
    main()
