"""Where the time of a DFKD-T3 (and a prompted) round goes, on the real models: a table, not a test.

    python -m benchmarks.profile_round [--methods dfkd-t3,prompted] [--rounds 3] [--config C] [overrides]

Runs ``--rounds`` rounds of each method through the real driver (Distiller) in graph mode, after one
round that compiles, and times each part by wrapping the driver's own functions (nothing in ms_dfkd
is changed for this): prompt building and tokenising, the sampler's prefill and decode steps and the
Gumbel noise they draw, teacher labelling, the frozen generator's forward, the generator step (forward,
backward and update in one jitted call), student steps, the replay buffer, generation metrics,
checkpoint and JSONL writes. Every timed call is synchronised (its outputs are read back) so that
MindSpore's asynchronous dispatch does not move time between rows.

The teacher is MiniLM-L6 with an untrained head unless --teacher.checkpoint names one: labels do not
change the time of anything here. Time one job at a time on a quiet machine.
"""
import argparse
import collections
import functools
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """Seconds and calls per label; ``wrap`` times a function, ``sync`` reads MindSpore outputs back."""

    def __init__(self):
        self.s = collections.defaultdict(float)
        self.n = collections.defaultdict(int)
        self.on = False

    def wrap(self, label, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(out)
            if self.on:
                self.s[label] += time.perf_counter() - t0
                self.n[label] += 1
            return out
        return timed


def _sync(out):
    items = out if isinstance(out, (tuple, list)) else (out,)
    for o in items:
        if hasattr(o, "asnumpy"):
            o.asnumpy()
        elif isinstance(o, (tuple, list)):
            _sync(o)


def instrument(d, clock):
    """Wrap the parts of Distiller d (and the sampler it uses) with clock."""
    from ms_dfkd import metrics as M
    from ms_dfkd import run_checkpoint
    from ms_dfkd.models import llama_sampling as S
    # the sampler: its decoder's prefill and step, and the numpy noise of every decode position
    real_decoder = S._decoder

    def decoder(*args, **kwargs):
        dec = real_decoder(*args, **kwargs)
        if not getattr(dec, "_profiled", False):
            if dec.prefill_after is None:
                dec.prefill = clock.wrap("sample: prefill", dec.prefill)
            else:  # a shared prompt start once per group (prefill), then the rest of each prompt
                dec.prefill = clock.wrap("sample: prefill (shared start or whole prompts)", dec.prefill)
                dec.prefill_after = clock.wrap("sample: prefill (rest of the prompts)", dec.prefill_after)
            if dec.prefill_from is not None:  # a kept shared start's trained top layers
                dec.prefill_from = clock.wrap("sample: prefill (shared start's top layers)", dec.prefill_from)
            dec.step = clock.wrap("sample: decode steps", dec.step)
            dec._profiled = True
        return dec
    S._decoder = decoder
    S.gumbel_np = clock.wrap("sample: Gumbel noise (numpy)", S.gumbel_np)
    S.gumbel_pairs_np = clock.wrap("sample: Gumbel noise (numpy)", S.gumbel_pairs_np)
    S.pick_tokens = clock.wrap("sample: pick tokens (top-p, noise)", S.pick_tokens)
    d._sample = clock.wrap("sample (whole call)", S.sample)
    d._prompt_ids = clock.wrap("prompts: build + tokenise", d._prompt_ids)
    d.g_tok.decode = clock.wrap("decode texts", d.g_tok.decode)
    d.teacher_run.logits = clock.wrap("teacher labelling", d.teacher_run.logits)
    if getattr(d, "frozen_fwd", None) is not None:
        d.frozen_fwd = clock.wrap("frozen generator forward", d.frozen_fwd)
    if getattr(d, "frozen_top", None) is not None:  # the same from the sampler's trunk states
        d.frozen_top = clock.wrap("frozen generator forward", d.frozen_top)
    if getattr(d, "gen_step", None) is not None:
        d.gen_step = clock.wrap("generator step (fwd+bwd+update)", d.gen_step)
    d.student_step._step = clock.wrap("student steps (fwd+bwd+update)", d.student_step._step)
    d.s_tok.encode_batch = clock.wrap("student tokenising", d.s_tok.encode_batch)
    d.replay.add = clock.wrap("replay buffer", d.replay.add)
    d.texts_out.write = clock.wrap("JSONL writes", d.texts_out.write)
    d.metrics_out.write = clock.wrap("JSONL writes", d.metrics_out.write)
    for name in ("distinct_n", "self_bleu", "label_balance", "specificity_rate"):
        setattr(M, name, clock.wrap("generation metrics", getattr(M, name)))
    run_checkpoint.save = clock.wrap("checkpoint save", run_checkpoint.save)
    d.refresh_tables = clock.wrap("bridge tables refresh", d.refresh_tables)


def profile(method, args, overrides):
    import mindspore as ms
    from ms_dfkd import build
    from ms_dfkd.config import ConfigError, load_config, parse_overrides
    from ms_dfkd.train import Distiller
    ms.set_context(mode=ms.GRAPH_MODE)
    from ms_dfkd.cpu_runtime import configure_runtime  # as ms-dfkd's command line sets it up
    configure_runtime()
    with tempfile.TemporaryDirectory(prefix="profile_round_") as tmp:
        ov = parse_overrides(overrides) + [("run.method", method), ("run.out_dir", f"{tmp}/run"),
                                           ("run.rounds", str(args.rounds + 1)), ("run.eval_every", "0")]
        try:
            cfg = load_config(args.config, ov)
        except ConfigError as e:  # a bad override or config file: say which, no traceback
            raise SystemExit(f"profile_round: {e}") from None
        if cfg.task.kind != "sequence":
            raise SystemExit(f"profile_round: task.kind {cfg.task.kind}: profiles sequence tasks only")
        if not args.trained_teacher and "teacher.checkpoint" not in dict(ov):
            cfg.teacher.checkpoint = f"{tmp}/teacher.safetensors"  # an untrained head: same compute
            build.save_teacher(build.build_teacher_arch(cfg), cfg)
        cfg.run.rounds = 1  # the compiling round, untimed
        d = Distiller(cfg)
        clock = Clock()
        instrument(d, clock)
        d._end_round = _skip_final_eval(d, d._end_round)
        t0 = time.perf_counter()
        d.run()
        compile_round = time.perf_counter() - t0
        cfg.run.rounds = args.rounds + 1
        clock.on = True
        samples0 = d.counters["samples"]
        t0 = time.perf_counter()
        d.run()
        wall = time.perf_counter() - t0
        samples = d.counters["samples"] - samples0
    return clock, wall, samples, compile_round, cfg


def _skip_final_eval(d, end_round):
    """No dev/test evaluation inside the timed rounds (run.eval_every 0 still evaluates the last round)."""
    def end(*args, **kwargs):
        real = d._eval_set
        d._eval_set = lambda which: None
        try:
            return end_round(*args, **kwargs)
        finally:
            d._eval_set = real
    return end


def table(method, clock, wall, samples, compile_round, cfg):
    g = cfg.generator
    print(f"\n## {method}: {samples} samples in {wall:.1f} s = {samples / wall:.3f} samples/s "
          f"(first, compiling round {compile_round:.1f} s, untimed)")
    print(f"generator batch {g.batch_size}, prompt {g.prompt_max_length}, new tokens {g.max_new_tokens}, "
          f"{cfg.run.gen_steps_per_round} generator batches + {cfg.run.student_steps_per_round} student steps "
          f"a round\n")
    print("| part | seconds | share of wall | calls | ms per call |")
    print("|---|---|---|---|---|")
    inner = {label for label in clock.s if label.startswith("sample: ")}  # parts of "sample (whole call)"
    for label, s in sorted(clock.s.items(), key=lambda kv: -kv[1]):
        name = f"  {label}" if label in inner else label
        print(f"| {name} | {s:.2f} | {s / wall:.1%} | {clock.n[label]} | {1000 * s / clock.n[label]:.1f} |")
    top = sum(s for k, s in clock.s.items() if k not in inner)
    print(f"| (not in a timed part) | {wall - top:.2f} | {(wall - top) / wall:.1%} | | |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="dfkd-t3,prompted")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per method (after one compiling round)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "sentiment_offline.yaml"))
    ap.add_argument("--trained-teacher", action="store_true",
                    help="use the config's teacher.checkpoint as it is (default: an untrained head)")
    args, overrides = ap.parse_known_args(argv)
    import os
    os.environ.setdefault("GLOG_v", "3")
    methods = args.methods.split(",")
    if len(methods) == 1:
        table(methods[0], *profile(methods[0], args, overrides))
        return
    # one process a method: the wrapped sampler (and MindSpore's caches) of one must not carry into the next
    import subprocess
    import sys
    common = ["--rounds", str(args.rounds), "--config", str(Path(args.config).resolve())] + \
        (["--trained-teacher"] if args.trained_teacher else []) + list(overrides)
    for method in methods:
        done = subprocess.run([sys.executable, "-m", "benchmarks.profile_round", "--methods", method, *common],
                              cwd=ROOT)
        if done.returncode:
            raise SystemExit(done.returncode)


if __name__ == "__main__":
    main()
