"""ms_dfkd/cli.py: every bad input and fault a user can cause ends in one `error:` line that names the
key or the file, with exit status 2 (never a traceback), and leaves an existing run folder byte for
byte as it was; a resumed run refuses changed settings; a corrupted checkpoint is caught."""
import json
import shutil
import sys
from pathlib import Path

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
