"""run.schedule two_phase (generator phase, then data and student phases) and run.min_confidence (the
teacher-confidence filter), on the smoke config."""
import json

import numpy as np
import pytest

from test_e2e_smoke import _cfg, _distiller


def _draws(d):
    """Record (passages, noise seed) of every batch the run's rounds draw (not the warm-up's)."""
    seen, real = [], d.generate_batch

    def spy(step_id, stream=1, **kw):
        s = real(step_id, stream, **kw)
        if kw.get("sampler") is None and stream == 1:
            seen.append((list(s["passages"]), int(s["seed"])))
        return s
    d.generate_batch = spy
    return seen


def test_two_phase_trains_the_generator_only_in_its_phase_and_shares_prompted_passages(smoke_teacher, tmp_path):
    common = ("--run.schedule", "two_phase", "--run.rounds", "1", "--run.gen_steps_per_round", "3",
              "--run.student_steps_per_round", "2", "--run.mode", "pynative")
    d = _distiller(_cfg(smoke_teacher, tmp_path / "dfkd", "--run.gen_warmup_steps", "2", *common))
    seen_dfkd = _draws(d)
    after_phase = {}
    real_rounds = d._rounds

    def rounds(bar, kG, kS):  # the generator as the generator phase left it
        after_phase.update({n: p.asnumpy().copy() for n, p in d.generator.parameters_and_names()})
        return real_rounds(bar, kG, kS)
    d._rounds = rounds
    before = {n: p.asnumpy().copy() for n, p in d.generator.parameters_and_names()}
    assert d.run() is not None
    assert any(not np.array_equal(before[n], after_phase[n]) for n in before)  # the generator phase trained
    for n, p in d.generator.parameters_and_names():  # the data phase did not
        np.testing.assert_array_equal(p.asnumpy(), after_phase[n], err_msg=n)
    assert d.counters["warmup_steps"] == 2 and d.counters["stu_steps"] == 2

    p = _distiller(_cfg(smoke_teacher, tmp_path / "prompted", "--run.method", "prompted", *common))
    seen_prompted = _draws(p)
    assert p.run() is not None
    # the data phase rewrites the same passages with the same noise as prompted
    assert len(seen_dfkd) == 3 and seen_dfkd == seen_prompted
    metrics = [json.loads(l) for l in (tmp_path / "dfkd" / "metrics.jsonl").read_text().splitlines()]
    rnd = [m for m in metrics if m.get("phase") != "warmup"][0]
    assert np.isfinite(rnd["perplexity_g0"]) and "loss_g" not in rnd


def test_min_confidence_keeps_only_samples_the_teacher_finds_confident(smoke_teacher, tmp_path):
    """The smoke teacher answers 'positive' for every text with p ~ 0.56 (configs/smoke.yaml): at a threshold
    of 0.5 only the positive targets pass, half of each balanced batch, and every kept record has
    p(target) >= 0.5 in its stored teacher probabilities."""
    out = tmp_path / "filtered"
    d = _distiller(_cfg(smoke_teacher, out, "--run.method", "prompted", "--run.min_confidence", "0.5",
                        "--run.rounds", "1", "--run.gen_steps_per_round", "2", "--run.mode", "pynative"))
    assert d.run() is not None
    recs = [json.loads(l) for l in (out / "generated.jsonl").read_text().splitlines()]
    B = d.cfg.generator.batch_size
    assert len(recs) == 2 * B
    assert all(r["teacher_probs"][r["target"]] >= 0.5 for r in recs)
    assert {r["target"] for r in recs} == {1}
    assert d.counters["gen_steps"] == 4  # two draws of which half passed, for each kept batch
    rnd = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][0]
    assert rnd["acceptance"] == pytest.approx(0.5)


def test_min_confidence_that_nothing_passes_is_a_clear_error(smoke_teacher, tmp_path, monkeypatch):
    import ms_dfkd.train as train
    monkeypatch.setattr(train, "MAX_DRAWS_PER_BATCH", 3)
    d = _distiller(_cfg(smoke_teacher, tmp_path / "none", "--run.method", "prompted", "--run.min_confidence",
                        "0.9", "--run.rounds", "1", "--run.mode", "pynative"))
    with pytest.raises(RuntimeError, match=r"run.min_confidence 0.9: 0 of 12 samples passed in 3 batches"):
        d.run()


@pytest.mark.parametrize("over, match", [
    (("--run.schedule", "alternating"), "run.schedule: 'alternating' is not one of"),
    (("--run.min_confidence", "1.5"), r"run.min_confidence: must be in \[0, 1\)"),
    (("--run.method", "corpus", "--run.min_confidence", "0.5"), "needs a method whose samples have a target"),
    (("--run.generator_from", "runs/x"), "run.generator_from: 'runs/x' takes the generator phase from that run"),
    (("--run.generator_from", "runs/x", "--run.schedule", "two_phase", "--run.gen_warmup_steps", "2"),
     "run.generator_from: .* run.gen_warmup_steps 0"),
    (("--run.gen_phase_log_every", "-1"), "run.gen_phase_log_every: must be >= 0, got -1"),
])
def test_bad_schedule_settings_name_the_key(smoke_teacher, tmp_path, over, match):
    from ms_dfkd.config import ConfigError
    with pytest.raises(ConfigError, match=match):
        _cfg(smoke_teacher, tmp_path / "x", *over)


def test_two_phase_with_label_vectors_and_filter_resumes_bit_for_bit(smoke_teacher, tmp_path):
    """Ctrl-C in the generator phase and again in the data phase, each resumed: the checkpoint (label vectors
    and their optimizer state, both passage streams) and generated.jsonl equal those of a straight run."""
    from test_e2e_smoke import _ckpt, _interrupt_after
    over = ("--run.schedule", "two_phase", "--run.gen_warmup_steps", "3", "--run.rounds", "1",
            "--run.gen_steps_per_round", "2", "--generator.label_vectors", "true", "--run.min_confidence", "0.5")
    a, b = tmp_path / "a", tmp_path / "b"
    da = _distiller(_cfg(smoke_teacher, a, *over))
    assert da.run() is not None
    assert "label_vectors/weight" in _ckpt(a) and np.abs(_ckpt(a)["label_vectors/weight"]).sum() > 0
    d = _distiller(_cfg(smoke_teacher, b, *over))
    _interrupt_after(d, "_generator_update", 2)
    assert d.run() is None and d.counters["warmup_steps"] == 2
    d = _distiller(_cfg(smoke_teacher, b, *over))
    _interrupt_after(d, "_produce", 1)
    assert d.run() is None and d.counters["gen_in_round"] == 1
    assert _distiller(_cfg(smoke_teacher, b, *over)).run() is not None
    ca, cb = _ckpt(a), _ckpt(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)
    assert (a / "generated.jsonl").read_text() == (b / "generated.jsonl").read_text()


def test_generator_phase_writes_its_curve_every_k_steps_and_a_resume_writes_the_same_lines(smoke_teacher, tmp_path):
    """run.gen_phase_log_every 2 over a 4-step generator phase: two warm-up lines, each the mean over its two
    steps of the per-label specificity and target probability (worked here from the teacher's probabilities
    with numpy), the degenerate share and distinct-2 per batch. Cut by Ctrl-C after step 3 and resumed, the
    run writes the same lines (timings aside)."""
    from ms_dfkd import metrics as M
    from test_e2e_smoke import _interrupt_after, _metrics_but_timings
    over = ("--run.schedule", "two_phase", "--run.gen_warmup_steps", "4", "--run.gen_phase_log_every", "2",
            "--run.rounds", "1", "--run.gen_steps_per_round", "3", "--run.student_steps_per_round", "1",
            "--run.mode", "pynative")
    a, b = tmp_path / "a", tmp_path / "b"
    d = _distiller(_cfg(smoke_teacher, a, *over))
    steps, real = [], d._label_stats

    def spy(probs, labels, info):
        if d.counters["round"] == 0 and d.counters["warmup_steps"] < 4:
            steps.append((np.asarray(probs), np.asarray(labels)))
        return real(probs, labels, info)
    d._label_stats = spy
    texts, real_update = [], d._generator_update

    def update(s, what=None):
        texts.append(list(s["texts"]))
        return real_update(s, what)
    d._generator_update = update
    assert d.run() is not None and len(steps) == 4
    lines = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    warm = [m for m in lines if m.get("phase") == "warmup"]
    assert [(m["warmup_steps"], m["steps_in_record"]) for m in warm] == [(2, 2), (4, 2)]
    for k, m in enumerate(warm):
        for y, name in enumerate(("negative", "positive")):
            spec = [np.mean(p[l == y].argmax(-1) == y) for p, l in steps[2 * k:2 * k + 2]]
            prob = [np.mean(p[l == y, y]) for p, l in steps[2 * k:2 * k + 2]]
            assert m[f"specificity_{name}"] == pytest.approx(np.mean(spec), abs=1e-9), (k, name)
            assert m[f"target_prob_{name}"] == pytest.approx(np.mean(prob), rel=1e-6), (k, name)
        batches = texts[2 * k:2 * k + 2]
        assert m["batch_distinct_2"] == pytest.approx(np.mean([M.distinct_n(t, 2) for t in batches]))
        assert m["degenerate"] == pytest.approx(np.mean([M.degenerate_share(t) for t in batches]))
    # the smoke teacher answers 'positive' for every text: the two labels' values differ
    assert warm[0]["specificity_negative"] == 0.0 and warm[0]["specificity_positive"] == 1.0

    d = _distiller(_cfg(smoke_teacher, b, *over))
    _interrupt_after(d, "_generator_update", 3)
    assert d.run() is None and d.counters["warmup_steps"] == 3
    assert _distiller(_cfg(smoke_teacher, b, *over)).run() is not None
    assert _metrics_but_timings(b) == _metrics_but_timings(a)


def test_generator_from_starts_a_run_from_another_runs_generator_phase(smoke_teacher, tmp_path):
    """run.generator_from: a second seed's run starts from the first run's trained generator and label vectors
    (exactly its checkpoint's values; its own data phase leaves them so), runs no generator phase of its own,
    and refuses a source that is not a finished two_phase dfkd-t3 run or whose generator does not fit."""
    from test_e2e_smoke import _ckpt
    from ms_dfkd.models.checkpoint_io import CheckpointError
    two_phase = ("--run.schedule", "two_phase", "--run.rounds", "1", "--run.gen_steps_per_round", "2",
                 "--run.student_steps_per_round", "1", "--generator.label_vectors", "true", "--run.mode", "pynative")
    src, dst = tmp_path / "src", tmp_path / "seed1"
    assert _distiller(_cfg(smoke_teacher, src, *two_phase, "--run.gen_warmup_steps", "2")).run() is not None
    trained = {k: v for k, v in _ckpt(src).items() if k.startswith(("generator/", "label_vectors/"))}
    assert "label_vectors/weight" in trained and any(k.startswith("generator/") for k in trained)

    d = _distiller(_cfg(smoke_teacher, dst, *two_phase, "--run.seed", "1", "--run.generator_from", str(src)))
    fresh = {"generator/" + n: p.asnumpy().copy() for n, p in d.generator.parameters_and_names() if p.requires_grad}
    assert any(not np.array_equal(fresh[k], trained[k]) for k in fresh)  # a fresh generator is not the trained one
    assert d.run() is not None and d.counters["warmup_steps"] == 0 and d.counters["gen_steps"] == 2
    got = _ckpt(dst)
    for k, v in trained.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert len((dst / "generated.jsonl").read_text().splitlines()) == 2 * 4

    prompted = tmp_path / "prompted"
    assert _distiller(_cfg(smoke_teacher, prompted, "--run.method", "prompted", "--run.rounds", "1",
                           "--run.student_steps_per_round", "0", "--run.mode", "pynative")).run() is not None
    with pytest.raises(CheckpointError, match="is a 'prompted' run"):
        _distiller(_cfg(smoke_teacher, tmp_path / "b", *two_phase, "--run.generator_from", str(prompted))).run()
    no_vectors = [x for x in two_phase if x not in ("--generator.label_vectors", "true")]
    with pytest.raises(CheckpointError, match="label_vectors/weight"):
        _distiller(_cfg(smoke_teacher, tmp_path / "c", *no_vectors, "--run.generator_from", str(src))).run()
    assert not (tmp_path / "c" / "config.yaml").exists()  # refused before the run folder was written
    with pytest.raises(FileNotFoundError, match="missing"):
        _distiller(_cfg(smoke_teacher, tmp_path / "d", *two_phase, "--run.generator_from", str(tmp_path / "missing"))).run()


def test_sample_batch_size_draws_two_batches_at_once_and_resumes_bit_for_bit(smoke_teacher, tmp_path):
    """generator.sample_batch_size 8 (two batches of 4): one sampling call serves two steps, over the passages
    and labels that batches of 4 drawn one at a time get (only the noise differs). A run stopped between the
    two steps of a call resumes to the straight run's texts and checkpoint (the call is sampled again)."""
    from test_e2e_smoke import _ckpt, _interrupt_after
    over = ("--run.method", "prompted", "--run.rounds", "2", "--run.gen_steps_per_round", "3",
            "--run.student_steps_per_round", "1")

    def run(out, *extra, interrupt=None):
        d = _distiller(_cfg(smoke_teacher, tmp_path / out, *over, *extra))
        calls, real = [], d.generate_batch

        def spy(step_id, stream=1, **kw):
            s = real(step_id, stream, **kw)
            calls.append((len(s["passages"]), list(s["passages"])))
            return s
        d.generate_batch = spy
        if interrupt:
            _interrupt_after(d, "_produce", interrupt)
        return d.run(), calls

    plain_done, plain = run("plain")
    ahead_done, ahead = run("ahead", "--generator.sample_batch_size", "8")
    assert plain_done is not None and ahead_done is not None
    assert [n for n, _ in plain] == [4] * 6 and [n for n, _ in ahead] == [8] * 3
    assert sum((p for _, p in plain), []) == sum((p for _, p in ahead), [])  # the same passages, in order
    recs = {k: [json.loads(l) for l in (tmp_path / k / "generated.jsonl").read_text().splitlines()]
            for k in ("plain", "ahead")}
    assert [r["target"] for r in recs["plain"]] == [r["target"] for r in recs["ahead"]] == [0, 1] * 12
    assert [r["text"] for r in recs["plain"]] != [r["text"] for r in recs["ahead"]]  # noise of its own

    stopped, _ = run("resumed", "--generator.sample_batch_size", "8", interrupt=1)  # after step 0 of call 0
    assert stopped is None
    resumed, again = run("resumed", "--generator.sample_batch_size", "8")
    assert resumed is not None
    assert again[0][1] == ahead[0][1]  # call 0 sampled again for its second step
    assert (tmp_path / "ahead" / "generated.jsonl").read_text() == (tmp_path / "resumed" / "generated.jsonl").read_text()
    ca, cb = _ckpt(tmp_path / "ahead"), _ckpt(tmp_path / "resumed")
    assert sorted(ca) == sorted(cb)
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)

    # a caller that reads no logits (two_phase dfkd-t3's data phase) gets a call that computes none
    d = _distiller(_cfg(smoke_teacher, tmp_path / "nologits", *over, "--generator.sample_batch_size", "8"))
    asked, real = [], d.generate_batch
    d.generate_batch = lambda *a, **kw: asked.append(kw.get("return_logits")) or real(*a, **kw)
    first, second = d.sample_without_gradient(0), d.sample_without_gradient(1)
    assert asked == [False] and "logits" not in first and "logits" not in second  # one call for both steps
    assert len(first["texts"]) == len(second["texts"]) == 4 and first["passages"] != second["passages"]
