"""The DFKD loop for a token task (NER; docs/METHOD.md, "Token tasks (NER)") on configs/smoke_ner.yaml's tiny
models, with one tiny token teacher trained for the module on synthetic BIO files (learnable, so that its tags
differ from position to position). Checked against references written here: the per-word-piece teacher
probabilities of generated.jsonl against an unpadded PyNative forward of the teacher, the specificity rate
against the records' tags, the student's test F1 against metrics.entity_f1 of a forward of the saved
student, the student step's loss against a numpy KL; resume against the straight run; the user's mistakes."""
import json
from pathlib import Path

import numpy as np
import pytest

from ms_dfkd.cli import main
from ms_dfkd.config import ConfigError, load_config, parse_overrides
from test_e2e_smoke import _interrupt_after

ROOT = Path(__file__).resolve().parents[1]
SMOKE_NER = str(ROOT / "configs" / "smoke_ner.yaml")
PEOPLE = ["alice", "bob", "carol", "dave", "erin", "obama", "smith"]
PLACES = ["paris", "london", "tokyo", "berlin", "britain", "france", "china"]
FILLER = ["the", "a", "big", "day", "was", "good", "today", "said", "so", "government", "and", "it", "in"]


def _write_bio(path, n, seed):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        for _ in range(rng.integers(4, 10)):
            r = rng.random()
            w, t = ((str(rng.choice(PEOPLE)), "B-person") if r < 0.2 else
                    (str(rng.choice(PLACES)), "B-geo-loc") if r < 0.35 else (str(rng.choice(FILLER)), "O"))
            lines.append(f"{w}\t{t}")
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def over(tmp_path_factory):
    """Overrides of smoke_ner.yaml: synthetic train/dev(=test) files and a tiny teacher trained on them."""
    d = tmp_path_factory.mktemp("ner_distill")
    train, dev = _write_bio(d / "train.txt", 300, 0), _write_bio(d / "dev.txt", 40, 1)
    o = ["--task.train", train, "--task.dev", dev, "--task.test", dev, "--teacher.checkpoint",
         str(d / "teacher.safetensors"), "--teacher.train_examples", "0", "--teacher.epochs", "4"]
    assert main(["train-teacher", "--config", SMOKE_NER, *o]) == 0
    return o


@pytest.fixture(scope="module")
def dfkd_run(over, tmp_path_factory):
    """A straight dfkd-t3 run through the CLI (2 rounds of 2 generator steps of 4 samples, 2 student steps)."""
    out = tmp_path_factory.mktemp("dfkd") / "run"
    assert main(["distill", "--config", SMOKE_NER, *over, "--run.method", "dfkd-t3", "--run.out_dir", str(out)]) == 0
    return out


def _cfg(over, *extra):
    return load_config(SMOKE_NER, parse_overrides([*over, *extra]))


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _independent_f1(model, cfg, rows):
    """metrics.entity_f1 of model's tags on [(words, tag ids)]: one unpadded PyNative forward per sentence,
    each word read at its first word-piece (the word's pieces encoded here, one word at a time)."""
    import mindspore as ms
    from ms_dfkd import build, metrics
    ms.set_context(mode=ms.PYNATIVE_MODE)
    tok, names = build.teacher_tokenizer(cfg), build.tag_names(cfg)
    true, pred = [], []
    for words, tags in rows:
        ids, first = [tok.bos_id], []
        for w in words:
            first.append(len(ids))
            ids += tok.encode(w, add_special_tokens=False)
        ids.append(tok.eos_id)
        lo = model(input_ids=ms.Tensor(np.array([ids], np.int32)),
                   attention_mask=ms.Tensor(np.ones((1, len(ids)), np.int32))).asnumpy()[0]
        true.append([names[t] for t in tags])
        pred.append([names[int(lo[j].argmax())] for j in first])
    return metrics.entity_f1(true, pred)


def test_dfkd_t3_records_metrics_and_report(over, dfkd_run):
    import mindspore as ms
    from ms_dfkd import build
    from ms_dfkd.cli import load_student_weights
    from ms_dfkd.ner_data import load_token_split
    cfg = _cfg(over)
    recs = _jsonl(dfkd_run / "generated.jsonl")
    assert len(recs) == 16 and [r["target"] for r in recs] == [0, 1] * 8  # the entity types, balanced
    # the teacher's probabilities at each word-piece: an unpadded forward of [CLS] pieces [SEP], here
    ms.set_context(mode=ms.PYNATIVE_MODE)
    teacher, tok, names = build.load_teacher(cfg), build.teacher_tokenizer(cfg), build.tag_names(cfg)
    spread = []
    for r in recs:
        ids = tok.encode(r["text"], add_special_tokens=False)[:cfg.teacher.max_length - 2]
        assert r["pieces"] == [tok.id_to_token(i) for i in ids]
        full = [tok.bos_id, *ids, tok.eos_id]
        lo = teacher(input_ids=ms.Tensor(np.array([full], np.int32)),
                     attention_mask=ms.Tensor(np.ones((1, len(full)), np.int32))).asnumpy()[0]
        p = _softmax(lo.astype(np.float64))[1:1 + len(ids)]
        np.testing.assert_allclose(np.array(r["teacher_probs"]), p, atol=2e-5)
        assert r["teacher_tags"] == [names[a] for a in p.argmax(-1)]
        assert r["teacher_type"] == int(p[:, 1::2].max(0).argmax())
        spread.append(p.std(0).max())
    assert max(spread) > 1e-3  # the teacher's outputs differ along the text: a shifted position would show
    # the specificity rate of each round: the share of its texts whose tags hold B-<target type>
    metrics = _jsonl(dfkd_run / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1]
    for m in metrics:
        mine = [r for r in recs if r["round"] == m["round"]]
        want = np.mean([f"B-{cfg.task.entity_types[r['target']]}" in r["teacher_tags"] for r in mine])
        assert m["specificity"] == pytest.approx(want)
        assert 0 <= m["bridge_agreement"] <= 1 and m["loss_spec"] > 0 and m["loss_adv"] <= 0
        assert np.isfinite([m["loss_g"], m["loss_div"], m["loss_flu"], m["loss_s"]]).all()
    # the student's test F1 in final.json is that of the checkpoint's student
    final = json.loads((dfkd_run / "final.json").read_text())
    student = load_student_weights(cfg, dfkd_run)
    ref = _independent_f1(student, cfg, load_token_split(cfg, "test"))
    assert final["student_test"]["entity_f1"] == pytest.approx(ref["micro_f1"])
    assert final["student_test"]["support"] == ref["support"] > 0
    assert metrics[-1]["student_dev_entity_f1"] == pytest.approx(ref["micro_f1"])  # dev is the test file here
    assert final["teacher_test"]["entity_f1"] > 0.5  # the synthetic task is learnable
    # the checkpoint's replay records (in its JSON header) leave the per-piece fields to generated.jsonl:
    # kilobytes a record would put a long run's header past safetensors' 100 MB limit
    from ms_dfkd.models.checkpoint_io import safetensors_metadata
    state = json.loads(safetensors_metadata(dfkd_run / "checkpoint.safetensors")["state"])
    kept = state["replay"]["records"]
    assert [r["text"] for r in kept] == [r["text"] for r in recs]
    assert all(set(r) == set(recs[0]) - {"pieces", "teacher_probs", "teacher_tags"} for r in kept)


def test_inspect_and_distill_from_texts(over, dfkd_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["inspect", str(dfkd_run), "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert "16 generated texts" in out and "student_dev_entity_f1=" in out
    shown = [line for line in out.splitlines() if line.startswith("   [")]
    assert len(shown) == 6 and all(line.startswith("   [no entity]") or "/B-" in line or "/I-" in line
                                   for line in shown)
    st = tmp_path / "student.safetensors"
    assert main(["distill-from-texts", "--config", SMOKE_NER, *over, "--texts", str(dfkd_run / "generated.jsonl"),
                 "--steps", "3", "--out", str(st)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 3 and res["texts"] == 16
    ev = tmp_path / "eval.json"
    assert main(["eval", "--config", SMOKE_NER, *over, "--no-teacher", "--student", str(st),
                 "--json-out", str(ev)]) == 0
    assert json.loads(ev.read_text())["student"]["micro_f1"] == pytest.approx(res["student_test"]["entity_f1"])


def test_generate_and_generate_from_a_run(over, dfkd_run, tmp_path):
    """generate: per-type prompts to the pretrained generator or a run's trained one, labelled per word-piece."""
    cfg = _cfg(over)
    for name, extra in (("g0", []), ("trained", ["--from-run", str(dfkd_run)])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", "--config", SMOKE_NER, *over, "--num", "6", "--out", str(out), *extra]) == 0
        recs = _jsonl(out)
        assert [r["target"] for r in recs] == [0, 1, 0, 1, 0, 1]
        for r in recs:
            assert len(r["teacher_probs"]) == len(r["pieces"]) == len(r["teacher_tags"])
            assert all(len(p) == len(cfg.task.entity_types) * 2 + 1 for p in r["teacher_probs"])


def test_token_student_step_loss_is_the_per_position_kl(over):
    """TokenStudentStep's loss (before its update) on two texts of different lengths, with the teacher's
    array shorter than the student's input: numpy tau^2 KL over positions 1 .. min(pieces, Lt - 2)."""
    import mindspore as ms
    from ms_dfkd import build
    from ms_dfkd.token_steps import TokenStudentStep
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = _cfg(over)
    student, tok = build.build_student(cfg), build.student_tokenizer(cfg)
    texts = ["alice flew to paris today", "the big day"]
    Lt, C, tau = 6, 5, 2.0
    rng = np.random.default_rng(0)
    t_logits = rng.normal(size=(2, Lt, C)).astype(np.float32) * 3
    ids, mask = tok.encode_batch(texts, max_length=cfg.student.max_length, padding="max_length")
    s = student(input_ids=ms.Tensor(ids), attention_mask=ms.Tensor(mask)).asnumpy().astype(np.float64)
    vals = []
    for b, text in enumerate(texts):
        n = min(len(tok.encode(text, add_special_tokens=False)), Lt - 2)
        for j in range(1, n + 1):
            lp, lq = np.log(_softmax(t_logits[b, j] / tau)), np.log(_softmax(s[b, j] / tau))
            vals.append(tau ** 2 * (np.exp(lp) * (lp - lq)).sum())
    assert len(vals) == 4 + 3  # the first text is cut by the teacher's array, the second is not
    step = TokenStudentStep(student, tok, cfg.student.max_length, 2, 1e-3, tau, jit=False)
    assert step(texts, t_logits, None) == pytest.approx(np.mean(vals), rel=1e-5)


def test_prompted_and_the_data_methods(over, tmp_path):
    """prompted through the CLI; random, corpus and real one round of one batch each."""
    from ms_dfkd.ner_data import load_token_split
    out = tmp_path / "prompted"
    assert main(["distill", "--config", SMOKE_NER, *over, "--run.method", "prompted", "--run.rounds", "1",
                 "--run.out_dir", str(out)]) == 0
    recs = _jsonl(out / "generated.jsonl")
    assert [r["target"] for r in recs] == [0, 1] * 4
    (m,) = _jsonl(out / "metrics.jsonl")
    assert "loss_g" not in m and 0 <= m["specificity"] <= 1 and "student_dev_entity_f1" in m
    train = {" ".join(w) for w, _ in load_token_split(_cfg(over), "train")}
    for method in ("random", "corpus", "real"):
        o = tmp_path / method
        assert main(["distill", "--config", SMOKE_NER, *over, "--run.method", method, "--run.rounds", "1",
                     "--run.gen_steps_per_round", "1", "--run.student_steps_per_round", "1",
                     "--run.out_dir", str(o)]) == 0
        recs = _jsonl(o / "generated.jsonl")
        assert len(recs) == 4 and all(r["target"] == -1 and len(r["teacher_probs"]) == len(r["pieces"])
                                      for r in recs)
        if method == "real":  # the teacher's train sentences without their tags
            assert all(r["text"] in train for r in recs)
        assert "student_test" in json.loads((o / "final.json").read_text())


def test_interrupted_and_resumed_equals_the_straight_run(over, dfkd_run, tmp_path):
    import mindspore as ms
    from ms_dfkd.models.checkpoint_io import load_safetensors
    from ms_dfkd.token_distill import TokenDistiller
    out = tmp_path / "pieces"

    def distiller():
        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_seed(0)
        return TokenDistiller(_cfg(over, "--run.method", "dfkd-t3", "--run.out_dir", str(out)))

    d = distiller()
    _interrupt_after(d, "_produce", 3)  # Ctrl-C after round 1's first generator step
    assert d.run() is None and d.counters["round"] == 1 and d.counters["gen_steps"] == 3
    assert distiller().run() is not None
    a, b = load_safetensors(dfkd_run / "checkpoint.safetensors"), load_safetensors(out / "checkpoint.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (dfkd_run / "generated.jsonl").read_text() == (out / "generated.jsonl").read_text()


@pytest.mark.parametrize("cmd,named", [
    (["distill", "--run.method", "prompted", "--run.min_confidence", "0.5"],
     "run.min_confidence: 0.5; the teacher-confidence filter is not built for token tasks"),
    (["distill", "--run.method", "dfkd-t3", "--loss.rwl", "1.0"], "loss.rwl: 1.0; the reward-weighted likelihood"),
    (["distill", "--student.hidden_mse", "0.1"], "student.hidden_mse: 0.1; the pooled-feature MSE"),
    (["distill-from-texts", "--texts", "{tmp}/seq.jsonl", "--out", "{tmp}/s.safetensors"],
     "seq.jsonl: record 0 has no per-word-piece teacher_probs of 5 tags"),
    (["distill-from-texts", "--texts", "{tmp}/long.jsonl", "--out", "{tmp}/s.safetensors"],
     "long.jsonl: record 0 has 3 teacher_probs rows but its text has 2 word-pieces"),
])
def test_mistakes_are_one_error_line(cmd, named, tmp_path, capsys):
    (tmp_path / "seq.jsonl").write_text(json.dumps({"text": "a b", "target": 0, "teacher_probs": [0.3, 0.7]}) + "\n")
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "a b", "teacher_probs": [[0.2] * 5] * 3}) + "\n")
    cmd = [c.replace("{tmp}", str(tmp_path)) for c in cmd]
    capsys.readouterr()
    assert main([cmd[0], "--config", SMOKE_NER, "--teacher.checkpoint", str(tmp_path / "none.safetensors"),
                 *cmd[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ms-dfkd {cmd[0]}: error: ") and named in err[0], err
    assert not (tmp_path / "s.safetensors").exists()


def test_teacher_and_student_must_share_the_tokenizer():
    """The token loop aligns teacher and student positions one to one: another vocabulary is a config error."""
    from ms_dfkd import build
    from ms_dfkd.token_distill import check_shared_tokenizer, teacher_type
    wp = build.teacher_tokenizer()
    check_shared_tokenizer(wp, wp)
    with pytest.raises(ConfigError, match="the student's tokenizer differs from the teacher's"):
        check_shared_tokenizer(wp, build.generator_tokenizer())
    # the type of the most probable B- tag over the pieces (tags O, B-a, I-a, B-b, I-b), 0 for no piece
    assert teacher_type(np.array([[0.5, 0.1, 0.3, 0.05, 0.05], [0.4, 0.2, 0.0, 0.3, 0.1]])) == 1
    assert teacher_type(np.zeros((0, 5))) == 0
