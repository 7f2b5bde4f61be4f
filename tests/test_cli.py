"""ms_dfkd/cli.py: every bad input and fault a user can cause ends in one `error:` line that names the
key or the file, with exit status 2 (never a traceback), and leaves an existing run folder byte for
byte as it was; a resumed run refuses changed settings; a corrupted checkpoint is caught."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ms_dfkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


def _files(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


@pytest.fixture
def run_copy(smoke_one_round_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(smoke_one_round_run, out)
    return out


def _texts(tmp_path, name, content):
    f = tmp_path / name
    f.write_bytes(content)
    return str(f)


# (name, command after the subcommand's --config/--teacher.checkpoint/--run.out_dir, what the message names)
# {run} is the existing run folder, {tmp} a scratch folder
BAD = [
    ("rounds inf", ["distill", "--run.rounds", "inf"], "run.rounds"),
    ("rounds nan", ["distill", "--run.rounds", "nan"], "run.rounds"),
    ("rounds word", ["distill", "--run.rounds", "zero"], "run.rounds"),
    ("gumbel tau nan", ["distill", "--generator.gumbel_tau", "nan"], "generator.gumbel_tau"),
    ("negative student lr", ["distill", "--student.lr", "-1e-4"], "student.lr"),
    ("negative generator lr", ["distill", "--generator.lr", "-0.5"], "generator.lr"),
    ("empty replay", ["distill", "--run.replay_size", "0"], "run.replay_size"),
    ("unknown key", ["distill", "--run.roundz", "3"], "run.roundz"),
    ("out_dir placeholder", ["distill", "--run.out_dir", "{tmp}/runs_{b}"], "run.out_dir"),
    ("read-only out_dir", ["distill", "--run.out_dir", "/sys/ms_dfkd_test_run"], "/sys/ms_dfkd_test_run"),
    ("missing corpus file", ["distill", "--corpus.sources", "file:{tmp}/missing.txt"], "missing.txt"),
    ("fresh over a run", ["distill", "--fresh"], "would be overwritten"),
    ("changed settings on resume", ["distill", "--loss.div", "3.0", "--generator.lr", "0.5"],
     "refusing to resume with generator.lr 0.001 -> 0.5; loss.div 0.5 -> 3.0"),
    ("unsupported kernels", ["distill", "--run.kernels", "cuda_magic"], "run.kernels"),
    ("binary eval file", ["eval", "--file", "{tmp}/binary.tsv"], "binary.tsv: not UTF-8 text"),
    ("eval label unknown", ["eval", "--file", "{tmp}/neutral.tsv"], "neutral"),
    ("texts not objects", ["distill-from-texts", "--texts", "{tmp}/lists.jsonl", "--out", "{tmp}/s.safetensors"],
     "record 0 is not an object"),
    ("texts without text", ["distill-from-texts", "--texts", "{tmp}/notext.jsonl", "--out", "{tmp}/s.safetensors"],
     "record 1 is not an object with a \"text\" string"),
    ("select fraction 0", ["select-passages", "--out", "{tmp}/p.jsonl", "--fraction", "0"], "--fraction"),
    ("select out suffix", ["select-passages", "--out", "{tmp}/p.csv"], "p.csv"),
    ("binary texts", ["distill-from-texts", "--texts", "{tmp}/binary.jsonl", "--out", "{tmp}/s.safetensors"],
     "binary.jsonl: not UTF-8 text"),
]


@pytest.mark.parametrize("name,cmd,named", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_error_line_and_touches_nothing(name, cmd, named, smoke_teacher, run_copy, tmp_path,
                                                          capsys, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    _texts(scratch, "binary.tsv", b"text\tlabel\n\xff\xfe\x00\x81\t0\n")
    _texts(scratch, "binary.jsonl", b'{"text": "\xff\xfe"}\n')
    _texts(scratch, "neutral.tsv", b"text\tlabel\ngreat film\tpositive\nmeh\tneutral\n")
    _texts(scratch, "lists.jsonl", b'["a list", 1]\n')
    _texts(scratch, "notext.jsonl", b'{"text": "ok", "teacher_probs": [0.5, 0.5]}\n{"teacher_probs": [0.5, 0.5]}\n')
    monkeypatch.chdir(scratch)  # nothing may be written into the working directory either (rank_0/, ...)
    before, cwd_before = _files(run_copy), sorted(p.name for p in scratch.iterdir())
    cmd = [c.replace("{tmp}", str(scratch)).replace("{run}", str(run_copy)) for c in cmd]
    sub, rest = cmd[0], cmd[1:]
    common = ["--config", SMOKE, "--teacher.checkpoint", smoke_teacher]
    if sub == "distill" and "--run.out_dir" not in rest:
        common += ["--run.out_dir", str(run_copy)]
    capsys.readouterr()
    assert main([sub, *common, *rest]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ms-dfkd {sub}: error: ") and named in err[0], err
    assert _files(run_copy) == before
    assert sorted(p.name for p in scratch.iterdir()) == cwd_before


def _flip_tensor_bytes(path, n=64):
    """Flip n bytes in the middle of a safetensors file's tensor data (past its JSON header)."""
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    mid = header + (len(raw) - header) // 2
    for i in range(mid, mid + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupted_checkpoint_names_the_file_and_the_previous_one(smoke_teacher, run_copy, capsys):
    def distill(*extra):
        return main(["distill", "--config", SMOKE, "--teacher.checkpoint", smoke_teacher,
                     "--run.out_dir", str(run_copy), *extra])
    ck, prev = run_copy / "checkpoint.safetensors", run_copy / "checkpoint.prev.safetensors"
    assert not prev.exists()  # one save so far
    good = ck.read_bytes()
    _flip_tensor_bytes(ck)
    bad = ck.read_bytes()
    capsys.readouterr()
    assert distill("--run.rounds", "2") == 2
    err = capsys.readouterr().err
    assert f"{ck} is corrupted" in err and "no previous checkpoint is kept" in err and ck.read_bytes() == bad

    ck.write_bytes(good)
    assert distill("--run.rounds", "2") == 0  # extending the run is allowed, and recorded
    change = [json.loads(l) for l in (run_copy / "config_changes.jsonl").read_text().splitlines()]
    assert change[0]["changed"]["run.rounds"] == [1, 2]  # and run.out_dir: this is a copy of the run
    assert prev.read_bytes() == good  # the save of round 1 kept the one it replaced
    _flip_tensor_bytes(ck)
    capsys.readouterr()
    assert distill("--run.rounds", "3") == 2
    err = capsys.readouterr().err
    assert f"the previous checkpoint is {prev}: move it to {ck}" in err
    prev.replace(ck)  # one save back: round 0's checkpoint; the lines written after it are moved aside
    assert distill("--run.rounds", "3") == 0
    rounds = [json.loads(l)["round"] for l in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]


def test_full_disk_at_checkpoint_keeps_the_previous_checkpoint(smoke_teacher, run_copy, capsys, monkeypatch):
    import safetensors.numpy
    from safetensors import SafetensorError
    ck = run_copy / "checkpoint.safetensors"
    good = ck.read_bytes()

    def no_space(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.numpy, "save_file", no_space)
    capsys.readouterr()
    assert main(["distill", "--config", SMOKE, "--teacher.checkpoint", smoke_teacher, "--run.out_dir",
                 str(run_copy), "--run.rounds", "2"]) == 2
    err = capsys.readouterr().err
    assert f"could not write {ck}" in err and "No space left" in err and "previous one there is unchanged" in err
    assert ck.read_bytes() == good
    assert not [p for p in run_copy.iterdir() if p.name.endswith(".tmp")]


def test_non_finite_loss_stops_before_saving(smoke_teacher, run_copy, capsys, monkeypatch):
    """A student step whose loss comes back NaN (as after a diverged update) stops the run with an error
    naming the step; the checkpoint is the last good one, and the run resumes from it."""
    import mindspore as ms
    import numpy as np
    from ms_dfkd import steps
    real = steps.make_train_step

    def nan_loss_step(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(*inputs):
            loss, *aux = step(*inputs)
            return (ms.Tensor(np.float32("nan")), *aux)
        return wrapped
    monkeypatch.setattr(steps, "make_train_step", nan_loss_step)
    ck = run_copy / "checkpoint.safetensors"
    good = ck.read_bytes()
    cmd = ["distill", "--config", SMOKE, "--teacher.checkpoint", smoke_teacher, "--run.out_dir", str(run_copy),
           "--run.rounds", "2"]
    capsys.readouterr()
    assert main(cmd) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("ms-dfkd distill: error: student step 2: loss = nan; the run folder resumes from its last "
                       "checkpoint")  # the lines before it are the progress bar's
    assert not any("Traceback" in line for line in err)
    assert ck.read_bytes() == good
    monkeypatch.setattr(steps, "make_train_step", real)
    assert main(cmd) == 0
    rounds = [json.loads(l)["round"] for l in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1]


# ------------------------------------------------------------------ commands that make something

def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_generate_and_generate_from_a_run(smoke_teacher, run_copy, tmp_path, monkeypatch):
    """generate writes N texts, targets balanced over the labels, each with the teacher's probabilities.
    --from-run samples with the run's trained generator: for the same passages it makes the same prompts
    and draws the same noise as the pretrained generator, and other texts. (The smoke generator's logits
    are too flat for two small steps to change a Gumbel-max sample, so the run's checkpoint gets a generator
    with sharper logits first: its tied embedding table scaled up. The run folder is left as it was.)"""
    from ms_dfkd.models.checkpoint_io import load_safetensors, safetensors_metadata, save_safetensors
    from ms_dfkd.train import Distiller
    ck = run_copy / "checkpoint.safetensors"
    arrays = load_safetensors(ck)
    arrays["generator/model.embed_tokens.weight"] = arrays["generator/model.embed_tokens.weight"] * 30.0
    save_safetensors(arrays, ck, metadata={k: v for k, v in safetensors_metadata(ck).items() if k != "sha256"})
    batches, real_generate = [], Distiller.generate_batch

    def recording(self, *args, **kwargs):
        cursor = self.corpus_sampler.state_dict()
        s = real_generate(self, *args, **kwargs)
        batches.append((self, cursor, s))
        return s
    monkeypatch.setattr(Distiller, "generate_batch", recording)
    common = ["generate", "--config", SMOKE, "--teacher.checkpoint", smoke_teacher]
    plain, from_run = tmp_path / "plain.jsonl", tmp_path / "from_run.jsonl"
    before = _files(run_copy)
    assert main([*common, "--num", "6", "--out", str(plain)]) == 0
    n_plain = len(batches)
    assert main([*common, "--num", "6", "--out", str(from_run), "--from-run", str(run_copy)]) == 0
    assert _files(run_copy) == before
    assert n_plain == 2 and len(batches) == 4  # ceil(6 / batch size 4) batches each

    recs = _jsonl(plain)
    assert len(recs) == 6 and len(_jsonl(from_run)) == 6  # N texts, not whole batches
    assert [r["target"] for r in recs] == [0, 1, 0, 1, 0, 1]  # balanced: 3 of each label
    for r in recs + _jsonl(from_run):
        assert set(r) == {"text", "target", "teacher_probs"} and isinstance(r["text"], str)
        assert len(r["teacher_probs"]) == 2 and abs(sum(r["teacher_probs"]) - 1) < 1e-5
    assert [r["text"] for r in recs] == [t for _, _, s in batches[:2] for t in s["texts"]][:6]

    d_plain, d_run = batches[0][0], batches[2][0]
    assert d_plain.method == "prompted" and d_run.method == "dfkd-t3"
    for (_, _, a), (_, _, b) in zip(batches[:2], batches[2:]):
        assert a["seed"] == b["seed"]  # generate's own noise stream, the same for both
    for n, p in d_run.generator.parameters_and_names():  # the run's generator, as its checkpoint has it
        np.testing.assert_array_equal(p.asnumpy(), arrays["generator/" + n], err_msg=n)
    # the pretrained generator on the from-run batch's passages: the same prompts and noise, other samples
    _, cursor, trained = batches[2]
    d_plain.corpus_sampler.load_state_dict(cursor)
    pre = real_generate(d_plain, 10_000_000)
    assert pre["passages"] == trained["passages"] and pre["seed"] == trained["seed"]
    np.testing.assert_array_equal(pre["p_ids"], trained["p_ids"])
    assert pre["texts"] != trained["texts"]
    assert [r["text"] for r in _jsonl(from_run)[:4]] == trained["texts"]


def test_generate_continues_an_interrupted_or_shorter_file(smoke_teacher, tmp_path, monkeypatch, capsys):
    """A rerun of generate continues its file: after a smaller --num, after a Ctrl-C and after a torn last
    line, it ends with exactly the texts of one uninterrupted run. Other settings, a smaller --num, a file
    it did not write and a second process are refused with one line, and leave the file as it was."""
    from ms_dfkd.run_files import FileLock
    from ms_dfkd.train import Distiller
    common = ["generate", "--config", SMOKE, "--teacher.checkpoint", smoke_teacher]
    ref, part = tmp_path / "ref.jsonl", tmp_path / "part.jsonl"
    assert main([*common, "--num", "10", "--out", str(ref)]) == 0  # batches of 4: 4 + 4 + 2
    assert main([*common, "--num", "6", "--out", str(part)]) == 0
    assert len(_jsonl(part)) == 6

    calls, real_generate = [], Distiller.generate_batch

    def interrupted_at_the_second_batch(self, step_id, *args, **kwargs):
        calls.append(step_id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(self, step_id, *args, **kwargs)
    monkeypatch.setattr(Distiller, "generate_batch", interrupted_at_the_second_batch)
    capsys.readouterr()
    assert main([*common, "--num", "10", "--out", str(part)]) == 130
    assert "interrupted; run the same command again to continue" in capsys.readouterr().err
    assert calls == [10_000_001, 10_000_002]  # batch 1 completed (rows 6, 7), batch 2 cut short
    assert len(_jsonl(part)) == 8
    with open(part, "a") as f:
        f.write('{"text": "half a li')  # a process killed while writing
    monkeypatch.setattr(Distiller, "generate_batch", real_generate)
    assert main([*common, "--num", "10", "--out", str(part)]) == 0
    assert _jsonl(part) == _jsonl(ref)
    assert (tmp_path / "part.jsonl.torn.orphaned").read_text() == '{"text": "half a li'

    before = part.read_bytes()
    for extra, words in ((["--num", "10", "--generator.top_p", "0.5"], "generator.top_p 1.0 -> 0.5"),
                         (["--num", "10", "--run.seed", "3"], "run.seed 0 -> 3"),
                         (["--num", "4"], "already holds 10 texts, more than --num 4")):
        capsys.readouterr()
        assert main([*common, *extra, "--out", str(part)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0] and str(part) in err[0], err
    assert part.read_bytes() == before
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"text": "my own"}\n')
    assert main([*common, "--num", "4", "--out", str(foreign)]) == 2
    assert "was not written by this command" in capsys.readouterr().err
    with FileLock(tmp_path / ".part.jsonl.lock", "part", "wait"):  # another generate writing it
        assert main([*common, "--num", "12", "--out", str(part)]) == 2
        assert "--out " + str(part) + " is in use by pid" in capsys.readouterr().err
    assert part.read_bytes() == before


def test_train_teacher_reuses_its_checkpoint_unless_forced(smoke_teacher, tmp_path, caplog):
    import logging
    from ms_dfkd.build import load_teacher
    from ms_dfkd.config import load_config, parse_overrides
    from ms_dfkd.models.checkpoint_io import load_safetensors, safetensors_metadata
    ck = tmp_path / "teacher.safetensors"
    shutil.copy(smoke_teacher, ck)
    old, old_mtime = ck.read_bytes(), ck.stat().st_mtime_ns
    cmd = ["train-teacher", "--config", SMOKE, "--teacher.checkpoint", str(ck), "--teacher.train_examples", "64"]
    with caplog.at_level(logging.INFO, logger="ms_dfkd"):
        assert main(cmd) == 0
    assert "teacher checkpoint exists, reusing it" in caplog.text
    assert ck.read_bytes() == old and ck.stat().st_mtime_ns == old_mtime  # untouched, though the settings differ
    assert main([*cmd, "--force", "--teacher.epochs", "2"]) == 0  # retrained on 64 examples instead of 512
    new = load_safetensors(ck)
    assert ck.read_bytes() != old
    changed = [k for k, v in load_safetensors(smoke_teacher).items() if not np.array_equal(v, new[k])]
    assert "classifier.weight" in changed and len(changed) > 10
    meta = safetensors_metadata(ck)
    assert meta["format"] == "ms-dfkd-teacher" and json.loads(meta["dev"])["n"] > 1000
    cfg = load_config(SMOKE, parse_overrides(["--teacher.checkpoint", str(ck)]))
    teacher = load_teacher(cfg)  # loads as a teacher
    # a dev score after each epoch; the last is the saved teacher's, recomputed here without classify.py
    curve = json.loads(meta["dev_by_epoch"])
    assert [e["epoch"] for e in curve] == [1, 2]
    assert curve[-1]["accuracy"] == pytest.approx(json.loads(meta["dev"])["accuracy"], abs=1e-12)
    import mindspore as ms
    from ms_dfkd import build
    from ms_dfkd.data import load_split
    ms.set_context(mode=ms.PYNATIVE_MODE)
    dev, tok = load_split(cfg, "dev"), build.teacher_tokenizer(cfg)
    hits = 0
    for a in range(0, len(dev), 128):
        ids, mask = tok.encode_batch([t for t, _ in dev[a:a + 128]], max_length=cfg.teacher.max_length,
                                     padding="max_length")
        logits = teacher(input_ids=ms.Tensor(ids), attention_mask=ms.Tensor(mask)).asnumpy()
        hits += int((logits.argmax(-1) == np.array([y for _, y in dev[a:a + 128]])).sum())
    assert curve[-1]["n"] == len(dev) and curve[-1]["accuracy"] == pytest.approx(hits / len(dev), abs=1e-12)


def test_eval_json_out_and_no_teacher(smoke_teacher, smoke_one_round_run, tmp_path, capsys):
    """eval --json-out writes exactly what it prints; --no-teacher evaluates the student alone and needs no
    teacher checkpoint."""
    f = tmp_path / "eval.tsv"
    f.write_text("text\tlabel\na great and moving film\tpositive\ndull and far too long\tnegative\n"
                 "it works\t1\nnot good\t0\nfine\tpositive\n")
    out = tmp_path / "res.json"
    common = ["eval", "--config", SMOKE, "--file", str(f), "--student", str(smoke_one_round_run)]
    capsys.readouterr()
    assert main([*common, "--teacher.checkpoint", smoke_teacher, "--json-out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert set(printed) == {"teacher", "student"}
    for res in printed.values():
        assert res["n"] == 5 and res["accuracy"] * 5 == pytest.approx(round(res["accuracy"] * 5))
    out2 = tmp_path / "sub" / "student_only.json"
    assert main([*common, "--teacher.checkpoint", str(tmp_path / "no_such_teacher.safetensors"), "--no-teacher",
                 "--json-out", str(out2)]) == 0
    printed2 = json.loads(capsys.readouterr().out)
    assert json.loads(out2.read_text()) == printed2 == {"student": printed["student"]}


def test_select_passages_keeps_the_most_confident_per_predicted_label(smoke_teacher, tmp_path, capsys):
    """select-passages keeps, for each label the teacher predicts, the top quarter of those passages by the
    teacher's probability of that label (checked against the teacher's probabilities on every scored
    passage, computed here); the file it writes is a corpus source that gives back exactly those passages."""
    from ms_dfkd import build
    from ms_dfkd.classify import EncoderRunner
    from ms_dfkd.config import load_config, parse_overrides
    from ms_dfkd.corpus import Corpus, CorpusSampler
    out = tmp_path / "sel" / "passages.jsonl"
    capsys.readouterr()
    assert main(["select-passages", "--config", SMOKE, "--teacher.checkpoint", smoke_teacher, "--out", str(out),
                 "--fraction", "0.25", "--max-passages", "48"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(printed[printed.index("{"):])
    kept = [json.loads(line) for line in out.read_text().splitlines()]

    cfg = load_config(SMOKE, parse_overrides(["--teacher.checkpoint", smoke_teacher]))
    corpus = Corpus(cfg.corpus.sources, cfg.corpus.min_words, cfg.corpus.max_words)
    scored = CorpusSampler(corpus, cfg.run.seed).next_batch(48)
    runner = EncoderRunner(build.load_teacher(cfg), build.teacher_tokenizer(cfg), cfg.teacher.max_length)
    probs = runner.probs(scored).astype(np.float64)
    pred = probs.argmax(1)
    expected = set()
    for y in set(pred.tolist()):
        rows = [i for i in range(48) if pred[i] == y]
        rows.sort(key=lambda i: (-probs[i, y], i))
        expected |= {scored[i] for i in rows[:-(-len(rows) // 4)]}  # ceil(n / 4)
    assert {r["text"] for r in kept} == expected and len(kept) == len(expected) == res["kept"]
    assert res["scored"] == 48
    for r in kept:  # the stored probabilities are the teacher's on that passage
        i = scored.index(r["text"])
        np.testing.assert_allclose(r["teacher_probs"], probs[i], atol=1e-5)
    assert set(Corpus([f"file:{out}"], cfg.corpus.min_words, cfg.corpus.max_words).passages) == expected
