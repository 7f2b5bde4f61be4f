"""The results table of ms-dfkd: every method of docs/METHOD.md on real weights, fully offline.

    python scripts/reproduce_results.py [--task sentiment|ner] [--quick] [--config PROFILE.yaml]
                                        [--out runs/results] [--render-only]

The profile (configs/results_full.yaml, or configs/results_quick.yaml with --quick; with --task ner,
configs/results_ner.yaml or configs/results_ner_quick.yaml) is an ms-dfkd config: every run of the table is
`ms-dfkd distill --config PROFILE --run.method M --run.seed S`, and its `results` section gives the seeds
and the transfer student. The sentiment table is RESULTS.md (RESULTS_quick.md with --quick); the NER table
is its own section at the end of the same file, each rewritten without touching the other.

Resumable: each (method, seed) is its own run folder with its own checkpoint; a finished run
(final.json present) is not run again, an unfinished one resumes. Writes RESULTS.md (or
RESULTS_quick.md) and a PNG of student dev accuracy against samples seen, from the run
folders alone, so rerunning only re-renders what is already done.
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # its sibling module, also where the tests load this file by path
from results_generator_phase import generator_phase_lines  # noqa: E402


GENERATIVE = ("prompted", "dfkd-t3")


def table_rows(prof):
    """(folder prefix, row name, run.method, extra distill overrides) of every row of the table, in order:
    the methods of results.methods (all five by default), and with results.min_confidence the two generative
    ones with the teacher-confidence filter (run.min_confidence) after each. With results.compare_generators,
    the generative rows again with each of those generators (folders prompted_ARCH, ...), and every generative
    row's name says its generator."""
    compare = prof.results.compare_generators
    rows = []
    for m in prof.results.methods:
        name = generative_row(prof, m, prof.generator.arch) if m in GENERATIVE else m
        rows.append((m, name, m, []))
        if m in GENERATIVE and prof.results.min_confidence:
            rows.append((f"{m}_filter", f"{name} + filter", m,
                         ["--run.min_confidence", repr(prof.results.min_confidence)]))
    for arch in compare:
        rows += [(f"{m}_{arch}", generative_row(prof, m, arch), m, ["--generator.arch", arch])
                 for m in prof.results.methods if m in GENERATIVE]
    return rows


def generative_row(prof, method, arch):
    """The row name of a generative method: the method, and with results.compare_generators its generator."""
    return f"{method}, {GENERATOR_SHORT.get(arch, arch)}" if prof.results.compare_generators else method


def row_pairs(prof):
    """The (higher, lower) row pairs the targets compare: each method above the next of ORDER; with
    results.compare_generators, dfkd-t3 above prompted for each generator, then the profile's generator above
    each compared one, method by method."""
    if not prof.results.compare_generators:
        return list(zip(ORDER, ORDER[1:]))
    archs = [prof.generator.arch, *prof.results.compare_generators]
    pairs = [(generative_row(prof, "dfkd-t3", a), generative_row(prof, "prompted", a)) for a in archs]
    return pairs + [(generative_row(prof, m, archs[0]), generative_row(prof, m, a))
                    for a in archs[1:] for m in GENERATIVE]


def run_order(prof):
    """(folder prefix, seed, run.method, extra overrides) of every distillation run, seed by seed in the table's
    row order; with results.share_generator_phase the run that trains the generator phase goes first (the other
    dfkd-t3 runs start from it, and its curve decides whether the rest is worth running)."""
    runs = [(key, seed, method, extra) for seed in prof.results.seeds for key, _, method, extra in table_rows(prof)]
    if prof.results.share_generator_phase:
        runs.sort(key=lambda r: (r[0], r[1]) != ("dfkd-t3", prof.results.seeds[0]))  # stable: the rest keep order
    return runs


def shared_generator_phase(prof, out, key, seed):
    """With results.share_generator_phase, the overrides that start a dfkd-t3 row's run from the generator phase
    of the first seed's dfkd-t3 run (that run trains it; its folder must be finished first, which the order of
    the runs ensures)."""
    first = out / f"dfkd-t3_seed{prof.results.seeds[0]}"
    if not key.startswith("dfkd-t3"):  # only dfkd-t3 has a generator phase; the profile's steps are its
        return ["--run.gen_warmup_steps", "0"] if prof.run.gen_warmup_steps else []
    if not prof.results.share_generator_phase or not key.startswith("dfkd-t3") or (
            key == "dfkd-t3" and seed == prof.results.seeds[0]):
        return []
    return ["--run.generator_from", str(first), "--run.gen_warmup_steps", "0"]


PROFILES = {"quick": ROOT / "configs" / "results_quick.yaml", "full": ROOT / "configs" / "results_full.yaml"}
NER_PROFILES = {"quick": ROOT / "configs" / "results_ner_quick.yaml", "full": ROOT / "configs" / "results_ner.yaml"}
# A results file is the task's own table, then named sections (the NER table; a profile with results.section),
# each beginning at a marker line of this form.
SECTION_MARK = "<!-- {name} section: written by scripts/reproduce_results.py {how} -->"
MARK_RE = re.compile(r"^<!-- (\w+) section: written by scripts/reproduce_results\.py.*-->$", re.M)
NER_MARK = SECTION_MARK.format(name="NER", how="--task ner")
# the header's name of a generator.arch
GENERATOR_SHORT = {"smollm2": "SmolLM2-135M", "qwen2.5-coder-0.5b": "Qwen2.5-0.5B", "qwen2.5-coder-1.5b": "Qwen2.5-1.5B"}
GENERATOR_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M)",
                   "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)"}


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
    ap.add_argument("--task", choices=["sentiment", "ner"], default="sentiment",
                    help="the table: sentiment (Rotten Tomatoes, default) or ner (WNUT-16 Twitter NER)")
    ap.add_argument("--quick", action="store_true", help="one seed, short runs (about 20 minutes)")
    ap.add_argument("--out", default=None, help="results folder (default runs/ and the profile's file name: "
                    "runs/results_full, runs/results_quick, runs/results_ner, ...)")
    ap.add_argument("--config", default=None, help="results profile (default configs/results_full.yaml, or "
                    "configs/results_quick.yaml with --quick; configs/results_ner[_quick].yaml with --task ner)")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite RESULTS.md and the PNG from the run folders as they are; run nothing")
    args = ap.parse_args()
    name = "quick" if args.quick else "full"
    profile = Path(args.config or (NER_PROFILES if args.task == "ner" else PROFILES)[name])
    try:
        prof = load_profile(profile)
    except ValueError as e:  # ConfigError: names the file or the key
        raise SystemExit(f"reproduce_results: {e}") from None
    from ms_dfkd.build import GENERATOR_ARCHS
    for arch in prof.results.compare_generators:
        if arch not in GENERATOR_ARCHS or arch == prof.generator.arch:
            raise SystemExit(f"reproduce_results: {profile}: results.compare_generators: {arch!r} is not another "
                             f"generator.arch than {prof.generator.arch!r} ({' | '.join(GENERATOR_ARCHS)})")
    if (prof.task.kind == "token") != (args.task == "ner"):
        raise SystemExit(f"reproduce_results: {profile} is a {prof.task.kind} task's profile; --task {args.task} "
                         f"needs a {'token' if args.task == 'ner' else 'sequence'} one")
    out = Path(args.out or ROOT / "runs" / profile.stem)
    if args.render_only:  # reads the folder, creates nothing
        if not any(out.glob("*_seed*/final.json")):  # would overwrite the table with an empty one
            raise SystemExit(f"--render-only: no finished runs (*_seed*/final.json) in {out}")
        return render(out, prof, name, None, WallTimes(out / "wall_s.json").s, how=_how(args))
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
    for key, seed, method, extra in run_order(prof):
        run = out / f"{key}_seed{seed}"
        if (run / "final.json").exists():
            print(f"[results] {run.name}: done, skipped")
            continue
        print(f"[results] {run.name} ...", flush=True)
        cmd = exe + ["distill", *common, "--run.method", method, *extra, "--run.seed", str(seed),
                     "--run.out_dir", str(run), *shared_generator_phase(prof, out, key, seed)]
        print(f"[results] {run.name}: {walls.run(run.name, cmd, log):.0f} s")
    # transfer: a second, different student from the saved texts of dfkd-t3 and prompted
    for method in ("dfkd-t3", "prompted") if prof.results.transfer_steps else ():
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
    render(out, prof, name, time.time() - t_start, walls.s, how=_how(args))


def _how(args):
    """The command line that makes a table, as its header and section marker say it."""
    return " ".join(["--task ner"] * (args.task == "ner") + ["--quick"] * args.quick +
                    [f"--config {args.config}"] * bool(args.config))


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
    if r.gen_warmup_steps and r.schedule == "two_phase":
        line += (f" Two phases: dfkd-t3's generator trains for {r.gen_warmup_steps} steps first, then every method's"
                 " samples are drawn without gradient and the student trains on them.")
        if prof.results.share_generator_phase:
            line += (f" The generator phase is trained once, by the seed-{prof.results.seeds[0]} dfkd-t3 run; every"
                     " other dfkd-t3 run starts from it and draws its own seed's passages and noise.")
    elif r.gen_warmup_steps:
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


def ordering(rows, pairs=None):
    """Per pair (higher, lower) of row names (default: each adjacent pair of ORDER): the test-accuracy
    differences seed by seed (every method starts from the same student init for a seed), their mean, the
    larger of the two methods' seed stds, and whether the mean difference exceeds that std.
    rows: row name -> {seed: accuracy}."""
    out = []
    for hi, lo in pairs or zip(ORDER, ORDER[1:]):
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


# what the table's header says of each task (the profiles' task.name)
TASK_LINES = {
    "sequence": ["Task: Rotten Tomatoes critic snippets (fresh = positive, rotten = negative), hash split 80/10/10.",
                 "Teacher: MiniLM-L6 fine-tuned on train. Student: {student}, fresh head."],
    "token": ["Task: named entities in tweets (WNUT-16's train set, hash split 80/10/10 by tweet), entity types "
              "{types}; the other types are read as O. Score: entity-level micro F1 (exact span and type, BIO).",
              "Teacher: MiniLM-L6 with a token head, fine-tuned on train. Student: {student}, "
              "fresh token head, learning at every word-piece from the teacher's tag distribution."],
}


def student_words(arch):
    """The header's name of a student.arch."""
    if arch.startswith("minilm_l6_layers:"):
        return f"the first {arch.split(':')[1]} layers of MiniLM-L6"
    return {"minilm_l3_onnx": "3-layer MiniLM (ONNX weights)"}.get(arch, arch)


# the share of the teacher's score that dfkd-t3's student should recover, per task kind
SHARE_TARGET = {"sequence": "target at least 90%, aim 95%", "token": "target at least 60%"}
SHARE_MIN = {"sequence": 0.9, "token": 0.6}


def render(out, prof, name, wall, steps=None, root=ROOT, how=""):
    """The results file under root (RESULTS.md, or RESULTS_quick.md for the quick profile; a token task's table
    is that file's NER section, a profile with results.section its own section) and the PNG, from the run
    folders (nothing typed by hand). how: the script's arguments, for the header."""
    kind = prof.task.kind
    metric = "micro_f1" if kind == "token" else prof.task.metric  # eval's JSON names entity F1 micro_f1
    label = "entity F1" if kind == "token" else metric
    rows, per_type, gen, n_test = {}, {}, {}, set()
    for key, method, _, _ in table_rows(prof):
        accs = {}
        for seed in prof.results.seeds:
            f = out / f"{key}_seed{seed}" / "final.json"
            if not f.exists():
                continue
            fin = json.loads(f.read_text())
            accs[seed] = fin["student_test"][metric]
            n_test.add(fin["student_test"].get("n"))
            for typ, v in fin["student_test"].get("per_type", {}).items():
                per_type.setdefault((method, typ), []).append(v["f1"])
            metrics = [json.loads(l) for l in (f.parent / "metrics.jsonl").read_text().splitlines()]
            for m in metrics:
                if m.get("phase") == "warmup":  # generator-only steps before round 1: not the kept samples
                    continue
                for k in GEN_METRICS:
                    if k in m:
                        gen.setdefault((method, k), []).append(m[k])
        rows[method] = accs
    tt = out / "teacher_test.json"
    teacher = json.loads(tt.read_text())["teacher"] if tt.exists() else {}
    t = teacher.get(metric, float("nan"))
    section = prof.results.section or ("NER" if kind == "token" else "")
    how = how or ("--task ner" if kind == "token" else "") + (" --quick" if name == "quick" else "")
    generator = GENERATOR_NAMES.get(prof.generator.arch, prof.generator.arch)
    compare = prof.results.compare_generators
    title = (f"# Results with {generator} as the generator" + "".join(
                 f" against {GENERATOR_NAMES.get(a, a)}" for a in compare) if prof.results.section else
             f"# NER results ({name} profile)" if kind == "token" else f"# Results ({name} profile)")
    lines = [title, "",
             "Written by `scripts/reproduce_results.py" + (f" {how}" if how else "") + "`; do not edit.",
             *(l.format(types=", ".join(prof.task.entity_types or []), student=student_words(prof.student.arch))
              for l in TASK_LINES[kind]),
             (f"Generator: {generator}." if not compare else "Generators: " + ", ".join(
                 f"{GENERATOR_NAMES.get(a, a)} (rows marked {GENERATOR_SHORT.get(a, a)})"
                 for a in [prof.generator.arch, *compare]) + ".") +
             " Corpus: BBC news + 2012 convention speeches.",
             _budget_line(prof),
             "Budgets and learning rates were chosen on dev (docs/EXPERIMENTS.md).",
             _wall_line(wall, steps), "",
             f"Teacher test {label}: **{t:.4f}**", ""]
    if kind == "token" and teacher.get("per_type"):
        types = list(prof.task.entity_types)
        lines += ["| teacher, per type | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|",
                  "| F1 (test entities) | " + " | ".join(
                      f"{teacher['per_type'][y]['f1']:.3f} ({teacher['per_type'][y]['support']})"
                      if y in teacher["per_type"] else "-" for y in types) + " |", ""]
    lines += [f"| method | student test {label} | per seed | share of teacher |", "|---|---|---|---|"]
    for method, accs in rows.items():
        share = f"{statistics.mean(accs.values()) / t:.1%}" if accs and t else "-"
        per_seed = ", ".join(f"{v:.4f}" for v in accs.values()) or "-"
        lines.append(f"| {method} | {_mean_std(list(accs.values()))} | {per_seed} | {share} |")
    if kind == "token" and per_type:
        types = list(prof.task.entity_types)
        lines += ["", "Student test F1 per entity type (mean over seeds):", "",
                  "| method | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
        for method in rows:
            cells = [f"{statistics.mean(per_type[(method, y)]):.3f}" if (method, y) in per_type else "-"
                     for y in types]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    # the targets are for the 3-seed table
    pairs = ordering(rows, row_pairs(prof)) if len(prof.results.seeds) > 1 else []
    if pairs:
        lines += ["", "## Against the targets" + (" (NER)" if kind == "token" else ""), "",
                  ("Ordering: each method above the next" if not compare else
                   "Each pair: the first row above the second") + " by more than the seed std (here the larger "
                  "of the two methods' stds). The differences are paired by seed: for a seed, every method "
                  "starts from the same student init.", "",
                  "| pair | difference per seed | mean difference | larger seed std | met |", "|---|---|---|---|---|"]
        for d in pairs:
            std = f"{d['std']:.4f}" if d["std"] is not None else "- (one seed)"
            lines.append(f"| {d['pair'][0]} − {d['pair'][1]} | {', '.join(f'{x:+.4f}' for x in d['diffs'])} | "
                         f"{d['mean']:+.4f} | {std} | {'yes' if d['met'] else 'no'} |")
    dfkd = generative_row(prof, "dfkd-t3", prof.generator.arch)
    if pairs and rows.get(dfkd) and t and not math.isnan(t):  # t is NaN without a teacher test
        share = statistics.mean(rows[dfkd].values()) / t
        lines += ["", f"Share of the teacher's test {label} recovered by dfkd-t3: {share:.1%} "
                      f"({SHARE_TARGET[kind]}): {'met' if share >= SHARE_MIN[kind] else 'not met'}."]
    n_test.discard(None)
    if len(n_test) == 1 and metric == "accuracy":
        n = n_test.pop()
        p_acc = statistics.mean(v for accs in rows.values() for v in accs.values())
        lines += ["", f"The test split has {n} snippets: one snippet is {1 / n:.4f} of accuracy, and the "
                      f"binomial standard error of one accuracy near {p_acc:.2f} is "
                      f"{math.sqrt(p_acc * (1 - p_acc) / n):.4f}."]
    elif len(n_test) == 1 and kind == "token":
        lines += ["", f"The test split has {n_test.pop()} tweets and {teacher.get('support', '?')} entities of "
                      "these types: one entity found or missed moves F1 by about "
                      f"{1 / max(teacher.get('support', 1), 1):.3f}."]
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
    second = student_words(prof.results.transfer_student)
    if prof.results.transfer_steps:
        lines += ["", f"## Transfer: a second student ({second}) from saved texts", "",
                  f"| texts from | student-2 test {label} |", "|---|---|"]
    for method in ("dfkd-t3", "prompted") if prof.results.transfer_steps else ():
        accs = []
        for seed in prof.results.seeds:
            f = out / f"transfer_{method}_seed{seed}.json"
            if f.exists():
                accs.append(json.loads(f.read_text())["student"][metric])
        lines.append(f"| {method} | {_mean_std(accs)} |")
    lines += generator_phase_lines(out, prof, name, root)
    lines += _sample_lines(out, prof)
    png = plot(out, prof, name, root)
    if png:
        lines += ["", f"![student dev {label}]({os.path.relpath(png, root)})"]
    dst = root / ("RESULTS.md" if name == "full" else "RESULTS_quick.md")
    mark = SECTION_MARK.format(name=section, how=how) if section else None
    write_section(dst, "\n".join(lines) + "\n", mark)
    print(f"[results] wrote {dst}" + (f" (its {section} section)" if section else ""))


def _sample_lines(out, prof):
    """Seed 0's last five texts per label; for a token task, per requested entity type from generated.jsonl,
    each with the word-pieces the teacher tagged as an entity."""
    if prof.task.kind != "token":
        lines = ["", "## Generated texts, seed 0 (last five per label)", ""]
        for key, name, method, extra in table_rows(prof):
            f = out / f"{key}_seed0" / "final.json"
            if method in GENERATIVE and "--run.min_confidence" not in extra and f.exists():
                lines.append(f"### {name}")
                for label, texts in json.loads(f.read_text())["samples"].items():
                    lines.append(f"- **{label}**")
                    lines += [f"  - {t!r}" for t in texts]
                lines.append("")
        return lines
    lines = ["", "## Generated texts, seed 0 (last five per requested entity type, with the teacher's tags)", ""]
    for method in ("prompted", "dfkd-t3"):
        f = out / f"{method}_seed0" / "generated.jsonl"
        if not f.exists():
            continue
        recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        lines.append(f"### {method}")
        for y, typ in enumerate(prof.task.label_names):
            lines.append(f"- **{typ}**")
            for r in [r for r in recs if r.get("target") == y][-5:]:
                tagged = ", ".join(f"{p} {t}" for p, t in zip(r.get("pieces", []), r.get("teacher_tags", []))
                                   if t != "O")
                lines.append(f"  - {r['text']!r}; teacher: {tagged or 'no entity'}")
        lines.append("")
    return lines


def write_section(dst, text, mark=None):
    """Write the task's own table (mark None: all of dst before the first section marker) or the section that
    begins at marker line mark (a new one goes last), keeping the rest of dst as it is."""
    old = dst.read_text() if dst.exists() else ""
    found = list(MARK_RE.finditer(old))
    head = old[:found[0].start()] if found else old
    sections = {m.group(1): [m.group(0), old[m.end():nxt.start() if nxt else len(old)]]
                for m, nxt in zip(found, found[1:] + [None])}  # name -> [marker line, text]
    if mark is None:
        head = text
    else:
        sections[MARK_RE.match(mark).group(1)] = [mark, text]
    parts = [head.rstrip("\n") + "\n"] if head.strip() else []
    parts += [f"{m}\n\n{body.strip(chr(10))}\n" for m, body in sections.values() if body.strip()]
    dst.write_text("\n".join(parts))


def plot(out, prof, name, root=ROOT):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key_dev = "student_dev_" + prof.task.metric
    fig, ax = plt.subplots(figsize=(6, 4))
    any_line = False
    for key, method, _, _ in table_rows(prof):
        f = out / f"{key}_seed0" / "metrics.jsonl"
        if not f.exists():
            continue
        pts = [(m["samples"], m[key_dev]) for m in map(json.loads, f.read_text().splitlines()) if key_dev in m]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
            any_line = True
    if not any_line:
        return None
    ax.set_xlabel("generated or drawn samples")
    ax.set_ylabel("student dev " + ("entity F1" if prof.task.kind == "token" else prof.task.metric))
    ax.legend()
    ax.grid(alpha=0.3)
    task = f"{prof.results.section}_" if prof.results.section else "ner_" if prof.task.kind == "token" else ""
    png = root / f"results_{task}{name}_dev_{prof.task.metric}.png"
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    return png


if __name__ == "__main__":
    main()
