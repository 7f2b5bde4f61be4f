"""The results table of ms-dfkd: every method of docs/METHOD.md on real weights, fully offline.

    python scripts/reproduce_results.py [--quick] [--config PROFILE.yaml] [--out runs/results] [--render-only]

The profile (configs/results_full.yaml, or configs/results_quick.yaml with --quick) is an ms-dfkd config:
every run of the table is `ms-dfkd distill --config PROFILE --run.method M --run.seed S`, and its
`results` section gives the seeds and the transfer student.

Resumable: each (method, seed) is its own run folder with its own checkpoint; a finished run
(final.json present) is not run again, an unfinished one resumes. Writes RESULTS.md (or
RESULTS_quick.md) and a PNG of student dev accuracy against samples seen, from the run
folders alone, so rerunning only re-renders what is already done.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["random", "corpus", "prompted", "dfkd-t3", "real"]



def table_rows(prof):
    """(folder prefix, row name, run.method, extra distill overrides) of every row of the table, in order:
    the five methods, and with results.min_confidence the two generative ones with the teacher-confidence
    filter (run.min_confidence) after each."""
    rows = []
    for m in METHODS:
        rows.append((m, m, m, []))
        if m in ("prompted", "dfkd-t3") and prof.results.min_confidence:
            rows.append((f"{m}_filter", f"{m} + filter", m,
                         ["--run.min_confidence", repr(prof.results.min_confidence)]))
    return rows


PROFILES = {"quick": ROOT / "configs" / "results_quick.yaml", "full": ROOT / "configs" / "results_full.yaml"}


def load_profile(path):
    """The results profile: an ms-dfkd config whose `results` section holds the seeds and transfer settings."""
    from ms_dfkd.config import load_config
    return load_config(path)


def sh(args, log):
    """Run an ms-dfkd command, its output appended to log; raise with the log's tail on failure."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        r = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                           env={**os.environ, "GLOG_v": "3"})
    if r.returncode:
        tail = Path(log).read_text()[-2000:]
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(args)}\n--- {log} tail ---\n{tail}")


class WallTimes:
    """Seconds spent per step of the table (teacher, each run, each transfer), added up over every
    invocation and kept in wall_s.json, so that a table finished across resumed invocations still says
    what it cost in all. A step cut short counts too: its resume continues that work."""

    def __init__(self, path):
        self.path = Path(path)
        self.s = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, key, args, log):
        """sh(args, log), timed; returns the seconds it took."""
        t0 = time.time()
        try:
            sh(args, log)
        finally:
            took = time.time() - t0
            self.s[key] = self.s.get(key, 0.0) + took
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.s, indent=1))
            os.replace(tmp, self.path)  # atomic: a Ctrl-C here leaves the old or the new file
        return took


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one seed, short runs (about 20 minutes)")
    ap.add_argument("--out", default=None, help="results folder (default runs/results[_quick])")
    ap.add_argument("--config", default=None, help="results profile (default configs/results_full.yaml, or "
                    "configs/results_quick.yaml with --quick)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite RESULTS.md and the PNG from the run folders as they are; run nothing")
    args = ap.parse_args()
    name = "quick" if args.quick else "full"
    profile = Path(args.config or PROFILES[name])
    try:
        prof = load_profile(profile)
    except ValueError as e:  # ConfigError: names the file or the key
        raise SystemExit(f"reproduce_results: {e}") from None
    out = Path(args.out or ROOT / "runs" / f"results_{name}")
    if args.render_only:  # reads the folder, creates nothing
        if not any(out.glob("*_seed*/final.json")):  # would overwrite the table with an empty one
            raise SystemExit(f"--render-only: no finished runs (*_seed*/final.json) in {out}")
        return render(out, prof, name, None, WallTimes(out / "wall_s.json").s)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    exe = [sys.executable, "-m", "ms_dfkd.cli"]
    teacher = out / "teacher.safetensors"
    common = ["--config", str(profile), "--teacher.checkpoint", str(teacher)]
    t_start = time.time()
    walls = WallTimes(out / "wall_s.json")
    print(f"[results] {name} profile, folder {out}, log {log}")
    walls.run("teacher", exe + ["train-teacher", *common], log)
    # the teacher's test accuracy, once: every run uses this teacher (runs skip it: run.teacher_test false)
    teacher_test = out / "teacher_test.json"
    if not teacher_test.exists():
        walls.run("teacher_test", exe + ["eval", *common, "--split", "test", "--json-out", str(teacher_test)], log)
    seeds = prof.results.seeds
    for seed in seeds:
        for key, _, method, extra in table_rows(prof):
            run = out / f"{key}_seed{seed}"
            if (run / "final.json").exists():
                print(f"[results] {run.name}: done, skipped")
                continue
            print(f"[results] {run.name} ...", flush=True)
            cmd = exe + ["distill", *common, "--run.method", method, *extra, "--run.seed", str(seed),
                         "--run.out_dir", str(run)]
            print(f"[results] {run.name}: {walls.run(run.name, cmd, log):.0f} s")
    # transfer: a second, different student from the saved texts of dfkd-t3 and prompted
    for method in ("dfkd-t3", "prompted"):
        for seed in seeds:
            dst = out / f"transfer_{method}_seed{seed}.json"
            if dst.exists():
                continue
            st = out / f"transfer_{method}_seed{seed}.safetensors"
            key = f"transfer_{method}_seed{seed}"
            transfer = ["--student.arch", prof.results.transfer_student]
            walls.run(key, exe + ["distill-from-texts", *common, *transfer, "--texts", str(out / f"{method}_seed{seed}"),
                                 "--out", str(st), "--steps", str(prof.results.transfer_steps),
                                 "--run.seed", str(seed)], log)
            walls.run(key, exe + ["eval", *common, *transfer, "--student", str(st),
                                 "--no-teacher", "--split", "test", "--json-out", str(dst)], log)
    render(out, prof, name, time.time() - t_start, walls.s)


def _mean_std(xs):
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def _budget_line(prof):
    """What one run of the table is, from its profile."""
    r, g = prof.run, prof.generator
    line = (f"Seeds: {prof.results.seeds}. Per run: {r.rounds} rounds x ({r.gen_steps_per_round} batches of "
            f"{g.batch_size} samples + {r.student_steps_per_round} student steps); dfkd-t3 generator lr {g.lr:g}.")
    if r.gen_warmup_steps:
        line += (f" dfkd-t3 first takes {r.gen_warmup_steps} generator-only warm-up steps (`run.gen_warmup_steps`),"
                 " whose samples no student sees.")
    return line


def _wall_line(wall, steps):
    """The table's cost: this invocation, and every step summed over all invocations (wall_s.json)."""
    line = ("Rendered with --render-only from the run folders." if wall is None else
            f"Wall time of this invocation: {wall / 60:.1f} min (runs already done are not rerun).")
    if steps:
        teacher = sum(v for k, v in steps.items() if k.startswith("teacher"))  # training and its test eval
        transfer = sum(v for k, v in steps.items() if k.startswith("transfer_"))
        runs = sum(steps.values()) - teacher - transfer
        line += (f" All steps, over every invocation: {sum(steps.values()) / 60:.1f} min (teacher "
                 f"{teacher / 60:.1f}, the distillation runs {runs / 60:.1f}, transfer "
                 f"{transfer / 60:.1f}).")
    return line


# the ordering target: each method above the next, by more than the seed std
ORDER = ["dfkd-t3", "prompted", "corpus", "random"]


def ordering(rows):
    """Per adjacent pair (higher, lower) of ORDER: the test-accuracy differences seed by seed (every
    method starts from the same student init for a seed), their mean, the larger of the two methods'
    seed stds, and whether the mean difference exceeds that std. rows: method -> {seed: accuracy}."""
    out = []
    for hi, lo in zip(ORDER, ORDER[1:]):
        seeds = sorted(set(rows.get(hi, {})) & set(rows.get(lo, {})))
        if not seeds:
            continue
        a, b = [rows[hi][s] for s in seeds], [rows[lo][s] for s in seeds]
        diffs = [x - y for x, y in zip(a, b)]
        std = max(statistics.stdev(a), statistics.stdev(b)) if len(seeds) > 1 else None
        mean = statistics.mean(diffs)
        out.append({"pair": (hi, lo), "diffs": diffs, "mean": mean, "std": std,
                    "met": std is not None and mean > std})
    return out


GEN_METRICS = ("specificity", "distinct_1", "distinct_2", "self_bleu", "perplexity_g0", "bridge_agreement",
               "acceptance", "gen_tokens_per_s", "round_s")


def render(out, prof, name, wall, steps=None, root=ROOT):
    """RESULTS.md (and the PNG) under root, from the run folders (nothing typed by hand)."""
    rows, gen, n_test = {}, {}, set()
    for key, method, _, _ in table_rows(prof):
        accs = {}
        for seed in prof.results.seeds:
            f = out / f"{key}_seed{seed}" / "final.json"
            if not f.exists():
                continue
            fin = json.loads(f.read_text())
            accs[seed] = fin["student_test"]["accuracy"]
            n_test.add(fin["student_test"].get("n"))
            metrics = [json.loads(l) for l in (f.parent / "metrics.jsonl").read_text().splitlines()]
            for m in metrics:
                if m.get("phase") == "warmup":  # generator-only steps before round 1: not the kept samples
                    continue
                for k in GEN_METRICS:
                    if k in m:
                        gen.setdefault((method, k), []).append(m[k])
        rows[method] = accs
    tt = out / "teacher_test.json"
    t = json.loads(tt.read_text())["teacher"]["accuracy"] if tt.exists() else float("nan")
    lines = [f"# Results ({name} profile)", "",
             "Written by `scripts/reproduce_results.py" + (" --quick" if name == "quick" else "") + "`; do not edit.",
             "Task: Rotten Tomatoes critic snippets (fresh = positive, rotten = negative), hash split 80/10/10.",
             "Teacher: MiniLM-L6 fine-tuned on train. Student: 3-layer MiniLM (ONNX weights), fresh head.",
             "Generator: SmolLM2-135M-Instruct. Corpus: BBC news + 2012 convention speeches.",
             _budget_line(prof),
             "Budgets and learning rates were chosen on dev (docs/EXPERIMENTS.md).",
             _wall_line(wall, steps), "",
             f"Teacher test accuracy: **{t:.4f}**", "",
             "| method | student test accuracy | per seed | share of teacher |", "|---|---|---|---|"]
    for method, accs in rows.items():
        share = f"{statistics.mean(accs.values()) / t:.1%}" if accs else "-"
        per_seed = ", ".join(f"{v:.4f}" for v in accs.values()) or "-"
        lines.append(f"| {method} | {_mean_std(list(accs.values()))} | {per_seed} | {share} |")
    pairs = ordering(rows) if len(prof.results.seeds) > 1 else []  # the targets are for the 3-seed table
    if pairs:
        lines += ["", "## Against the targets", "",
                  "Ordering: each method above the next by more than the seed std (here the larger of the "
                  "two methods' stds). The differences are paired by seed: for a seed, every method starts "
                  "from the same student init.", "",
                  "| pair | difference per seed | mean difference | larger seed std | met |", "|---|---|---|---|---|"]
        for d in pairs:
            std = f"{d['std']:.4f}" if d["std"] is not None else "- (one seed)"
            lines.append(f"| {d['pair'][0]} − {d['pair'][1]} | {', '.join(f'{x:+.4f}' for x in d['diffs'])} | "
                         f"{d['mean']:+.4f} | {std} | {'yes' if d['met'] else 'no'} |")
    if pairs and rows.get("dfkd-t3") and not math.isnan(t):  # t is NaN without a teacher test
        share = statistics.mean(rows["dfkd-t3"].values()) / t
        lines += ["", f"Share of the teacher's test accuracy recovered by dfkd-t3: {share:.1%} "
                      f"(target at least 90%, aim 95%): {'met' if share >= 0.9 else 'not met'}."]
    n_test.discard(None)
    if len(n_test) == 1:
        n = n_test.pop()
        p_acc = statistics.mean(v for accs in rows.values() for v in accs.values())
        lines += ["", f"The test split has {n} snippets: one snippet is {1 / n:.4f} of accuracy, and the "
                      f"binomial standard error of one accuracy near {p_acc:.2f} is "
                      f"{math.sqrt(p_acc * (1 - p_acc) / n):.4f}."]
    lines += ["", "## Generation metrics (mean over rounds and seeds)", "",
              "| method | specificity | distinct-1 | distinct-2 | self-BLEU | ppl under G0 | bridge agreement | "
              "acceptance | gen tok/s | round s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for _, method, _, _ in table_rows(prof):
        cells = []
        for k in GEN_METRICS:
            v = gen.get((method, k))
            cells.append(f"{statistics.mean(v):.3f}" if v else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "## Transfer: a second student (first 2 layers of MiniLM-L6) from saved texts", "",
              "| texts from | student-2 test accuracy |", "|---|---|"]
    for method in ("dfkd-t3", "prompted"):
        accs = []
        for seed in prof.results.seeds:
            f = out / f"transfer_{method}_seed{seed}.json"
            if f.exists():
                accs.append(json.loads(f.read_text())["student"]["accuracy"])
        lines.append(f"| {method} | {_mean_std(accs)} |")
    lines += ["", "## Generated texts, seed 0 (last five per label)", ""]
    for method in ("prompted", "dfkd-t3"):
        f = out / f"{method}_seed0" / "final.json"
        if f.exists():
            lines.append(f"### {method}")
            for label, texts in json.loads(f.read_text())["samples"].items():
                lines.append(f"- **{label}**")
                lines += [f"  - {t!r}" for t in texts]
            lines.append("")
    png = plot(out, prof, root)
    if png:
        lines += ["", f"![student dev accuracy]({os.path.relpath(png, root)})"]
    dst = root / ("RESULTS.md" if name == "full" else "RESULTS_quick.md")
    dst.write_text("\n".join(lines) + "\n")
    print(f"[results] wrote {dst}")


def plot(out, prof, root=ROOT):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    any_line = False
    for key, method, _, _ in table_rows(prof):
        f = out / f"{key}_seed0" / "metrics.jsonl"
        if not f.exists():
            continue
        pts = [(m["samples"], m["student_dev_accuracy"]) for m in map(json.loads, f.read_text().splitlines())
               if "student_dev_accuracy" in m]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
            any_line = True
    if not any_line:
        return None
    ax.set_xlabel("generated or drawn samples")
    ax.set_ylabel("student dev accuracy")
    ax.legend()
    ax.grid(alpha=0.3)
    png = root / f"results_{'full' if len(prof.results.seeds) > 1 else 'quick'}_dev_accuracy.png"
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return png


if __name__ == "__main__":
    main()
