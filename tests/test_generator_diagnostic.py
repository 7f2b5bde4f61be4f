"""scripts/generator_diagnostic.py on the smoke config: per-step records with per-label numbers, the block
report and the PNG, and a rerun that resumes instead of starting again."""
import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("generator_diagnostic", ROOT / "scripts" / "generator_diagnostic.py")
D = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(D)


def test_diagnostic_records_resumes_and_reports(smoke_teacher, tmp_path, capsys):
    out = tmp_path / "diag"
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--teacher.checkpoint", smoke_teacher,
            "--steps", "4", "--every", "2", "--reference-batches", "2", "--out", str(out)]
    assert D.main(args) == 0
    recs = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    for r in recs:
        labels = np.array(r["labels"])
        assert len(r["specificity"]) == 2 and len(r["texts"]) == len(labels) == 4
        assert sorted(labels.tolist()) == [0, 0, 1, 1]  # balanced targets
        assert all(0 <= v <= 1 for v in r["specificity"] + r["target_prob"])
        assert r["kl_to_g0"] is not None and r["perplexity_g0"] > 1
    ref = json.loads((out / "reference.json").read_text())
    assert ref["samples"] == 8 and len(ref["specificity"]) == 2
    assert (out / "curves.png").stat().st_size > 1000
    table = (out / "blocks.md").read_text()
    assert "| 0-1 |" in table and "| 2-3 |" in table and "spec negative" in table
    # the block line's numbers are the means of its steps' records
    spec01 = np.nanmean([recs[0]["specificity"], recs[1]["specificity"]], axis=0)
    assert f"| 0-1 | {spec01[0]:.3f} | {spec01[1]:.3f} |" in table

    # rerun: the run is finished, nothing is recomputed or recorded twice
    before = (out / "steps.jsonl").read_bytes()
    assert D.main(args) == 0
    assert (out / "steps.jsonl").read_bytes() == before
    capsys.readouterr()
    assert D.main(args[:-2] + ["--out", str(out), "--report-only"]) == 0
    assert "from 4 steps" in capsys.readouterr().out
