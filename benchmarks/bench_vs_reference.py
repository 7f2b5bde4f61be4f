"""ms_dfkd (MindSpore graph mode) against the PyTorch eager reference: one table, measured in one run.

Rows, for the smoke models (configs/smoke.yaml shapes) and the real ones (SmolLM2-135M + MiniLM-L6
teacher + MiniLM-L3 student, configs/sentiment_offline.yaml shapes):
  sample     KV-cache Gumbel-max sampling of the batch's continuations (G0, no early stop): tokens/s
  gen step   one DFKD-T3 generator step: G0 forward, loss, backward, AdamW update
  stu step   one student step: teacher forward (no grad), student loss, backward, AdamW update
  --profile adds the pieces of the generator step: G0 forward, loss forward only, forward + backward.

How: each framework runs in its own worker process, built from the same case (benchmarks.cases:
identical weights, batch and noise), fresh for every row. After set-up and one warm-up call
(MindSpore compiles there; reported as "1st call"), the parent alternates MindSpore and PyTorch repeats (ABAB..., the order
flipped every repeat) and reports medians.
Only the worker being timed runs: the other one is parked with SIGSTOP, so that an idle process's
threads (MindSpore's CPU thread pool, OpenMP spin-waits) cannot take CPU from the timed one.
Memory: each worker's resident-set high-water mark (VmHWM) over the timed repeats of that row, reset
through /proc/self/clear_refs after the warm-up; it includes the models, optimizer states and
framework. Both frameworks get --threads CPU threads (MindSpore's kernel pool, as ms-dfkd's command
line sets it; torch's intra-op threads), and torch by default OMP_WAIT_POLICY=PASSIVE: on a 2-core
machine shared with other work, torch's default OpenMP spin-wait made the smoke sampler 100x slower
(3.7 s vs 0.034 s, CPU time = wall time).

    python -m benchmarks.bench_vs_reference [--kinds smoke,real] [--steps sample,gen,stu] [--repeats 5]
        [--threads 2] [--profile]

(from the repository root; scripts/bench_vs_reference.sh checks that torch is installed first)
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SELF = [sys.executable, "-m", "benchmarks.bench_vs_reference"]  # the workers run this module too

SHAPES = {  # as in the configs each kind stands for
    "smoke": dict(batch=4, prompt_len=64, new_tokens=12, student_batch=16, student_len=32, gen_trainable="all"),
    "real": dict(batch=8, prompt_len=80, new_tokens=24, student_batch=32, student_len=48, gen_trainable="top_k",
                 gen_top_k=2),
}
OPS = {"sample": "sample", "gen": "generator_step", "stu": "student_step",
       "g0_fwd": "frozen_forward", "gen_fwd": "generator_forward", "gen_grad": "generator_grad"}


# --- worker side ------------------------------------------------------------------------------------

def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def worker(framework, case_path, threads):
    proto = os.fdopen(os.dup(1), "w", buffering=1)   # the protocol; anything printed goes to stderr
    os.dup2(2, 1)
    t0 = time.perf_counter()
    from benchmarks.cases import Case
    case = Case.load(case_path)
    if framework == "ms":
        import mindspore as ms
        ms.set_context(mode=ms.GRAPH_MODE)
        # as ms-dfkd's command line sets it up (run.threads; torch gets --threads too)
        from ms_dfkd.cpu_runtime import configure_runtime
        configure_runtime(threads)
        from benchmarks.cases import MSSide
        side = MSSide(case)
    else:
        import torch
        torch.set_num_threads(threads)
        from benchmarks.reference_torch.harness import TorchSide
        side = TorchSide(case)
    proto.write(json.dumps({"ready": time.perf_counter() - t0}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "reset_peak":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reply = {}
        elif op == "mem":
            reply = {"hwm_mb": _status_kb("VmHWM") / 1024, "rss_mb": _status_kb("VmRSS") / 1024}
        else:
            t, c = time.perf_counter(), time.process_time()
            out = getattr(side, OPS[op])()
            reply = {"s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
            if op == "sample":
                reply["ids"] = out.tolist()
        proto.write(json.dumps(reply) + "\n")


# --- parent side ------------------------------------------------------------------------------------

class Worker:
    def __init__(self, framework, case_path, threads, log, wait_policy="passive"):
        self.name = framework
        env = dict(os.environ)
        if framework == "torch" and wait_policy == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        self.p = subprocess.Popen([*SELF, "--worker", framework, "--case", str(case_path),
                                   "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=log, text=True, cwd=ROOT, env=env)
        self.ready_s = self._read()["ready"]
        os.kill(self.p.pid, signal.SIGSTOP)

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker died (see its log)")
        return json.loads(line)

    def __call__(self, op):
        # Only the worker being timed may run (see the module docstring): SIGSTOP parks it after.
        os.kill(self.p.pid, signal.SIGCONT)
        self.p.stdin.write(json.dumps({"op": op}) + "\n")
        self.p.stdin.flush()
        reply = self._read()
        os.kill(self.p.pid, signal.SIGSTOP)
        return reply

    def close(self):
        if self.p.poll() is not None:
            return
        try:
            os.kill(self.p.pid, signal.SIGCONT)
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.p.stdin.close()
            self.p.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait()


def prepare(kind, path):
    """Run in its own process: builds the case with ms_dfkd (MindSpore) and saves it."""
    import mindspore as ms
    ms.set_context(mode=ms.GRAPH_MODE)
    from benchmarks.cases import make_case
    make_case(kind, perturb=False, keep_generator=False, **SHAPES[kind]).save(path)


def measure(kind, ops, args, out_dir, rows):
    case_path = out_dir / kind
    t = time.perf_counter()
    subprocess.run([*SELF, "--prepare", kind, "--case", str(case_path)], check=True, cwd=ROOT,
                   stderr=args.log, stdout=args.log)
    print(f"[{kind}] case prepared in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    for op in ops:
        # fresh workers per row: MindSpore keeps every compiled graph's memory, and a worker that has
        # compiled the sampler, both steps and the profile graphs of the real models outgrew 20 GB
        ms_w = Worker("ms", case_path, args.threads, args.log)
        pt_w = Worker("torch", case_path, args.threads, args.log, args.torch_wait_policy)
        try:
            rows.append(measure_op(kind, op, ms_w, pt_w, args))
        finally:
            ms_w.close()
            pt_w.close()
        r = rows[-1]
        print(f"[{kind}] {op}: ms {r['ms']:.3f} s, torch {r['torch']:.3f} s (set-up ms {ms_w.ready_s:.0f} s, "
              f"torch {pt_w.ready_s:.0f} s)", file=sys.stderr, flush=True)


def measure_op(kind, op, ms_w, pt_w, args):
    first = {w.name: w(op) for w in (ms_w, pt_w)}
    for w in (ms_w, pt_w):
        w("reset_peak")
    times = {"ms": [], "torch": []}
    for r in range(args.repeats):
        order = (ms_w, pt_w) if r % 2 == 0 else (pt_w, ms_w)
        replies = {w.name: w(op) for w in order}
        for name, rep in replies.items():
            times[name].append(rep["s"])
            print(f"  {kind} {op} {name}: wall {rep['s']:.3f} s, cpu {rep['cpu_s']:.3f} s", file=args.log, flush=True)
    mem = {w.name: w("mem")["hwm_mb"] for w in (ms_w, pt_w)}
    row = {"kind": kind, "op": op, "first_ms": first["ms"]["s"], "first_torch": first["torch"]["s"],
           "ms": statistics.median(times["ms"]), "torch": statistics.median(times["torch"]),
           "mem_ms": mem["ms"], "mem_torch": mem["torch"]}
    if op == "sample":
        a, b = replies["ms"]["ids"], replies["torch"]["ids"]
        n_tokens = sum(len(ra) for ra in a)
        same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
        row.update(tok_s_ms=n_tokens / row["ms"], tok_s_torch=n_tokens / row["torch"], agree=same / n_tokens)
    return row


def table(rows, args, load_before, load_after):
    import mindspore
    import torch
    lines = [f"ms_dfkd (MindSpore {mindspore.__version__}, graph mode, composite kernels) vs PyTorch "
             f"{torch.__version__} eager reference; {os.cpu_count()} CPU cores, {args.threads} threads each "
             f"(OMP_WAIT_POLICY {args.torch_wait_policy}); "
             f"medians of {args.repeats} interleaved repeats",
             f"load average before/after: {load_before:.2f} / {load_after:.2f} (1 min)",
             f"shapes: " + "; ".join(f"{k}: {v}" for k, v in SHAPES.items() if k in args.kinds),
             "", "| models | step | MindSpore | PyTorch | torch/MS time | MS peak RSS MB | torch peak RSS MB "
                 "| MS/torch mem | MS 1st call s |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = {"sample": "KV-cache sampling", "gen": "generator step", "stu": "student step",
             "g0_fwd": "  G0 forward (no grad)", "gen_fwd": "  gen loss forward (no grad)",
             "gen_grad": "  gen forward+backward"}
    for r in rows:
        if r["op"] == "sample":
            ms_v, pt_v = f"{r['tok_s_ms']:.1f} tok/s", f"{r['tok_s_torch']:.1f} tok/s"
            extra = f" (tokens agree {r['agree']:.0%})"
        else:
            ms_v, pt_v, extra = f"{r['ms'] * 1e3:.0f} ms", f"{r['torch'] * 1e3:.0f} ms", ""
        lines.append(f"| {r['kind']} | {names[r['op']]}{extra} | {ms_v} | {pt_v} | {r['torch'] / r['ms']:.2f}x "
                     f"| {r['mem_ms']:.0f} | {r['mem_torch']:.0f} | {r['mem_ms'] / r['mem_torch']:.2f} "
                     f"| {r['first_ms']:.1f} |")
    lines.append("")
    lines.append("torch/MS time > 1: MindSpore is faster. Peak RSS: whole-process VmHWM over the timed repeats "
                 "(weights, optimizer states and framework included).")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default="smoke,real", help="comma list of: smoke, real")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="CPU threads of each framework (MindSpore's kernel pool, torch's intra-op threads); "
                         "default: the cores this process may use")
    ap.add_argument("--torch-wait-policy", choices=("passive", "default"), default="passive",
                    help="OMP_WAIT_POLICY of the torch worker (see the module docstring)")
    ap.add_argument("--profile", action="store_true", help="also time the pieces of the generator step")
    ap.add_argument("--steps", default="sample,gen,stu",
                    help="comma list of the rows to time: sample, gen, stu (default: all three)")
    ap.add_argument("--out", default=None, help="folder for cases, worker logs and table.md (default: a temp dir)")
    ap.add_argument("--worker", choices=("ms", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare", choices=tuple(SHAPES), help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.case, args.threads)
    if args.prepare:
        return prepare(args.prepare, args.case)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in args.kinds if k not in SHAPES]
    if bad:
        ap.error(f"--kinds: unknown {bad}; choose from {sorted(SHAPES)}")
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench_vs_reference_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args.log = open(out_dir / "workers.log", "w")
    ops = [o.strip() for o in args.steps.split(",") if o.strip()]
    bad = [o for o in ops if o not in ("sample", "gen", "stu")]
    if bad or not ops:
        ap.error(f"--steps: unknown {bad or args.steps!r}; choose from sample, gen, stu")
    ops += ["g0_fwd", "gen_fwd", "gen_grad"] if args.profile else []
    load_before = os.getloadavg()[0]
    rows = []
    for kind in args.kinds:
        measure(kind, ops, args, out_dir, rows)
    text = table(rows, args, load_before, os.getloadavg()[0])
    (out_dir / "table.md").write_text(text + "\n")
    print(text)
    print(f"\n(cases, worker log and table.md in {out_dir})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
