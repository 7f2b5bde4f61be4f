"""The smoke config end to end through the CLI and the driver: learning wiring, frozen parts,
resume, Ctrl-C, and bad inputs that must not destroy existing results."""
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from ms_dfkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def teacher(smoke_teacher):
    return smoke_teacher


def _cfg(teacher, out, *extra):
    from ms_dfkd.config import load_config, parse_overrides
    return load_config(SMOKE, parse_overrides(["--teacher.checkpoint", teacher, "--run.out_dir", str(out),
                                               *extra]))


def _distiller(cfg):
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE if cfg.run.mode == "graph" else ms.PYNATIVE_MODE)
    from ms_dfkd.train import Distiller
    return Distiller(cfg)


# Run in a fresh interpreter before anything else: every import of torch fails, as where it is not installed,
# and each attempt is recorded with the lines that asked for it (a try/except around an import would hide
# it otherwise). A check in this process would only see the imports made during one test.
NO_TORCH = """
import json, sys, traceback
from pathlib import Path
attempts = []

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            stack = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            attempts.append({"name": name, "from": stack[-4:]})
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, BlockTorch())
import kernels
from kernels import fused_linear_soft_embedding, kd_loss, set_kernel_backend, soft_embedding
import ms_dfkd.train
from ms_dfkd.cli import main
code = main(sys.argv[2:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] == "torch")
Path(sys.argv[1]).write_text(json.dumps({"code": code, "attempts": attempts, "loaded": loaded}))
"""


def test_smoke_distill_cli(teacher, tmp_path):
    """The whole smoke run through the command, in a fresh interpreter where torch cannot be imported."""
    import subprocess
    out, report = tmp_path / "run", tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("MS_ROLE", "TRITON_INTERPRET")}
    env["GLOG_v"] = "3"
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(report), "distill", "--config", SMOKE,
                        "--teacher.checkpoint", teacher, "--run.out_dir", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and report.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep == {"code": 0, "attempts": [], "loaded": []}, rep
    final = json.loads((out / "final.json").read_text())
    assert 0.0 <= final["teacher_test"]["accuracy"] <= 1.0 and final["teacher_test"]["n"] > 1000
    assert 0.0 <= final["student_test"]["accuracy"] <= 1.0
    # the whole test split, for both. The tiny teacher learns the label prior of its 512 training examples
    # and nothing more (configs/smoke.yaml: "not meant to learn anything"; measured: it answers positive
    # for every text, p ~ 0.562, on seeds 0-2), so its accuracy is the majority share of the test split,
    # 0.559. A teacher with swapped labels, an untrained one that answers negative, or a report on another
    # split or a part of it falls below that.
    from ms_dfkd.config import load_config
    from ms_dfkd.data import load_split
    test = load_split(load_config(SMOKE), "test")
    positive = float(np.mean([y for _, y in test]))
    assert final["teacher_test"]["n"] == final["student_test"]["n"] == len(test)
    assert final["teacher_test"]["accuracy"] >= max(positive, 1.0 - positive) - 1e-9, (final, positive)
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1]
    for m in metrics:
        for k in ("loss_g", "loss_spec", "loss_div", "loss_adv", "loss_flu", "loss_s", "specificity",
                  "bridge_agreement", "distinct_1", "distinct_2", "self_bleu", "perplexity_g0"):
            assert np.isfinite(m[k]), k
    recs = [json.loads(l) for l in (out / "generated.jsonl").read_text().splitlines()]
    assert len(recs) == 2 * 2 * 4
    assert all(abs(sum(r["teacher_probs"]) - 1) < 1e-4 for r in recs)
    printed = r.stdout
    assert "teacher test accuracy" in printed and "student test accuracy" in printed


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_generator_step_inputs_from_the_sampler_equal_the_frozen_forward(teacher, tmp_path, mode):
    """With the top layers training, the generator step's input (the states entering them) and G_θ0's logits
    come from the states the sampler computed; they equal frozen_fwd's full forward over [prompt; sample]
    where the step reads them (real positions; the logits of the sample's tokens), up to float rounding."""
    import mindspore as ms
    cfg = _cfg(teacher, tmp_path / "g", "--run.rounds", "1", "--run.mode", mode,
               "--generator.trainable", "top_k", "--generator.top_k_layers", "1")
    d = _distiller(cfg)
    assert d.reuse_trunk
    s = d.generate_batch(0, trunk=True)
    full_ids, full_mask = d._full_sequence(s)
    want_input, want_logits = (x.asnumpy() for x in d.frozen_fwd(full_ids, full_mask))
    got_input, got_logits = (x.asnumpy() for x in d._frozen_outputs(s, full_ids, full_mask))
    real = full_mask.asnumpy() == 1
    real[:, -1] = False  # the last token's state is never computed by the sampler
    assert real.sum() > 0 and got_input.shape == want_input.shape
    np.testing.assert_allclose(got_input[real], want_input[real], rtol=1e-4, atol=1e-4)
    read = s["mask"] == 1
    np.testing.assert_allclose(got_logits[read], want_logits[read], rtol=1e-4, atol=1e-4)


def test_trainable_gradients_and_frozen_parts(teacher, tmp_path):
    import mindspore as ms
    from ms_dfkd.steps import soft_sequence_layout
    cfg = _cfg(teacher, tmp_path / "g", "--run.rounds", "1", "--run.mode", "pynative",
               "--generator.trainable", "top_k", "--generator.top_k_layers", "1")
    d = _distiller(cfg)
    teacher0 = {n: p.asnumpy().copy() for n, p in d.teacher.parameters_and_names()}
    frozen0 = {n: p.asnumpy().copy() for n, p in d.frozen.parameters_and_names()}
    gen0 = {n: p.asnumpy().copy() for n, p in d.generator.parameters_and_names()}
    trainable = [n for n, p in d.generator.parameters_and_names() if p.requires_grad]
    assert trainable and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in trainable)

    s = d.generate_batch(0, return_logits=True)  # the step takes the sampler's logits (the trunk's case)
    assert d.reuse_trunk and s["logits"].shape == s["ids"].shape + (d.g_cfg.vocab_size,)
    Bn, T = s["ids"].shape
    full_ids = ms.Tensor(np.concatenate([s["p_ids"], s["ids"]], 1))
    full_mask = ms.Tensor(np.concatenate([s["p_mask"], s["mask"]], 1))
    gen_input, frozen = d.frozen_fwd(full_ids, full_mask)
    assert d.trunk_layers == 1 and gen_input.shape == (Bn, full_ids.shape[1], d.g_cfg.hidden_size)
    frozen = frozen.reshape(Bn * T, -1)
    sel = [ms.Tensor(a) for a in soft_sequence_layout(s["mask"])]
    grad_fn = ms.value_and_grad(d.gen_loss, None, d.opt_g.parameters, has_aux=True)
    _, grads = grad_fn(gen_input, full_mask, ms.Tensor(s["ids"]), ms.Tensor(s["mask"]), frozen,
                       ms.Tensor(s["labels"]), ms.Tensor(np.int64(s["seed"])), d.table_t, d.table_s,
                       d.cls_t, d.sep_t, d.cls_s, d.sep_s, *sel, *d._sampled_logits(s))
    assert len(grads) == len(trainable)
    for p, g in zip(d.opt_g.parameters, grads):
        g = g.asnumpy()
        assert np.isfinite(g).all(), p.name
        assert np.abs(g).sum() > 0, p.name

    # one optimizer step on the same inputs moves each parameter by what AdamW's first step gives for these
    # gradients: m = (1 - b1) g, v = (1 - b2) g^2, delta = -lr m / (sqrt(v) + eps), weight decay 0 (MindSpore's
    # AdamWeightDecay has no bias correction). That is 3.16 lr where |g| >> eps / sqrt(1 - b2) = 3.2e-5, but
    # the smoke generator's gradients are 1e-9 to 3e-7, so here delta = lr (1 - b1) g / eps, far below lr.
    opt, lr = d.opt_g, cfg.generator.lr
    b1, b2, eps = float(opt.beta1.asnumpy()[0]), float(opt.beta2.asnumpy()[0]), float(opt.eps.asnumpy()[0])
    assert abs(b1 - 0.9) < 1e-7 and abs(b2 - 0.999) < 1e-7 and abs(eps - 1e-6) < 1e-12
    assert float(np.asarray(opt.weight_decay.asnumpy())) == 0.0
    assert float(opt.get_lr().asnumpy()) == np.float32(lr)
    before = [p.asnumpy().copy() for p in opt.parameters]
    d.gen_step(gen_input, full_mask, ms.Tensor(s["ids"]), ms.Tensor(s["mask"]), frozen, ms.Tensor(s["labels"]),
               ms.Tensor(np.int64(s["seed"])), d.table_t, d.table_s, d.cls_t, d.sep_t, d.cls_s, d.sep_s, *sel,
               *d._sampled_logits(s))
    assert int(opt.global_step.asnumpy()[0]) == 1
    for p, b, g in zip(opt.parameters, before, grads):
        g = g.asnumpy().astype(np.float64)
        m, v = (1 - b1) * g, (1 - b2) * g * g
        expected = -lr * m / (np.sqrt(v) + eps)
        delta = p.asnumpy().astype(np.float64) - b
        # to the float32 rounding of the new weight: one unit in the last place of the old one
        err = np.abs(delta - expected) - 1e-3 * np.abs(expected) - np.spacing(np.abs(b))
        assert (err <= 0).all(), (p.name, float(err.max()))
        assert np.abs(delta).max() > 1e-7 and np.abs(delta).max() <= lr * (1 - b1) / np.sqrt(1 - b2), p.name

    assert d.run() is not None
    for n, p in d.teacher.parameters_and_names():
        np.testing.assert_array_equal(p.asnumpy(), teacher0[n], err_msg=n)
    for n, p in d.frozen.parameters_and_names():
        np.testing.assert_array_equal(p.asnumpy(), frozen0[n], err_msg=n)
    for n, p in d.generator.parameters_and_names():
        same = np.array_equal(p.asnumpy(), gen0[n])
        assert same != (n in trainable), n  # trainable ones moved, the rest did not


def test_student_steps_reuse_the_teachers_outputs_on_new_samples(teacher, tmp_path, capsys):
    """A student step takes the teacher's logits and features from the forward that labelled its texts
    when they entered the replay buffer. They must match a fresh teacher forward of the same texts in
    another batch (to the last bit of a logit, which can move with the row's place in the batch). Only
    texts still in the buffer are kept; the checkpoint keeps them, so a resumed run uses the same bits;
    a checkpoint without them (an older run) has them computed again on load."""
    from ms_dfkd.models.checkpoint_io import load_safetensors, safetensors_metadata, save_safetensors
    out = tmp_path / "c"
    d = _distiller(_cfg(teacher, out, "--run.method", "corpus", "--run.replay_size", "6"))
    real_logits, calls = d.teacher_run.logits, []

    def counting(texts, **kw):
        calls.append(len(texts))
        return real_logits(texts, **kw)
    d.teacher_run.logits = counting
    assert d.run() is not None
    # 2 rounds x 2 batches of 4 new texts; the 4 student steps ran no teacher forward
    assert calls == [4, 4, 4, 4] and d.counters["stu_steps"] == 4
    texts = [r["text"] for r in d.replay.records]
    lo, fe = d.replay.teacher_logits, d.replay.teacher_features
    assert len(texts) == 6 and lo.shape == (6, 2) and len(fe) == 6
    fresh_lo, fresh_fe = real_logits(["an unrelated first row"] + texts[::-1], with_features=True)
    np.testing.assert_allclose(lo, fresh_lo[1:][::-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fe, fresh_fe[1:][::-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.array([r["teacher_probs"] for r in d.replay.records]),
                               np.exp(lo) / np.exp(lo).sum(-1, keepdims=True), atol=1e-6)

    d2 = _distiller(_cfg(teacher, out, "--run.method", "corpus", "--run.replay_size", "6"))
    d2.load_checkpoint()
    assert [r["text"] for r in d2.replay.records] == texts
    np.testing.assert_array_equal(d2.replay.teacher_logits, lo)
    np.testing.assert_array_equal(d2.replay.teacher_features, fe)

    # an older checkpoint, without the teacher outputs: computed again on load, for every buffer text
    ck = out / "checkpoint.safetensors"
    arrays = load_safetensors(ck)
    assert arrays.pop("replay/teacher_logits").shape == (6, 2) and "replay/teacher_features" in arrays
    del arrays["replay/teacher_features"]
    old_meta = {k: v for k, v in safetensors_metadata(ck).items() if k != "sha256"}  # older: no checksum
    save_safetensors(arrays, ck, metadata=old_meta)
    d3 = _distiller(_cfg(teacher, out, "--run.method", "corpus", "--run.replay_size", "6"))
    d3.load_checkpoint()
    assert [r["text"] for r in d3.replay.records] == texts
    np.testing.assert_allclose(d3.replay.teacher_logits, lo, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d3.replay.teacher_features, fe, rtol=1e-6, atol=1e-6)

    # run.teacher_test false: one more round through the command, the student alone evaluated on test
    capsys.readouterr()
    assert main(["distill", "--config", SMOKE, "--teacher.checkpoint", teacher, "--run.out_dir", str(out),
                 "--run.method", "corpus", "--run.replay_size", "6", "--run.rounds", "3",
                 "--run.teacher_test", "false"]) == 0
    final = json.loads((out / "final.json").read_text())
    assert "teacher_test" not in final and final["student_test"]["n"] > 1000
    printed = capsys.readouterr().out
    assert "teacher test" not in printed and "student test accuracy" in printed


def test_float16_precision_runs_with_loss_scaling(teacher, tmp_path):
    import mindspore as ms
    d = _distiller(_cfg(teacher, tmp_path / "fp16", "--run.rounds", "1", "--run.precision", "float16"))
    for model in (d.teacher, d.student, d.generator, d.frozen):
        assert model.config.compute_dtype == "float16"
    assert d.scaler_g is not None and d.scaler_s is not None  # float16 backward: dynamic loss scaling
    gen0 = {n: p.asnumpy().copy() for n, p in d.generator.parameters_and_names() if p.requires_grad}
    opt, lr, steps, real_step = d.opt_g, d.cfg.generator.lr, [], d.gen_step

    def watched_step(*inputs):
        before = [p.asnumpy().astype(np.float64) for p in opt.parameters]
        k = int(opt.global_step.asnumpy()[0])
        out = real_step(*inputs)
        steps.append({"names": [p.name for p in opt.parameters], "before": before,
                      "after": [p.asnumpy().astype(np.float64) for p in opt.parameters],
                      "m": [m.asnumpy().astype(np.float64) for m in opt.moments1],
                      "v": [v.asnumpy().astype(np.float64) for v in opt.moments2],
                      "skipped": int(opt.global_step.asnumpy()[0]) == k})
        return out
    d.gen_step = watched_step
    hist = d.run()
    assert all(p.dtype == ms.float32 for p in d.generator.get_parameters())  # master weights stay float32
    for k in ("loss_g", "loss_s", "loss_scale_g", "loss_scale_s"):
        assert np.isfinite(hist[-1][k]), k
    moved = [n for n, p in d.generator.parameters_and_names() if n in gen0 and not np.array_equal(p.asnumpy(), gen0[n])]
    assert moved  # at least one finite step was applied
    # every generator step was either applied or skipped for an overflow, which halved the scale (2**16 at
    # the start, never raised within 1000 steps)
    applied = int(d.opt_g.global_step.asnumpy()[0])
    skipped = int(round(np.log2(2.0 ** 16 / hist[-1]["loss_scale_g"])))
    assert applied >= 1 and applied + skipped == d.counters["gen_steps"] == 2, (applied, skipped)
    # and each step moved the float32 weights by exactly the AdamW update of the optimizer's moments after
    # it (nothing for a skipped step)
    assert [s["skipped"] for s in steps].count(False) == applied and len(steps) == 2
    for s in steps:
        for name, b, a, m, v in zip(*(s[k] for k in ("names", "before", "after", "m", "v"))):
            expected = np.zeros_like(b) if s["skipped"] else -lr * m / (np.sqrt(v) + 1e-6)
            # to the float32 rounding of the new weight: one unit in the last place of the old one
            err = np.abs(a - b - expected) - 1e-4 * np.abs(expected) - np.spacing(np.abs(b).astype(np.float32))
            assert (err <= 0).all(), (name, float(err.max()))


def test_bfloat16_on_cpu_is_a_clear_error(teacher, tmp_path):
    from ms_dfkd.config import ConfigError
    with pytest.raises(ConfigError, match="run.precision: bfloat16"):
        _distiller(_cfg(teacher, tmp_path / "bf16", "--run.precision", "bfloat16"))
    with pytest.raises(ConfigError, match="run.precision: 'float8'"):
        _cfg(teacher, tmp_path / "bad", "--run.precision", "float8")
    assert not (tmp_path / "bf16").exists()


TIMINGS = ("round_s", "warmup_s", "gen_step_s", "gen_tokens_per_s", "peak_rss_mb")


def _metrics_but_timings(out):
    lines = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in lines]


def _ckpt(out):
    from ms_dfkd.models.checkpoint_io import load_safetensors
    return load_safetensors(Path(out) / "checkpoint.safetensors")


def test_real_ctrl_c_on_the_command_saves_mid_round_and_resumes(teacher, tmp_path):
    """A real SIGINT to `python -m ms_dfkd.cli distill`. MindSpore's own SIGINT handler (active while a
    graph compiles or runs) would end the process with SIGTERM (status 143) and save nothing; the CLI's
    watcher thread (ms_dfkd/interrupts.py) must get it instead: finish the step, save, exit 130."""
    import subprocess
    import time
    from ms_dfkd.models.checkpoint_io import safetensors_metadata
    out = tmp_path / "sigint"
    cmd = [sys.executable, "-m", "ms_dfkd.cli", "distill", "--config", SMOKE, "--teacher.checkpoint", teacher,
           "--run.out_dir", str(out), "--run.rounds", "4"]
    env = {**os.environ, "GLOG_v": "3"}
    env.pop("MS_ROLE", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    time.sleep(1.0)  # inside round 1, most likely inside a graph
    proc.send_signal(signal.SIGINT)
    log_text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, log_text[-3000:]
    assert "interrupted: checkpoint saved" in log_text
    state = json.loads(safetensors_metadata(out / "checkpoint.safetensors")["state"])
    assert 1 <= state["counters"]["round"] < 4
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rounds = [json.loads(l)["round"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(4))


def _interrupt_after(d, method, n):
    """Make d.<method>'s n-th call press Ctrl-C once it returns: the handler Ctrl-C reaches (a real
    os.kill(SIGINT) inside pytest ended the whole process with SIGTERM, since MindSpore's runtime
    reacts to SIGINT; the real signal is tested on the command above)."""
    real, calls = getattr(d, method), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        r = real(*args, **kwargs)
        if len(calls) == n:
            d._on_sigint(signal.SIGINT, None)
        return r
    setattr(d, method, wrapped)


def test_warmup_then_a_run_cut_into_five_pieces_equals_the_straight_run(teacher, tmp_path):
    """run.gen_warmup_steps: generator-only steps before round 0 whose samples reach neither the replay
    buffer nor generated.jsonl. Resume: the same run in five pieces (Ctrl-C mid-warm-up; resume and
    Ctrl-C in round 0's student phase; resume to the end of --run.rounds 1; extend to --run.rounds 2 and
    Ctrl-C between round 1's generator steps; resume) equals a straight run bit for bit: every parameter
    and optimizer state, every text, every metric but timings."""
    from ms_dfkd.config import ConfigError
    warm = ("--run.gen_warmup_steps", "3")
    a, b = tmp_path / "a", tmp_path / "b"

    # the straight run, watched at every generator update
    da = _distiller(_cfg(teacher, a, "--run.rounds", "2", *warm))
    gen0 = {n: p.asnumpy().copy() for n, p in da.generator.parameters_and_names() if p.requires_grad}
    seen = []
    real_update = da._generator_update

    def update_and_record(s, what=None):
        seen.append((da.counters["warmup_steps"], da.counters["gen_steps"], list(s["texts"]), da.replay.records[:]))
        return real_update(s, what)
    da._generator_update = update_and_record
    assert da.run() is not None
    # 3 warm-up steps while the buffer is empty, then 2 rounds of 2 steps; 7 optimizer updates in all
    assert [(w, g) for w, g, _, _ in seen] == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (3, 3)]
    assert all(not recs for _, _, _, recs in seen[:4]) and len(seen[5][3]) == 8
    assert int(da.opt_g.global_step.asnumpy()[0]) == 7
    assert da.counters["gen_steps"] == 4 and da.counters["samples"] == 16 and len(da.replay.records) == 16
    recs = [json.loads(l) for l in (a / "generated.jsonl").read_text().splitlines()]
    assert [r["text"] for r in recs] == [t for _, _, texts, _ in seen[3:] for t in texts] and len(recs) == 16
    assert any(not np.array_equal(p.asnumpy(), gen0[n]) for n, p in da.generator.parameters_and_names() if n in gen0)
    # by no more than 7 AdamW steps can move a weight: |m / sqrt(v)| <= 7.3 on any step without bias
    # correction (Cauchy-Schwarz over the moment sums, b1^2 / b2 < 1)
    lr = da.cfg.generator.lr
    delta = max(float(np.abs(p.asnumpy() - gen0[n]).max()) for n, p in da.generator.parameters_and_names()
                if n in gen0)
    assert 0 < delta <= 7 * 7.3 * lr, (delta, lr)
    metrics = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["phase"] == "warmup" and metrics[0]["warmup_steps"] == 3
    assert all(np.isfinite(metrics[0][k]) for k in ("loss_g", "loss_spec", "specificity", "perplexity_g0"))
    assert [m.get("round") for m in metrics[1:]] == [0, 1] and "phase" not in metrics[1]

    # the same run in five pieces
    d = _distiller(_cfg(teacher, b, "--run.rounds", "1", *warm))
    _interrupt_after(d, "_generator_update", 2)  # Ctrl-C during the second warm-up step
    assert d.run() is None  # interrupted: no final report
    assert _ckpt(b) and d.counters["warmup_steps"] == 2 and d.counters["round"] == 0
    d = _distiller(_cfg(teacher, b, "--run.rounds", "1", *warm))
    _interrupt_after(d, "_student_update", 1)  # Ctrl-C in round 0's student phase
    assert d.run() is None and d.counters["round"] == 0 and d.counters["stu_in_round"] == 1
    d = _distiller(_cfg(teacher, b, "--run.rounds", "1", *warm))
    assert d.run() is not None and d.counters["round"] == 1
    d = _distiller(_cfg(teacher, b, "--run.rounds", "2", *warm))
    _interrupt_after(d, "_produce", 1)  # Ctrl-C between round 1's two generator steps
    assert d.run() is None
    assert d.counters["round"] == 1 and d.counters["gen_steps"] == 3
    d = _distiller(_cfg(teacher, b, "--run.rounds", "2", *warm))
    assert d.run() is not None and d.counters["round"] == 2 and d.counters["gen_steps"] == 4

    ca, cb = _ckpt(a), _ckpt(b)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        np.testing.assert_array_equal(ca[k], cb[k], err_msg=k)
    assert (a / "generated.jsonl").read_text() == (b / "generated.jsonl").read_text()
    # metrics.jsonl too, in every field but timings: the interrupted warm-up, generator and student phases
    # kept their step metrics in the checkpoint
    assert _metrics_but_timings(b) == _metrics_but_timings(a)

    with pytest.raises(ConfigError, match="run.gen_warmup_steps: 3 needs run.method dfkd-t3"):
        _cfg(teacher, tmp_path / "p", *warm, "--run.method", "prompted")
    with pytest.raises(ConfigError, match="run.gen_warmup_steps: must be >= 0, got -1"):
        _cfg(teacher, tmp_path / "n", "--run.gen_warmup_steps", "-1")


@pytest.fixture(scope="module")
def one_round_run(smoke_one_round_run):
    return smoke_one_round_run


def test_bad_inputs_keep_existing_results(teacher, one_round_run, tmp_path, capsys):
    import shutil
    out = tmp_path / "keep"
    shutil.copytree(one_round_run, out)
    ck = out / "checkpoint.safetensors"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def run(*extra):
        return main(["distill", "--config", SMOKE, "--teacher.checkpoint", teacher, "--run.out_dir", str(out),
                     *extra])
    assert run("--corpus.sources", f"file:{tmp_path / 'missing.txt'}") == 2
    assert "missing.txt" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert run("--corpus.sources", f"file:{empty}") == 2
    assert "empty.txt" in capsys.readouterr().err
    assert run("--run.rounds", "zero") == 2
    assert "run.rounds" in capsys.readouterr().err
    assert run("--fresh") == 2
    assert "would be overwritten" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before

    # a corrupt checkpoint is reported and left as it is
    ck.write_bytes(ck.read_bytes()[:100])
    bad = ck.read_bytes()
    assert run("--run.rounds", "2") == 2
    assert "checkpoint" in capsys.readouterr().err
    assert ck.read_bytes() == bad

    # an eval file with an unknown label
    f = tmp_path / "eval.tsv"
    f.write_text("text\tlabel\ngreat film\tpositive\nmeh\tneutral\n")
    assert main(["eval", "--config", SMOKE, "--teacher.checkpoint", teacher, "--file", str(f)]) == 2
    assert "neutral" in capsys.readouterr().err


def test_distill_from_texts_and_inspect(teacher, one_round_run, tmp_path, capsys):
    out = one_round_run
    st = tmp_path / "student2.safetensors"
    # the saved texts hold teacher probabilities, not features: the hidden-state term cannot run
    assert main(["distill-from-texts", "--config", SMOKE, "--texts", str(out), "--out", str(st),
                 "--steps", "3", "--student.hidden_mse", "1.0"]) == 2
    assert "student.hidden_mse=1.0" in capsys.readouterr().err and not st.exists()
    assert main(["distill-from-texts", "--config", SMOKE, "--texts", str(out), "--out", str(st),
                 "--steps", "3", "--student.num_layers", "2"]) == 0
    assert st.is_file()
    capsys.readouterr()
    assert main(["eval", "--config", SMOKE, "--teacher.checkpoint", teacher, "--student", str(st),
                 "--student.num_layers", "2", "--split", "dev"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"teacher", "student"} and res["student"]["n"] > 1000
    assert main(["inspect", str(out)]) == 0
    assert "8 generated texts" in capsys.readouterr().out


def test_distill_from_texts_saves_the_student_before_its_test_evaluation(one_round_run, tmp_path, monkeypatch):
    """A Ctrl-C during the (long, on real data) test evaluation must not lose the trained student."""
    import ms_dfkd.classify
    from ms_dfkd.models.checkpoint_io import load_safetensors

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ms_dfkd.classify, "evaluate", interrupted)
    st = tmp_path / "student.safetensors"
    assert main(["distill-from-texts", "--config", SMOKE, "--texts", str(one_round_run), "--out", str(st),
                 "--steps", "1"]) == 130
    assert any(k.startswith("student/") for k in load_safetensors(st))


def test_prompt_specificity_tool(teacher, capsys, monkeypatch):
    """scripts/prompt_specificity.py: every setting reads the same passages and noise, so one template
    given twice samples the same texts and scores the same, and another template makes its own prompts from
    the same passages, labels and noise; a template without {text} is refused by name."""
    from ms_dfkd.train import Distiller
    sys.path.insert(0, str(ROOT / "scripts"))
    import prompt_specificity
    batches, real_generate = [], Distiller.generate_batch

    def recording(self, *args, **kwargs):
        s = real_generate(self, *args, **kwargs)
        batches.append((self.g_tok, s))
        return s
    monkeypatch.setattr(Distiller, "generate_batch", recording)
    tpl = "Write a {label} review.\\n{text}"
    prompt_specificity.main(["--config", SMOKE, "--teacher.checkpoint", teacher, "--template", tpl,
                             "--template", tpl, "--template", "Say {label} things about {text} please",
                             "--batches", "2"])
    assert len(batches) == 3 * 2
    tok = batches[0][0]
    for i in range(2):
        a, b, c = (batches[2 * t + i][1] for t in range(3))
        for k in ("passages", "seed"):
            assert a[k] == b[k] == c[k], k
        np.testing.assert_array_equal(a["labels"], c["labels"])
        for k in ("p_ids", "ids", "mask", "labels"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # the same template: the same samples
        assert a["texts"] == b["texts"]
        # another template, other prompts (the tiny generator's logits are too flat to outweigh the Gumbel
        # noise, so its samples and their scores come out the same: the prompts are what this checks)
        assert not np.array_equal(a["p_ids"], c["p_ids"])
        for y, row, m in zip(c["labels"], c["p_ids"], c["p_mask"]):
            name = ["negative", "positive"][y]
            assert f"Say {name} things about" in tok.decode(row[m == 1]), tok.decode(row[m == 1])
        for y, row, m in zip(a["labels"], a["p_ids"], a["p_mask"]):
            assert f"Write a {['negative', 'positive'][y]} review." in tok.decode(row[m == 1])
    rows = [l.split("|")[1:-1] for l in capsys.readouterr().out.splitlines() if l.startswith("| ")][1:]
    assert len(rows) == 3
    rates = [float(r[2]) for r in rows]
    assert [int(r[4]) for r in rows] == [8, 8, 8]  # 2 batches of the smoke config's 4
    assert rates[0] == rates[1] and all(0.0 <= x <= 1.0 for x in rates)
    assert rows[0][6:] == rows[1][6:]  # the same texts: the same distinct-2 and self-BLEU
    assert all(abs(x * 8 - round(x * 8)) < 1e-2 for x in rates)
    with pytest.raises(SystemExit, match="needs both"):
        prompt_specificity.main(["--config", SMOKE, "--teacher.checkpoint", teacher, "--template", "{label} only"])


def test_second_process_on_a_run_folder_is_refused(teacher, tmp_path, capsys):
    """While another process holds the run folder, distill exits 2 naming it and writes nothing there."""
    import signal
    from test_run_files import _hold_lock
    out = tmp_path / "run"
    p = _hold_lock(out)
    try:
        code = main(["distill", "--config", SMOKE, "--teacher.checkpoint", teacher, "--run.out_dir", str(out)])
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert code == 2
    assert f"run folder {out} is in use by pid {p.pid}" in capsys.readouterr().err
    assert sorted(f.name for f in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("seconds, saves", [(3600, 1), (0, 3)])
def test_checkpoint_seconds_skip_round_saves_but_never_the_last(teacher, tmp_path, monkeypatch, seconds, saves):
    """run.checkpoint_seconds: a round's checkpoint waits until that long after the previous save; the last
    round always saves (prompted: no generator training, the quickest run)."""
    from ms_dfkd import run_checkpoint
    real, calls = run_checkpoint.save, []
    monkeypatch.setattr(run_checkpoint, "save", lambda d: calls.append(d.counters["round"]) or real(d))
    d = _distiller(_cfg(teacher, tmp_path / "run", "--run.method", "prompted", "--run.rounds", "3",
                        "--run.checkpoint_seconds", str(seconds)))
    assert d.run() is not None
    assert calls == ([3] if saves == 1 else [1, 2, 3])
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()
