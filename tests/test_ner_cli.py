"""The token-classification (NER) task through the command line: config (task.kind token, entity types,
wnut16:* and BIO-file specs), train-teacher and eval of a tiny token teacher, whose reported entity F1
must equal metrics.entity_f1 recomputed here from the saved checkpoint's own predictions (a PyNative
forward and a first-sub-token read-back written out in this file), and the user's mistakes, each one
`error:` line naming the key or the file."""
import json
from pathlib import Path

import numpy as np
import pytest

from ms_dfkd.cli import main
from ms_dfkd.config import ConfigError, load_config, parse_overrides, save_config

ROOT = Path(__file__).resolve().parents[1]
SMOKE_NER = str(ROOT / "configs" / "smoke_ner.yaml")
SMOKE = str(ROOT / "configs" / "smoke.yaml")

PEOPLE = ["alice", "bob", "carol", "dave", "erin", "frank"]
PLACES = ["paris", "london", "tokyo", "berlin", "madrid"]
FILLER = ["the", "a", "big", "day", "was", "good", "today", "lol", "so", "very", "and", "it"]


def _write_bio(path, n, seed):
    """n synthetic sentences in token<TAB>tag lines: names (person), cities (geo-loc, "new york" two words),
    an odd 'jordan' that is a person or a place, fillers (O); learnable but not perfectly by a tiny model."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        words = []
        for _ in range(rng.integers(4, 10)):
            r = rng.random()
            if r < 0.15:
                words.append((str(rng.choice(PEOPLE)), "B-person"))
            elif r < 0.25:
                words.append((str(rng.choice(PLACES)), "B-geo-loc"))
            elif r < 0.3:
                words += [("new", "B-geo-loc"), ("york", "I-geo-loc")]
            elif r < 0.34:
                words.append(("jordan", "B-person" if rng.random() < 0.5 else "B-geo-loc"))
            elif r < 0.36:
                words.append(("acme", "B-company"))  # a type the task leaves out: read as O
            else:
                words.append((str(rng.choice(FILLER)), "O"))
        lines += [f"{w}\t{t}" for w, t in words] + ["\t"]  # WNUT-16's sentence break: a line with one tab
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def bio_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bio")
    return {"train": _write_bio(d / "train.txt", 400, 0), "dev": _write_bio(d / "dev.txt", 60, 1)}


@pytest.fixture(scope="module")
def teacher(bio_files, tmp_path_factory):
    """A tiny token teacher trained through the CLI on the synthetic BIO files: (overrides, checkpoint)."""
    ckpt = str(tmp_path_factory.mktemp("ner_teacher") / "teacher.safetensors")
    over = ["--task.train", bio_files["train"], "--task.dev", bio_files["dev"], "--task.test", bio_files["dev"],
            "--teacher.checkpoint", ckpt, "--teacher.train_examples", "0", "--teacher.epochs", "3"]
    assert main(["train-teacher", "--config", SMOKE_NER, *over]) == 0
    return over, ckpt


def _independent_scores(model, cfg, sentences, max_length):
    """metrics.entity_f1 of ``model``'s tags on [(words, tags)], computed without token_classify: one
    PyNative forward per sentence, each word read at its first sub-token."""
    import mindspore as ms
    from ms_dfkd import build, metrics
    from ms_dfkd.ner_data import bio_tag_names
    ms.set_context(mode=ms.PYNATIVE_MODE)
    names = bio_tag_names(cfg.task.entity_types)
    tok = build.teacher_tokenizer(cfg)
    true, pred = [], []
    for words, tags in sentences:
        ids, mask, word_ids = tok.encode_words_batch([words], max_length=max_length, padding="max_length")
        logits = model(input_ids=ms.Tensor(ids), attention_mask=ms.Tensor(mask)).asnumpy()[0]
        p = []
        for w in range(len(words)):
            at = [j for j, x in enumerate(word_ids[0].tolist()) if x == w]
            p.append(names[int(logits[at[0]].argmax())] if at else "O")
        pred.append(p)
        true.append([t if t == "O" or t[2:] in cfg.task.entity_types else "O" for t in tags])
    return metrics.entity_f1(true, pred)


def _same(reported, expected):
    assert reported["micro_f1"] == pytest.approx(expected["micro_f1"], abs=1e-12)
    assert reported["predicted"] == expected["predicted"] and reported["support"] == expected["support"]
    assert set(reported["per_type"]) == set(expected["per_type"])
    for t, r in expected["per_type"].items():
        for k in ("precision", "recall", "f1", "support"):
            assert reported["per_type"][t][k] == pytest.approx(r[k], abs=1e-12), (t, k)


def test_reported_f1_is_entity_f1_of_the_saved_teachers_predictions(teacher, bio_files, tmp_path, capsys):
    from ms_dfkd import build
    from ms_dfkd.models.checkpoint_io import safetensors_metadata
    from ms_dfkd.ner_data import read_bio_file
    over, ckpt = teacher
    cfg = load_config(SMOKE_NER, parse_overrides(over))
    meta = safetensors_metadata(ckpt)
    assert meta["kind"] == "token" and json.loads(meta["tag_names"]) == ["O", "B-person", "I-person",
                                                                          "B-geo-loc", "I-geo-loc"]
    saved = json.loads(meta["dev"])
    assert [e["epoch"] for e in json.loads(meta["dev_by_epoch"])] == [1, 2, 3]
    dev = read_bio_file(bio_files["dev"])
    expected = _independent_scores(build.load_teacher(cfg), cfg, dev, cfg.teacher.max_length)
    assert expected["predicted"] > 0 and 0.5 < expected["micro_f1"] < 1  # the checks below are not 0 == 0
    _same(saved, expected)
    assert saved["n"] == len(dev)

    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", "--config", SMOKE_NER, *over, "--split", "dev", "--json-out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    _same(printed["teacher"], expected)
    assert main(["eval", "--config", SMOKE_NER, *over, "--file", bio_files["dev"], "--json-out", str(out)]) == 0
    _same(json.loads(out.read_text())["teacher"], expected)


def test_eval_of_a_token_student(teacher, bio_files, tmp_path):
    """eval --student: a student of the token head, saved as distill-from-texts saves one, is scored too."""
    from ms_dfkd import build
    from ms_dfkd.models.checkpoint_io import save_safetensors, state_of
    from ms_dfkd.ner_data import read_bio_file
    over, _ = teacher
    cfg = load_config(SMOKE_NER, parse_overrides(over + ["--run.seed", "3"]))
    student = build.build_student(cfg)
    path = tmp_path / "student.safetensors"
    save_safetensors({"student/" + k: v for k, v in state_of(student).items()}, path,
                     metadata={"format": "ms-dfkd-student", "arch": cfg.student.arch})
    out = tmp_path / "eval.json"
    assert main(["eval", "--config", SMOKE_NER, *over, "--run.seed", "3", "--split", "dev", "--no-teacher",
                 "--student", str(path), "--json-out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res) == {"student"}
    _same(res["student"], _independent_scores(student, cfg, read_bio_file(bio_files["dev"]), cfg.student.max_length))


def test_smoke_ner_config_trains_on_wnut16(tmp_path):
    """The shipped smoke config as it is (WNUT-16 splits), a few steps: checkpoint with its dev scores."""
    from ms_dfkd.models.checkpoint_io import safetensors_metadata
    ckpt = tmp_path / "t.safetensors"
    assert main(["train-teacher", "--config", SMOKE_NER, "--teacher.checkpoint", str(ckpt),
                 "--teacher.train_examples", "64", "--teacher.epochs", "1"]) == 0
    meta = safetensors_metadata(ckpt)
    assert json.loads(meta["label_names"]) == ["person", "geo-loc"]
    dev = json.loads(meta["dev"])
    assert dev["support"] == 83 and dev["n"] == 251  # wnut16:dev's person and geo-loc entities


def test_config_resolves_a_token_task(tmp_path, bio_files):
    wnut = parse_overrides(["--task.kind", "token", "--task.train", "wnut16:train", "--task.dev", "wnut16:dev",
                            "--task.test", "wnut16:test", "--generator.batch_size", "10"])
    cfg = load_config(None, wnut)
    from ms_dfkd.ner_data import WNUT16_TYPES
    assert cfg.task.entity_types == list(WNUT16_TYPES) == cfg.task.label_names
    assert cfg.task.metric == "entity_f1"
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    files = parse_overrides(["--task.kind", "token", "--task.train", bio_files["train"], "--task.dev",
                             bio_files["dev"], "--task.test", bio_files["dev"]])
    cfg = load_config(None, files + [("generator.batch_size", "3")])
    assert cfg.task.entity_types == ["company", "geo-loc", "person"]  # the file's types, sorted
    with pytest.raises(ConfigError, match="task.label_names"):
        load_config(None, wnut + [("task.entity_types", "person,geo-loc"), ("task.label_names", "a,b")])
    with pytest.raises(ConfigError, match="task.metric"):
        load_config(None, wnut + [("task.metric", "accuracy_x")])
    with pytest.raises(ConfigError, match="task.train: 'wnut16:trian' has no split"):
        load_config(None, wnut + [("task.train", "wnut16:trian")])


@pytest.mark.parametrize("name,cmd,named", [
    ("unknown entity type", ["train-teacher", "--task.entity_types", "person,persn"],
     "task.entity_types: 'persn' is not a WNUT-16 type"),
    ("repeated entity type", ["train-teacher", "--task.entity_types", "person,person"], "task.entity_types"),
    ("kind typo", ["train-teacher", "--task.kind", "tokn"], "task.kind: 'tokn'"),
    ("token data for a sequence task", ["eval", "--task.kind", "sequence", "--task.entity_types", ""], "task.train"),
    ("sequence data for a token task", ["eval", "--task.dev", "rotten_tomatoes:dev"], "task.dev"),
    ("a labelled tsv as a BIO file", ["eval", "--file", "{tmp}/sentiment.tsv"], "sentiment.tsv:1: bad tag 'label'"),
    ("a missing BIO file", ["eval", "--file", "{tmp}/missing.txt"], "missing.txt"),
    ("a type absent from the train file", ["train-teacher", "--task.train", "{tmp}/few.txt", "--task.dev",
                                           "{tmp}/few.txt", "--task.test", "{tmp}/few.txt"],
     "task.entity_types: 'geo-loc' has no entity in task.train="),
    ("a filter on a token task", ["distill", "--run.method", "prompted", "--run.min_confidence", "0.5"],
     "run.min_confidence: 0.5; the teacher-confidence filter is not built for token tasks"),
])
def test_bad_input_is_one_error_line(name, cmd, named, tmp_path, capsys):
    (tmp_path / "sentiment.tsv").write_text("text\tlabel\ngreat film\tpositive\n")
    (tmp_path / "few.txt").write_text("alice\tB-person\nsmiles\tO\n\n")
    cmd = [c.replace("{tmp}", str(tmp_path)) for c in cmd]
    ckpt = tmp_path / "never.safetensors"
    capsys.readouterr()
    assert main([cmd[0], "--config", SMOKE_NER, "--teacher.checkpoint", str(ckpt), *cmd[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ms-dfkd {cmd[0]}: error: ") and named in err[0], err
    assert not ckpt.exists()


def test_a_token_teacher_is_not_a_sequence_teacher(teacher, capsys):
    _, ckpt = teacher
    capsys.readouterr()
    assert main(["eval", "--config", SMOKE, "--teacher.checkpoint", ckpt, "--split", "dev"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a token-classification teacher, but task.kind is 'sequence'" in err[0], err


@pytest.mark.real
@pytest.mark.parametrize("arch", ["minilm_l3_onnx", "minilm_l6_layers:2"])
def test_pretrained_students_and_teacher_get_a_token_head(arch, asset_or_skip):
    """The pretrained loading paths build token heads over the tag set, backbone weights as the sequence ones."""
    import mindspore as ms
    from ms_dfkd import build
    from ms_dfkd.models.bert import BertForTokenClassification
    from ms_dfkd.models.checkpoint_io import state_of
    asset_or_skip("minilm_l6_dir"), asset_or_skip("minilm_l3_onnx")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = load_config(SMOKE_NER, parse_overrides(["--student.arch", arch, "--teacher.arch", "minilm_l6"]))
    seq = load_config(SMOKE, parse_overrides(["--student.arch", arch, "--teacher.arch", "minilm_l6"]))
    for model, ref in ((build.build_student(cfg), build.build_student(seq)),
                       (build.build_teacher_arch(cfg), build.build_teacher_arch(seq))):
        assert isinstance(model, BertForTokenClassification)
        ids, mask, _ = build.teacher_tokenizer(cfg).encode_words_batch([["Alice", "in", "Paris"]], max_length=8,
                                                                       padding="max_length")
        assert model(input_ids=ms.Tensor(ids), attention_mask=ms.Tensor(mask)).shape == (1, 8, 5)
        a, b = state_of(model), state_of(ref)
        shared = [k for k in a if k.startswith("bert.")]
        assert shared and all(np.array_equal(a[k], b[k]) for k in shared)
