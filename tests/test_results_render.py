"""scripts/reproduce_results.py's table from run folders: the per-seed accuracies, the ordering target
(paired differences against the larger seed std) and the share of the teacher, checked
against numbers worked out by hand for made-up run folders."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reproduce_results", ROOT / "scripts" / "reproduce_results.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)

# test accuracies per method and seed (n = 1000 test snippets)
ACC = {"random": [0.60, 0.70, 0.65], "corpus": [0.66, 0.67, 0.68], "prompted": [0.72, 0.70, 0.74],
       "dfkd-t3": [0.75, 0.76, 0.74], "real": [0.78, 0.78, 0.78]}


def _runs(out, acc=ACC, folder="{method}_seed{seed}", texts=("bad", "good"), metrics=lambda seed: ""):
    for method, accs in acc.items():
        for seed, a in enumerate(accs):
            run = out / folder.format(method=method, seed=seed)
            run.mkdir(parents=True)
            (run / "final.json").write_text(json.dumps({"student_test": {"accuracy": a, "n": 1000},
                                                        "samples": {"negative": [texts[0]], "positive": [texts[1]]}}))
            (run / "metrics.jsonl").write_text(metrics(seed))
    (out / "teacher_test.json").write_text(json.dumps({"teacher": {"accuracy": 0.80, "n": 1000}}))


def test_ordering_pairs_by_seed_against_the_larger_std():
    rows = {m: dict(enumerate(a)) for m, a in ACC.items()}
    got = {d["pair"]: d for d in R.ordering(rows)}
    assert list(got) == [("dfkd-t3", "prompted"), ("prompted", "corpus"), ("corpus", "random")]
    # dfkd-t3 - prompted: +0.03, +0.06, 0.00, mean 0.03; stds 0.01 and 0.02 -> 0.03 > 0.02, met
    d = got[("dfkd-t3", "prompted")]
    assert d["diffs"] == pytest.approx([0.03, 0.06, 0.0])
    assert d["mean"] == pytest.approx(0.03) and d["std"] == pytest.approx(0.02) and d["met"]
    # prompted - corpus: +0.06, +0.03, +0.06, mean 0.05 > 0.02 (prompted's std): met
    d = got[("prompted", "corpus")]
    assert d["mean"] == pytest.approx(0.05) and d["std"] == pytest.approx(0.02) and d["met"]
    # corpus - random: +0.06, -0.03, +0.03, mean 0.02; random's std 0.05: not met
    d = got[("corpus", "random")]
    assert d["diffs"] == pytest.approx([0.06, -0.03, 0.03])
    assert d["mean"] == pytest.approx(0.02) and d["std"] == pytest.approx(0.05) and not d["met"]
    # only the seeds both methods ran are paired; one seed has no std and never meets the target
    one = R.ordering({"dfkd-t3": {0: 0.75, 1: 0.76}, "prompted": {1: 0.70}})
    assert one == [{"pair": ("dfkd-t3", "prompted"), "diffs": [pytest.approx(0.06)],
                    "mean": pytest.approx(0.06), "std": None, "met": False}]


def test_render_writes_the_targets_from_the_run_folders(tmp_path):
    out, root = tmp_path / "runs", tmp_path / "root"
    root.mkdir()
    _runs(out)
    R.render(out, R.load_profile(R.PROFILES["full"]), "full", None, {"teacher": 60.0, "dfkd-t3_seed0": 120.0}, root=root)
    text = (root / "RESULTS.md").read_text()
    assert "| dfkd-t3 | 0.7500 ± 0.0100 | 0.7500, 0.7600, 0.7400 | 93.8% |" in text  # 0.75 / 0.80
    assert "| dfkd-t3 − prompted | +0.0300, +0.0600, +0.0000 | +0.0300 | 0.0200 | yes |" in text
    assert "| corpus − random | +0.0600, -0.0300, +0.0300 | +0.0200 | 0.0500 | no |" in text
    assert "recovered by dfkd-t3: 93.8% (target at least 90%, aim 95%): met." in text
    # mean accuracy over all 15 runs 10.71 / 15 = 0.714; sqrt(0.714 * 0.286 / 1000) = 0.0143
    assert "The test split has 1000 snippets: one snippet is 0.0010 of accuracy" in text
    assert "near 0.71 is 0.0143." in text
    assert "Rendered with --render-only" in text and "All steps, over every invocation: 3.0 min" in text
    assert not (root / "results_full_dev_accuracy.png").exists()  # no dev points, no plot


def test_the_one_seed_quick_table_states_no_targets(tmp_path):
    out, root = tmp_path / "runs", tmp_path / "root"
    root.mkdir()
    _runs(out)
    R.render(out, R.load_profile(R.PROFILES["quick"]), "quick", 60.0, None, root=root)  # seed 0 only
    text = (root / "RESULTS_quick.md").read_text()
    assert "| dfkd-t3 | 0.7500 | 0.7500 | 93.8% |" in text
    assert "Against the targets" not in text and "recovered by dfkd-t3" not in text
    assert "Wall time of this invocation: 1.0 min" in text


def test_render_only_refuses_a_folder_without_finished_runs(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce_results.py"), "--render-only",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and f"no finished runs (*_seed*/final.json) in {tmp_path}" in r.stderr


def test_filter_rows_come_from_their_own_folders(tmp_path):
    """results.min_confidence > 0: 'prompted + filter' and 'dfkd-t3 + filter' rows, each read from its own
    run folders (prompted_filter_seedN, ...), with the acceptance rate in the generation table."""
    from ms_dfkd.config import load_config, parse_overrides
    out, root = tmp_path / "runs", tmp_path / "root"
    root.mkdir()
    _runs(out)
    for seed, acc in enumerate([0.73, 0.71, 0.75]):
        run = out / f"prompted_filter_seed{seed}"
        run.mkdir()
        (run / "final.json").write_text(json.dumps({"student_test": {"accuracy": acc, "n": 1000}, "samples": {}}))
        (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "acceptance": 0.4 + 0.1 * seed}) + "\n")
    prof = load_config(R.PROFILES["full"], parse_overrides(["--results.min_confidence", "0.8"]))
    assert [r[1] for r in R.table_rows(prof)] == ["random", "corpus", "prompted", "prompted + filter", "dfkd-t3",
                                                 "dfkd-t3 + filter", "real"]
    assert R.table_rows(prof)[3][3] == ["--run.min_confidence", "0.8"]
    R.render(out, prof, "full", None, None, root=root)
    text = (root / "RESULTS.md").read_text()
    assert "| prompted + filter | 0.7300 ± 0.0200 | 0.7300, 0.7100, 0.7500 | 91.2% |" in text  # 0.73 / 0.80
    assert "| dfkd-t3 + filter | - | - | - |" in text  # not run yet
    # acceptance: mean of 0.4, 0.5, 0.6 over the three seeds' rounds
    row = [l for l in text.splitlines() if l.startswith("| prompted + filter | -")][0]
    assert row.split(" | ")[7] == "0.500", row


def test_a_shared_generator_phase_is_trained_by_the_first_dfkd_t3_run_only(tmp_path):
    """results.share_generator_phase: dfkd-t3 of the first seed trains the generator phase; the later seeds and
    every filter run start from that run's folder with no generator phase of their own; other methods are
    untouched. The profile must be two_phase with generator steps."""
    from ms_dfkd.config import ConfigError, load_config, parse_overrides
    over = ["--run.schedule", "two_phase", "--run.gen_warmup_steps", "500", "--results.min_confidence", "0.8",
            "--results.share_generator_phase", "true", "--results.seeds", "3,4"]
    prof = load_config(R.PROFILES["full"], parse_overrides(over))
    out = tmp_path / "runs"
    shared = ["--run.generator_from", str(out / "dfkd-t3_seed3"), "--run.gen_warmup_steps", "0"]
    got = {(key, seed): R.shared_generator_phase(prof, out, key, seed)
           for seed in (3, 4) for key, _, _, _ in R.table_rows(prof)}
    assert got.pop(("dfkd-t3", 3)) == []
    for seed in (3, 4):
        assert got.pop(("dfkd-t3", seed), shared) == shared and got.pop(("dfkd-t3_filter", seed)) == shared
    # random, corpus, prompted, prompted_filter, real: no generator phase (the config refuses one for them)
    assert all(v == ["--run.gen_warmup_steps", "0"] for v in got.values()), got
    for key, seed in got:
        method = dict((k, m) for k, _, m, _ in R.table_rows(prof))[key]
        load_config(R.PROFILES["full"], parse_overrides(over + ["--run.method", method, *got[(key, seed)]]))
    assert "trained once, by the seed-3 dfkd-t3 run" in R._budget_line(prof)
    # that run goes first; the others keep the table's order, seed by seed
    order = [(key, seed) for key, seed, _, _ in R.run_order(prof)]
    rows = [key for key, _, _, _ in R.table_rows(prof)]
    assert order == [("dfkd-t3", 3)] + [(k, s) for s in (3, 4) for k in rows if (k, s) != ("dfkd-t3", 3)]
    assert [(k, s) for k, s, _, _ in R.run_order(load_config(R.PROFILES["full"]))] == [
        (k, s) for s in (0, 1, 2) for k in ("random", "corpus", "prompted", "dfkd-t3", "real")]
    with pytest.raises(ConfigError, match="results.share_generator_phase"):
        load_config(R.PROFILES["full"], parse_overrides(["--results.share_generator_phase", "true"]))


def test_the_generator_phase_curve_and_its_target_from_the_run_folders(tmp_path):
    """run.gen_phase_log_every: the first seed's dfkd-t3 warm-up lines become the generator phase's table, with
    prompted's level (the mean of its rounds over seeds) and the target over the 100 steps that end at step 300
    (or at the phase's end), numbers worked by hand; a longer phase adds its last 100 steps without a verdict; a
    phase still running states no target."""
    from ms_dfkd.config import load_config, parse_overrides
    over = ["--run.schedule", "two_phase", "--run.gen_warmup_steps", "200", "--run.gen_phase_log_every", "50"]
    prof = load_config(R.PROFILES["full"], parse_overrides(over))
    out, root = tmp_path / "runs", tmp_path / "root"
    root.mkdir()

    def line(step, neg, pos, ppl, degenerate=0.0):
        return json.dumps({"phase": "warmup", "warmup_steps": step, "steps_in_record": 50, "specificity_negative": neg,
                           "specificity_positive": pos, "target_prob_negative": 0.6, "target_prob_positive": 0.6,
                           "loss_flu": 0.1, "perplexity_g0": ppl, "batch_distinct_2": 0.9, "degenerate": degenerate})
    curve = [(50, 0.6, 0.5, 20.0), (100, 0.6, 0.5, 20.0), (150, 0.70, 0.66, 24.0), (200, 0.80, 0.70, 26.0)]
    _runs(out, metrics=lambda seed: "\n".join(line(*c) for c in curve) + "\n" if seed == 0 else "")
    for seed, (neg, pos) in enumerate([(0.60, 0.58), (0.64, 0.62), (0.62, 0.60)]):
        (out / f"prompted_seed{seed}" / "metrics.jsonl").write_text("".join(
            json.dumps({"round": r, "specificity_negative": neg, "specificity_positive": pos,
                        "perplexity_g0": 16.0 + 2 * r}) + "\n" for r in range(2)))
    text = "\n".join(R.generator_phase_lines(out, prof, "full", root))
    assert "| 150-199 | 0.800 | 0.700 | 0.600 | 0.600 | 0.100 | 26.000 | 0.900 | 0.000 |" in text
    # prompted: negative (0.60 + 0.64 + 0.62) / 3, positive 0.60, perplexity (16 + 18) / 2
    assert "| prompted | 0.620 | 0.600 | - | - | - | 17.000 | - | - |" in text
    # steps 100-199: negative (0.70 + 0.80) / 2 - 0.62 = +0.13, positive 0.68 - 0.60 = +0.08; ppl 25 / 17
    assert ("Over steps 100-199: specificity above prompted's by +0.130 (negative), +0.080 (positive); perplexity "
            "under G0 1.47x prompted's; 0.0% degenerate.") in text and text.endswith(")") and ": not met." in text
    assert (root / "results_full_generator_phase.png").stat().st_size > 0
    curve[3] = (200, 0.80, 0.76, 26.0)  # positive +0.11: met
    (out / "dfkd-t3_seed0" / "metrics.jsonl").write_text("\n".join(line(*c) for c in curve) + "\n")
    assert ": met." in "\n".join(R.generator_phase_lines(out, prof, "full", root))
    (out / "dfkd-t3_seed0" / "metrics.jsonl").write_text("\n".join(line(*c) for c in curve[:3]) + "\n")
    running = "\n".join(R.generator_phase_lines(out, prof, "full", root))
    assert "| 100-149 |" in running and "Over steps" not in running
    assert R.generator_phase_lines(out, load_config(R.PROFILES["full"]), "full", root) == []  # no curve asked for
    # a 400-step phase: the verdict is over steps 200-299 (within 300), then the last 100 steps are shown apart
    longer = load_config(R.PROFILES["full"], parse_overrides(
        ["--run.schedule", "two_phase", "--run.gen_warmup_steps", "400", "--run.gen_phase_log_every", "100"]))
    curve = [(100, 0.6, 0.5, 20.0), (200, 0.70, 0.66, 24.0), (300, 0.75, 0.72, 25.0), (400, 0.90, 0.90, 30.0)]
    (out / "dfkd-t3_seed0" / "metrics.jsonl").write_text("\n".join(
        json.dumps(dict(json.loads(line(*c)), steps_in_record=100)) for c in curve) + "\n")
    text = "\n".join(R.generator_phase_lines(out, longer, "full", root))
    # steps 200-299: 0.75 - 0.62 = +0.13, 0.72 - 0.60 = +0.12, 25 / 17 = 1.47: met
    assert ("Over steps 200-299: specificity above prompted's by +0.130 (negative), +0.120 (positive); perplexity "
            "under G0 1.47x prompted's; 0.0% degenerate. Target (within 300 steps") in text and ": met." in text
    # steps 300-399: 0.90 - 0.62, 0.90 - 0.60, 30 / 17 = 1.76 (over 1.5x), but no verdict past step 300
    assert ("Over steps 300-399: specificity above prompted's by +0.280 (negative), +0.300 (positive); perplexity "
            "under G0 1.76x prompted's; 0.0% degenerate. (The phase's last 100 steps") in text
    assert text.count("Target (") == 1


def test_the_ner_table_is_its_own_section_with_per_type_scores(tmp_path):
    """--task ner: entity F1 from the token runs' final.json, the teacher's per-type F1, the students' per-type
    means, the 60% share target, texts with the teacher's tags from generated.jsonl; written after the
    sentiment table of the same file, each table rewritten without touching the other."""
    out, ner_out, root = tmp_path / "runs", tmp_path / "ner", tmp_path / "root"
    root.mkdir()
    _runs(out)
    f1 = {"random": [0.05, 0.07, 0.06], "corpus": [0.10, 0.12, 0.14], "prompted": [0.20, 0.22, 0.24],
          "dfkd-t3": [0.30, 0.34, 0.32], "real": [0.40, 0.41, 0.42]}
    for method, scores in f1.items():
        for seed, v in enumerate(scores):
            run = ner_out / f"{method}_seed{seed}"
            run.mkdir(parents=True)
            per_type = {"person": {"f1": v + 0.1}, "geo-loc": {"f1": v - 0.02}}
            (run / "final.json").write_text(json.dumps(
                {"student_test": {"micro_f1": v, "entity_f1": v, "n": 256, "per_type": per_type}, "samples": {}}))
            (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "specificity": 0.25 * (seed + 1)}) + "\n")
            recs = [{"text": "Obama in Paris", "target": 0, "pieces": ["obama", "in", "paris"],
                     "teacher_tags": ["B-person", "O", "B-geo-loc"]},
                    {"text": "nothing here", "target": 2, "pieces": ["nothing", "here"], "teacher_tags": ["O", "O"]}]
            (run / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    teacher = {"micro_f1": 0.50, "support": 105, "per_type": {"person": {"f1": 0.7, "support": 41},
                                                             "geo-loc": {"f1": 0.55, "support": 24}}}
    (ner_out / "teacher_test.json").write_text(json.dumps({"teacher": teacher}))
    ner = R.load_profile(R.NER_PROFILES["full"])
    R.render(ner_out, ner, "full", None, None, root=root)
    R.render(out, R.load_profile(R.PROFILES["full"]), "full", None, None, root=root)  # after: keeps the NER part
    text = (root / "RESULTS.md").read_text()
    head, ner_text = text.split(R.NER_MARK)
    assert head.startswith("# Results (full profile)") and "| dfkd-t3 | 0.7500 ± 0.0100 |" in head
    assert "entity" not in head and ner_text.lstrip().startswith("# NER results (full profile)")
    assert "Teacher test entity F1: **0.5000**" in ner_text
    assert "| F1 (test entities) | 0.700 (41) | 0.550 (24) | - | - |" in ner_text
    assert "| dfkd-t3 | 0.3200 ± 0.0200 | 0.3000, 0.3400, 0.3200 | 64.0% |" in ner_text  # 0.32 / 0.50
    # per type, mean over seeds: person 0.32 + 0.1, geo-loc 0.32 - 0.02
    assert "| dfkd-t3 | 0.420 | 0.300 | - | - |" in ner_text
    # dfkd-t3 - prompted: +0.10, +0.12, +0.08, mean 0.10 > 0.02: met
    assert "| dfkd-t3 − prompted | +0.1000, +0.1200, +0.0800 | +0.1000 | 0.0200 | yes |" in ner_text
    assert "recovered by dfkd-t3: 64.0% (target at least 60%): met." in ner_text
    assert "binomial" not in ner_text and "256 tweets and 105 entities" in ner_text
    assert "| dfkd-t3 | 0.500 |" in ner_text  # specificity: mean of 0.25, 0.5, 0.75
    assert "'Obama in Paris'; teacher: obama B-person, paris B-geo-loc" in ner_text
    assert "'nothing here'; teacher: no entity" in ner_text
    # rendering the NER table again replaces its section and keeps the sentiment table
    (ner_out / "teacher_test.json").write_text(json.dumps({"teacher": {**teacher, "micro_f1": 0.64}}))
    R.render(ner_out, ner, "full", None, None, root=root)
    again = (root / "RESULTS.md").read_text()
    assert again.split(R.NER_MARK)[0] == head and again.count(R.NER_MARK) == 1
    assert "recovered by dfkd-t3: 50.0% (target at least 60%): not met." in again


def test_task_ner_refuses_a_sequence_profile(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce_results.py"), "--task", "ner",
                        "--config", str(R.PROFILES["quick"]), "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "is a sequence task's profile; --task ner needs a token one" in r.stderr
    assert not any(tmp_path.iterdir())


def test_a_section_profile_renders_only_its_methods_and_keeps_the_other_tables(tmp_path):
    """configs/results_qwen.yaml: results.methods [prompted, dfkd-t3], results.compare_generators [smollm2] and
    results.section qwen; its table is a section of RESULTS.md of its own, so the task's table and the NER
    section around it stay byte for byte, and its pairs compare each generator's rows seed by seed."""
    out, root = tmp_path / "runs", tmp_path / "root"
    root.mkdir()
    _runs(out)
    _runs(out, {"prompted": [0.70, 0.69, 0.71], "dfkd-t3": [0.71, 0.73, 0.72]}, "{method}_smollm2_seed{seed}",
          ("meh", "fine"), lambda seed: json.dumps({"round": 0, "specificity": 0.5 + 0.1 * seed}) + "\n")
    before = "# Results (full profile)\n\nthe SmolLM2 table\n\n" + R.NER_MARK + "\n\n# NER results\n\nner table\n"
    (root / "RESULTS.md").write_text(before)
    qwen = R.load_profile(ROOT / "configs" / "results_qwen.yaml")
    rows = R.table_rows(qwen)
    assert [r[1] for r in rows] == ["prompted, Qwen2.5-0.5B", "dfkd-t3, Qwen2.5-0.5B",
                                    "prompted, SmolLM2-135M", "dfkd-t3, SmolLM2-135M"]
    assert rows[2][0] == "prompted_smollm2" and rows[2][3] == ["--generator.arch", "smollm2"] and rows[0][3] == []
    how = "--config configs/results_qwen.yaml"
    R.render(out, qwen, "full", None, None, root=root, how=how)
    text = (root / "RESULTS.md").read_text()
    mark = "<!-- qwen section: written by scripts/reproduce_results.py --config configs/results_qwen.yaml -->"
    assert text.startswith(before) and text.count(mark) == 1
    section = text.split(mark)[1]
    assert section.lstrip().startswith("# Results with Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M) as the generator "
                                       "against SmolLM2-135M-Instruct")
    assert "Written by `scripts/reproduce_results.py --config configs/results_qwen.yaml`" in section
    table = section.split("## Against")[0]
    assert "| prompted, Qwen2.5-0.5B | 0.7200 ± 0.0200 |" in table and "| dfkd-t3, Qwen2.5-0.5B | 0.7500 ± 0.0100 |" in table
    assert "| dfkd-t3, SmolLM2-135M | 0.7200 ± 0.0100 | 0.7100, 0.7300, 0.7200 | 90.0% |" in table
    assert "random" not in table and "corpus" not in table and "| real |" not in table
    pairs = section.split("## Against")[1].split("## Generation")[0]
    assert "| dfkd-t3, Qwen2.5-0.5B − prompted, Qwen2.5-0.5B | +0.0300, +0.0600, +0.0000 | +0.0300 | 0.0200 | yes |" in pairs
    # SmolLM2: dfkd-t3 - prompted +0.01, +0.04, +0.01 (mean 0.02; stds 0.01, 0.01: met)
    assert "| dfkd-t3, SmolLM2-135M − prompted, SmolLM2-135M | +0.0100, +0.0400, +0.0100 | +0.0200 | 0.0100 | yes |" in pairs
    # Qwen above SmolLM2, method by method: prompted +0.02, +0.01, +0.03
    assert "| prompted, Qwen2.5-0.5B − prompted, SmolLM2-135M | +0.0200, +0.0100, +0.0300 | +0.0200 | 0.0200 | no |" in pairs
    assert pairs.count("\n| ") == 4 + 1  # the header row and four pairs
    assert "recovered by dfkd-t3: 93.8%" in section  # the profile's generator's dfkd-t3 (0.75 / 0.80)
    assert "| dfkd-t3, SmolLM2-135M | 0.600 |" in section  # specificity: mean of 0.5, 0.6, 0.7
    assert "### prompted, SmolLM2-135M" in section and "'meh'" in section
    assert "Transfer" not in section  # transfer_steps 0
    # the task's table and the NER table rendered again leave the qwen section where it is
    R.render(out, R.load_profile(R.PROFILES["full"]), "full", None, None, root=root)
    again = (root / "RESULTS.md").read_text()
    assert again.count(mark) == 1 and again.split(mark)[1] == section
    assert again.index(R.NER_MARK) < again.index(mark) and "the SmolLM2 table" not in again
    assert "| prompted | 0.7200 ± 0.0200 |" in again.split(R.NER_MARK)[0]  # plain names without compare_generators


@pytest.mark.parametrize("methods", [["prompted", "bogus"], [], ["real", "real"]])
def test_results_methods_must_name_known_methods_once(tmp_path, methods):
    from ms_dfkd.config import ConfigError, load_config
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"results:\n  methods: {json.dumps(methods)}\n")
    with pytest.raises(ConfigError, match="results.methods"):
        load_config(cfg)


def test_compare_generators_must_be_another_known_generator(tmp_path):
    import subprocess
    import sys
    for bad in ("gpt-9", "qwen2.5-coder-0.5b"):  # unknown; the profile's own generator
        prof = tmp_path / "p.yaml"
        prof.write_text((ROOT / "configs" / "results_qwen.yaml").read_text().replace(
            "compare_generators: [smollm2]", f"compare_generators: [{bad}]"))
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce_results.py"), "--config", str(prof),
                            "--out", str(tmp_path / "out")], capture_output=True, text=True)
        assert r.returncode == 1 and f"results.compare_generators: '{bad}' is not another generator.arch" in r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
