"""Data-parallel runs: scripts/run_distributed.sh starts the smoke config as a 2-process msrun job on CPU.

The msrun tests (marked slow, ~2.5 min on 2 cores) check what data parallelism must keep:
every parameter bit-identical across the ranks after training, different texts per rank,
finite losses, per-rank shards merged by `inspect`, a rank killed mid-run leaving a loadable
checkpoint, and a 1-process resume of the 2-process checkpoint. The fast tests check the
script's argument errors and the fp16 dynamic loss scaling of make_train_step against
hand-computed expectations.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "run_distributed.sh"
SMOKE = "configs/smoke.yaml"


def _env(**extra):
    env = dict(os.environ, GLOG_v="3", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # msrun and python of this venv
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _script(*args, **popen):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, **popen)


# ------------------------------------------------------------------ argument errors (fast, no msrun job)

def test_script_rejects_bad_arguments_before_starting(tmp_path):
    r = _script("configs/missing.yaml")
    assert r.returncode == 2 and "config file not found: configs/missing.yaml" in r.stderr
    r = _script("--nproc-per-node", "two", SMOKE)
    assert r.returncode == 2 and "--nproc-per-node must be a non-negative integer, got 'two'" in r.stderr
    r = _script("--nnodes", "2", "--node-rank", "2", SMOKE)
    assert r.returncode == 2 and "--node-rank 2 must be below --nnodes 2" in r.stderr
    r = _script("--master-port", "80", SMOKE)
    assert r.returncode == 2 and "1024-65535" in r.stderr
    r = _script(SMOKE, "--run.rounds", "zero")
    assert r.returncode == 2 and "run.rounds" in r.stderr
    r = _script("--rank-table", tmp_path / "no_table.json", SMOKE)
    assert r.returncode == 2 and "rank-table file not found" in r.stderr
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _script("--master-port", port, SMOKE)
    assert r.returncode == 2 and f"master port {port}" in r.stderr and "not free" in r.stderr
    assert "--master-port" in _script("--help").stdout


def test_script_without_msrun(tmp_path):
    # a copy of the script in a tree with no .venv, run with a PATH that has bash but no MindSpore
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts")
    (tmp_path / "c.yaml").write_text("run:\n  rounds: 1\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    r = subprocess.run(["bash", "scripts/run_distributed.sh", "c.yaml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "msrun not found" in r.stderr, r.stderr


# ------------------------------------------------------------------ fp16 dynamic loss scaling (fast)

def test_fp16_dynamic_loss_scaling_skips_overflow_and_keeps_fp32_weights():
    """loss = sum(fp16(w) * fp16(x)): d loss/d w = x, and the scaled fp16 gradient x * scale overflows
    (> 65504) for x = 2 while scale >= 32768. Expected by hand with SGD(lr 0.1), scale 2**16, factor 2,
    window 2: steps 0 and 1 are skipped (scale 2**16 -> 2**15 -> 2**14), step 2 updates w -= 0.1 * x, step 3
    updates again and doubles the scale after 2 finite steps, step 4 overflows again."""
    import mindspore as ms
    from mindspore import amp, nn
    from ms_dfkd.steps import make_train_step
    ms.set_context(mode=ms.PYNATIVE_MODE)

    class Dot16(nn.Cell):
        def __init__(self):
            super().__init__()
            self.w = ms.Parameter(ms.Tensor(np.ones(3, np.float32)), name="w16")

        def construct(self, x):
            y = (self.w.astype(ms.float16) * x.astype(ms.float16)).sum().astype(ms.float32)
            return y, y

    net = Dot16()
    opt = nn.SGD(net.trainable_params(), learning_rate=0.1)
    scaler = amp.DynamicLossScaler(2.0 ** 16, 2, 2)
    step = make_train_step(net, opt, jit=False, loss_scaler=scaler)
    x = np.array([2.0, 1.0, 0.5], np.float32)
    w = np.ones(3, np.float32)
    expected = [(False, 2.0 ** 15), (False, 2.0 ** 14), (True, 2.0 ** 14), (True, 2.0 ** 15), (False, 2.0 ** 14)]
    for i, (applied, scale_after) in enumerate(expected):
        loss, _ = step(ms.Tensor(x))
        assert float(loss.asnumpy()) == pytest.approx(float(w @ x), rel=1e-3), i  # unscaled loss
        if applied:
            w = w - np.float32(0.1) * x
        np.testing.assert_allclose(net.w.asnumpy(), w, rtol=1e-6, err_msg=f"step {i}")
        assert float(scaler.scale_value.asnumpy()) == scale_after, i
        assert net.w.dtype == ms.float32  # master weights stay float32


def test_fp16_student_step_matches_fp32():
    """A tiny BERT student computing its matmuls in float16 takes (with loss scaling) nearly the same
    SGD step as the float32 one; gradients are compared against the float32 step, weights stay float32."""
    import mindspore as ms
    from mindspore import amp, nn
    from ms_dfkd.models.bert import BertConfig, BertForSequenceClassification
    from ms_dfkd.steps import StudentLoss, make_train_step
    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(0)
    ids = ms.Tensor(rng.integers(5, 100, size=(4, 8)).astype(np.int32))
    mask = ms.Tensor(np.ones((4, 8), np.int32))
    t_logits = ms.Tensor(rng.normal(size=(4, 2)).astype(np.float32))
    feat = ms.Tensor(np.zeros((4, 1), np.float32))
    deltas = {}
    for dt in ("float32", "float16"):
        ms.set_seed(3)
        model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=4, intermediate_size=64,
                                                         num_labels=2, compute_dtype=dt))
        model.set_train(False)
        params = model.trainable_params()  # the same order for both dtypes
        before = [p.asnumpy().copy() for p in params]
        loss_cell = StudentLoss(model, 2.0)
        opt = nn.SGD(loss_cell.trainable_params(), learning_rate=1.0)
        scaler = amp.DynamicLossScaler(2.0 ** 12, 2, 1000) if dt == "float16" else None
        loss, _ = make_train_step(loss_cell, opt, jit=False, loss_scaler=scaler)(ids, mask, t_logits, feat)
        assert np.isfinite(loss.asnumpy())
        assert all(p.dtype == ms.float32 for p in model.trainable_params())
        deltas[dt] = {p.name: b - p.asnumpy() for p, b in zip(params, before)}
    for name, d32 in deltas["float32"].items():
        d16 = deltas["float16"][name]
        scale = np.abs(d32).max()
        if scale > 1e-6:
            assert np.abs(d16 - d32).max() <= 0.05 * scale + 1e-6, name


# ------------------------------------------------------------------ msrun jobs (slow)

@pytest.fixture(scope="module")
def teacher(smoke_teacher):
    return Path(smoke_teacher)


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_two_process_cpu_run(teacher, tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    r = _script("--nproc-per-node", 2, "--master-port", _free_port(), "--dump-params", SMOKE,
                "--teacher.checkpoint", teacher, "--run.out_dir", out, timeout=400)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    print(f"2-process smoke run: {time.time() - t0:.1f} s")
    assert sorted(p.name for p in (out / "msrun_log").glob("worker_*.log")) == ["worker_0.log", "worker_1.log"]

    # every parameter and optimizer state is bit-identical across the ranks, and is what rank 0 saved
    from safetensors.numpy import load_file
    p0, p1 = load_file(out / "params.rank0.safetensors"), load_file(out / "params.rank1.safetensors")
    ck = load_file(out / "checkpoint.safetensors")
    # beside the weights, the checkpoint keeps the teacher's outputs on rank 0's 16 buffered texts
    assert ck.pop("replay/teacher_logits").shape == (16, 2)
    assert ck.pop("replay/teacher_features").shape[0] == 16
    assert sorted(p0) == sorted(p1) == sorted(ck) and any(k.startswith("generator/") for k in p0)
    for k in p0:
        assert np.array_equal(p0[k], p1[k]), k
        assert np.array_equal(p0[k], ck[k]), k

    # each rank wrote its own texts (its own corpus shard and Gumbel noise); 2 rounds x 2 steps x 4
    shards = [_records(out / f"generated.rank{r}.jsonl") for r in (0, 1)]
    assert [len(s) for s in shards] == [16, 16]
    assert [{x["rank"] for x in s} for s in shards] == [{0}, {1}]
    t0_, t1_ = [x["text"] for x in shards[0]], [x["text"] for x in shards[1]]
    assert sum(a != b for a, b in zip(t0_, t1_)) >= 14 and not set(t0_) & set(t1_)
    assert not (out / "generated.jsonl").exists()

    # rank 0 alone wrote the metrics: one line a round, finite losses
    metrics = _records(out / "metrics.jsonl")
    assert [m["round"] for m in metrics] == [0, 1]
    for m in metrics:
        for k in ("loss_g", "loss_spec", "loss_flu", "loss_s"):
            assert np.isfinite(m[k]), k

    # `inspect` merges the shards
    r = subprocess.run([sys.executable, "-m", "ms_dfkd.cli", "inspect", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0 and "32 generated texts" in r.stdout, r.stderr


@pytest.mark.slow
def test_ranks_agree_under_msrun(tmp_path):
    """The resume guard: equal values agree on every rank, rank-dependent ones disagree on every rank."""
    script = tmp_path / "agree.py"
    script.write_text("import sys\nsys.path.insert(0, %r)\n" % str(ROOT) + (
        "from ms_dfkd import distributed as D\n"
        "rank, world = D.init_data_parallel()\n"
        "print('RESULT', rank, world, D.ranks_agree([3, 7]), D.ranks_agree([3, rank]), flush=True)\n"))
    r = subprocess.run(["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
                        f"--log_dir={tmp_path / 'log'}", "--join=True", str(script)], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for rank in (0, 1):
        assert f"RESULT {rank} 2 True False" in (tmp_path / "log" / f"worker_{rank}.log").read_text()


def _wait_for(cond, proc, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (rc {proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_killed_rank_leaves_loadable_checkpoint_and_one_process_resume(teacher, tmp_path):
    out = tmp_path / "run"
    log_dir = out / "msrun_log"
    args = ["--run.rounds", "3", "--teacher.checkpoint", teacher, "--run.out_dir", out]
    proc = subprocess.Popen(["bash", str(SCRIPT), "--master-port", str(_free_port()), SMOKE, *map(str, args)],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ck = out / "checkpoint.safetensors"
        shard1 = out / "generated.rank1.jsonl"
        _wait_for(ck.exists, proc, 300, "the first checkpoint")
        size_at_ckpt = shard1.stat().st_size
        # kill rank 1 once it has written samples past the checkpoint (mid round 1)
        _wait_for(lambda: shard1.stat().st_size > size_at_ckpt, proc, 120, "a sample after the checkpoint")
        pid = int(re.search(r"rank 1 of 2 \(pid (\d+)\)", (log_dir / "worker_1.log").read_text()).group(1))
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "the distributed job failed" in err and str(log_dir) in err and "resumes with the same command" in err
    assert f"rank 1 (pid {pid}) was killed by signal 9" in err

    # the last checkpoint loads: it is a whole run checkpoint of round 1 (or 2, if saved just before the kill)
    from ms_dfkd.models.checkpoint_io import load_safetensors, safetensors_metadata
    arrays = load_safetensors(ck)
    state = json.loads(safetensors_metadata(ck)["state"])
    assert state["world_size"] == 2 and state["counters"]["round"] >= 1 and arrays
    done_steps = state["counters"]["gen_steps"]
    # rank 1's samples past that checkpoint (none where the next checkpoint was saved between the poll and
    # the kill: a smoke round can take less than the poll); a line cut by the kill counts as one
    lines = shard1.read_text().splitlines()
    past = [line for line in lines if line.strip() and (not line.endswith("}") or json.loads(line)["step"] >= done_steps)]

    # a 1-process resume from the 2-process checkpoint continues to the end
    r = subprocess.run([sys.executable, "-m", "ms_dfkd.cli", "distill", "--config", SMOKE, *map(str, args)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ck}" in r.stderr
    state2 = json.loads(safetensors_metadata(ck)["state"])
    assert state2["counters"]["round"] == 3 and state2["counters"]["gen_steps"] == 6 and state2["world_size"] == 1
    assert [m["round"] for m in _records(out / "metrics.jsonl")] == [0, 1, 2]
    # samples written after the checkpoint were moved aside, in every shard; the new ones go to generated.jsonl
    for rank in (0, 1):
        kept = _records(out / f"generated.rank{rank}.jsonl")
        assert len(kept) == 4 * done_steps and all(x["step"] < done_steps for x in kept)
    assert bool(list(out.glob("generated.rank1.jsonl.*.orphaned"))) == bool(past)
    new = _records(out / "generated.jsonl")
    assert len(new) == 4 * (6 - done_steps) and min(x["step"] for x in new) == done_steps
    assert all(np.isfinite(m["loss_g"]) for m in _records(out / "metrics.jsonl"))
