"""The mindformers generator backend against ms-dfkd's own Llama: a table, not a test.

    python -m benchmarks.bench_mindformers [--repeats 4] [--phases 2] [--sample] [--config C] [overrides]

One command, alternating phases: smollm2, mindformers_llama, smollm2, ... (``--phases`` each), every
phase in a fresh child process so that only one backend's models and compiled graphs are in memory
at a time (the mindformers graphs take about 3x llama.py's memory on CPU). A phase builds the real
driver (Distiller, dfkd-t3, graph mode) with that generator.arch (the same SmolLM2 weights), makes its
parts by the driver's own code, and after one untimed call of each (the compiles) times ``--repeats``
calls of the generator step (forward, backward and update in one jitted call: the driver's
``gen_step``), the frozen generator's forward (``frozen_fwd``) and, with --sample, the sampling of one
batch (``generate_batch``). All phases step on one batch (sampled by the first phase, saved). The
teacher is MiniLM-L6 with an untrained head, as in profile_round (labels do not change the time).
Medians over all phases, and each backend's peak RSS. Needs the mindformers extra
(MS_DFKD_MINDFORMERS=1 bash scripts/setup.sh).
"""
import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("smollm2", "mindformers_llama")
PARTS = ("step", "frozen", "sample")


def timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    for o in (out if isinstance(out, (tuple, list)) else (out,)):
        if hasattr(o, "asnumpy"):
            o.asnumpy()
    return time.perf_counter() - t0


def phase(arch, config, overrides, tmp, repeats, sample, out_file):
    """Child process: one backend's timings -> out_file (JSON)."""
    import os
    import resource
    os.environ.setdefault("GLOG_v", "3")
    import mindspore as ms
    from ms_dfkd import build as B
    from ms_dfkd.config import load_config, parse_overrides
    from ms_dfkd.steps import soft_sequence_layout
    from ms_dfkd.train import Distiller
    ms.set_context(mode=ms.GRAPH_MODE)
    from ms_dfkd.cpu_runtime import configure_runtime  # as ms-dfkd's command line sets it up
    configure_runtime()
    # no label vectors: the mindformers models have no steering input, and both backends must compute the same
    cfg = load_config(config, parse_overrides(overrides) + [("generator.arch", arch), ("run.method", "dfkd-t3"),
                                                            ("generator.label_vectors", "false"),
                                                            ("run.out_dir", f"{tmp}/run_{arch}")])
    cfg.teacher.checkpoint = f"{tmp}/teacher.safetensors"
    if not Path(cfg.teacher.checkpoint).exists():
        B.save_teacher(B.build_teacher_arch(cfg), cfg)
    d = Distiller(cfg)
    batch_file = Path(tmp) / "batch.npz"
    if not batch_file.exists():
        s = d.generate_batch(0)
        np.savez(batch_file, **{k: np.asarray(s[k]) for k in ("p_ids", "p_mask", "ids", "mask", "labels", "seed")})
    s = dict(np.load(batch_file))
    B_, T = s["ids"].shape
    full = (ms.Tensor(np.concatenate([s["p_ids"], s["ids"]], 1)), ms.Tensor(np.concatenate([s["p_mask"], s["mask"]], 1)))
    sel = [ms.Tensor(a) for a in soft_sequence_layout(s["mask"])]

    gen_input, frozen = d.frozen_fwd(*full)  # G_θ0 does not train: the step's inputs stay the same
    inputs = (gen_input, full[1], ms.Tensor(s["ids"]), ms.Tensor(s["mask"]), frozen.reshape(B_ * T, -1),
              ms.Tensor(s["labels"]), ms.Tensor(np.int64(s["seed"])), d.table_t, d.table_s, d.cls_t, d.sep_t,
              d.cls_s, d.sep_s, *sel)  # as Distiller._generator_update passes them
    times = {p: [] for p in PARTS}
    for r in range(repeats + 1):  # r = 0 compiles, untimed
        t = {"sample": timed(lambda: d.generate_batch(1 + r)["ids"]) if sample else float("nan"),
             "frozen": timed(d.frozen_fwd, *full), "step": timed(d.gen_step, *inputs)}
        if r:
            for p in PARTS:
                times[p].append(t[p])
    g = cfg.generator
    Path(out_file).write_text(json.dumps({
        "times": times, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "shape": f"batch {g.batch_size}, prompt {g.prompt_max_length}, new tokens {g.max_new_tokens}, "
                 f"trainable {g.trainable} {g.top_k_layers}"}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4, help="timed calls per phase")
    ap.add_argument("--phases", type=int, default=2, help="phases per backend, alternating")
    ap.add_argument("--sample", action="store_true", help="also time sampling (mindformers re-runs the sequence)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "sentiment_offline.yaml"))
    args, overrides = ap.parse_known_args(argv)
    ctx = mp.get_context("spawn")
    times = {(a, p): [] for a in ARCHS for p in PARTS}
    peak = {a: 0.0 for a in ARCHS}
    with tempfile.TemporaryDirectory(prefix="bench_mindformers_") as tmp:
        for i in range(args.phases):
            for a in ARCHS:
                out = Path(tmp) / f"{a}_{i}.json"
                proc = ctx.Process(target=phase, args=(a, args.config, overrides, tmp, args.repeats, args.sample,
                                                       str(out)))
                proc.start()
                proc.join()
                if proc.exitcode:
                    raise SystemExit(f"phase {a} #{i} failed (exit {proc.exitcode})")
                res = json.loads(out.read_text())
                for p in PARTS:
                    times[(a, p)] += res["times"][p]
                peak[a] = max(peak[a], res["peak_mb"])
                print(f"phase {i} {a}: step {1000 * statistics.median(res['times']['step']):.0f} ms, "
                      f"peak RSS {res['peak_mb']:.0f} MB", flush=True)
    n = args.phases * args.repeats
    print(f"\n{res['shape']}; medians of {n} calls per backend ({args.phases} alternating phases)\n")
    print("| part | llama.py | mindformers | mindformers / llama.py |")
    print("|---|---|---|---|")
    names = {"step": "generator step (fwd+bwd+update, jitted)", "frozen": "frozen generator forward",
             "sample": "sampling one batch"}
    for p in PARTS[:3 if args.sample else 2]:
        a, b = (statistics.median(times[(x, p)]) for x in ARCHS)
        print(f"| {names[p]} | {1000 * a:.0f} ms | {1000 * b:.0f} ms | {b / a:.2f}x |")
    print(f"| peak RSS of a phase | {peak[ARCHS[0]]:.0f} MB | {peak[ARCHS[1]]:.0f} MB | "
          f"{peak[ARCHS[1]] / peak[ARCHS[0]]:.2f}x |")


if __name__ == "__main__":
    main()
