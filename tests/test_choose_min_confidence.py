"""scripts/choose_min_confidence.py: the dev selection of the teacher-confidence filter's threshold."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")
sys.path.insert(0, str(ROOT / "scripts"))
import choose_min_confidence as cmc  # noqa: E402

# the teacher's probability of each record's target label: 4 of the 8 are at least 0.6
P_TARGET = [0.1, 0.55, 0.6, 0.7, 0.3, 0.95, 0.59, 0.8]
TEXTS = ["a dull and tired film", "a warm, funny delight", "the plot goes nowhere", "a moving, lovely story",
         "flat acting all round", "a triumph of a movie", "boring from start to end", "sharp and witty"]


def _records():
    recs = []
    for i, (p, text) in enumerate(zip(P_TARGET, TEXTS)):
        target = i % 2
        probs = [0.0, 0.0]
        probs[target], probs[1 - target] = p, 1 - p
        recs.append({"text": text, "target": target, "teacher_probs": probs})
    return recs


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_kept_subset_draws_only_texts_at_or_above_the_threshold():
    p = np.random.default_rng(0).random(500)
    for t, n in ((0.0, 500), (0.3, 200), (0.9, 40)):
        idx = cmc.kept_subset(p, t, n)
        assert len(idx) == n == len(set(idx.tolist()))
        assert (p[idx] >= t).all()
        assert set(idx.tolist()) <= set(np.nonzero(p >= t)[0].tolist())
        np.testing.assert_array_equal(idx, cmc.kept_subset(p, t, n))  # the same subset for every seed
    assert not np.array_equal(cmc.kept_subset(p, 0.0, 100), cmc.kept_subset(p, 0.0, 100, seed=1))
    kept = int((p >= 0.9).sum())
    with pytest.raises(SystemExit, match=f"only {kept} texts are kept at threshold 0.9"):
        cmc.kept_subset(p, 0.9, kept + 1)


def test_table_and_students_match_an_independent_dev_evaluation(tmp_path, capsys, monkeypatch):
    """Every student is trained on texts above its threshold only, its dev accuracy is what `ms-dfkd eval
    --student` gives for the saved student, and the test split is never read."""
    import ms_dfkd.data
    import ms_dfkd.train
    from ms_dfkd.cli import main as cli_main
    texts = _write(tmp_path / "generated.jsonl", _records())
    seen, splits = [], []
    real_distill, real_split = ms_dfkd.train.distill_from_texts, ms_dfkd.data.load_split

    def recording_distill(cfg, recs, steps):
        seen.append(([r["text"] for r in recs], steps, cfg.run.seed))
        return real_distill(cfg, recs, steps)

    def recording_split(cfg, which):
        splits.append(which)
        return real_split(cfg, which)
    monkeypatch.setattr(ms_dfkd.train, "distill_from_texts", recording_distill)
    monkeypatch.setattr(ms_dfkd.data, "load_split", recording_split)
    saved = tmp_path / "students"
    rows = cmc.main(["--config", SMOKE, "--texts", str(texts), "--thresholds", "0.6", "0", "--steps", "2",
                     "--seeds", "0", "1", "--save-students", str(saved)])
    out = capsys.readouterr().out
    assert [r[0] for r in rows] == [0.0, 0.6]
    assert [r[1] for r in rows] == [1.0, 0.5]
    assert "| 0.6 | 50.0% |" in out and "| 0.0 | 100.0% |" in out
    # 4 texts a student (the number kept at 0.6); at 0.6 exactly the four texts at or above it
    assert [(len(t), s, seed) for t, s, seed in seen] == [(4, 2, 0), (4, 2, 1), (4, 2, 0), (4, 2, 1)]
    high = {TEXTS[i] for i, p in enumerate(P_TARGET) if p >= 0.6}
    assert set(seen[2][0]) == set(seen[3][0]) == high
    assert set(seen[0][0]) <= set(TEXTS)
    assert "test" not in splits and "dev" in splits
    for t, _, accs in rows:
        for seed, acc in zip((0, 1), accs):
            st = saved / f"t{t}_seed{seed}.safetensors"
            assert cli_main(["eval", "--config", SMOKE, "--student", str(st), "--split", "dev", "--no-teacher"]) == 0
            res = json.loads(capsys.readouterr().out)
            assert res["student"]["accuracy"] == pytest.approx(acc, abs=1e-9)


@pytest.mark.parametrize("args, records, message", [
    (["--thresholds", "0", "1.0"], None, "must be in [0, 1)"),
    (["--thresholds", "0", "0.6", "--texts-per-student", "5"], None, "only 4 texts are kept at threshold 0.6"),
    ([], [{"text": "no target here", "teacher_probs": [0.5, 0.5]}], "record 0 needs"),
    ([], [], "no generated texts"),
    (["--steps", "-1"], None, "none may be negative"),
    (["--thresholds", "0.99"], None, "no text is kept at threshold 0.99"),
])
def test_bad_inputs_are_refused_by_name(tmp_path, args, records, message):
    texts = _write(tmp_path / "generated.jsonl", _records() if records is None else records)
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace(")", r"\)")):
        cmc.main(["--config", SMOKE, "--texts", str(texts), *args])


def test_missing_texts_are_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match="nowhere.jsonl: no such file"):
        cmc.main(["--config", SMOKE, "--texts", str(tmp_path / "nowhere.jsonl")])
