"""Does the DFKD-T3 generator learn label-specific text? Curves over generator steps, against prompting.

    python scripts/generator_diagnostic.py --teacher.checkpoint T [--steps 300] [--every 10]
        [--out runs/diagnostic] [--config C] [--section.key value ...]

Runs ``--steps`` generator steps of dfkd-t3 (generator-only: no student steps, as the warm-up of a run,
``run.gen_warmup_steps``) and records for every step, per target label: the teacher's specificity (its
argmax is the target), its mean probability of the target, the KL of the trained generator to the
frozen one at the sampled positions (the fluency loss), the perplexity of the samples under the frozen
generator, and whether each sample is degenerate (``metrics.is_degenerate``). Every ``--every`` steps it
prints a block line (with distinct-2 over the block) and keeps five samples per label.

Prompted's level is measured first, on the frozen generator with the same passages (its own noise
stream), over ``--reference-batches`` batches, and drawn as dashed lines in the PNG.

Resumable: the run folder is an ordinary ms-dfkd run folder (checkpoint every ``--every`` steps, Ctrl-C
saves); rerun the same command to continue. Writes into OUT: steps.jsonl (one line a step),
reference.json, blocks.md (the block table and the samples) and curves.png.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NOISE_STREAM_REFERENCE = 3  # apart from the run's sample (1) and warm-up (2) streams


def per_label(values, labels, K):
    return [float(np.mean(values[labels == y])) if (labels == y).any() else float("nan") for y in range(K)]


def step_record(step, s, probs, info, K):
    from ms_dfkd import metrics as M
    labels = np.asarray(s["labels"])
    hit = (probs.argmax(-1) == labels).astype(np.float64)
    target_p = probs[np.arange(len(labels)), labels]
    return {"step": step, "specificity": per_label(hit, labels, K), "target_prob": per_label(target_p, labels, K),
            "kl_to_g0": info.get("loss_flu"), "perplexity_g0": info.get("perplexity_g0"),
            "loss_g": info.get("loss_g"), "loss_spec": info.get("loss_spec"),
            "degenerate": M.degenerate_share(s["texts"]), "texts": s["texts"], "labels": labels.tolist()}


def reference(d, batches, K):
    """Prompted's level: the frozen generator on the run's first passages, with its own noise."""
    from ms_dfkd import metrics as M
    from ms_dfkd.train import _perplexity
    state = d.corpus_sampler.state_dict()
    hits, tps, labs, texts, ppl = [], [], [], [], []
    try:
        for b in range(batches):
            s = d.generate_batch(b, stream=NOISE_STREAM_REFERENCE, return_logits=True, frozen=True)
            probs = d.teacher_run.probs(s["texts"])
            labels = np.asarray(s["labels"])
            hits.append(probs.argmax(-1) == labels)
            tps.append(probs[np.arange(len(labels)), labels])
            labs.append(labels)
            texts += s["texts"]
            ppl.append(_perplexity(s["logits"], s["ids"], s["mask"]))
    finally:
        d.corpus_sampler.load_state_dict(state)
    labels = np.concatenate(labs)
    return {"batches": batches, "samples": len(texts),
            "specificity": per_label(np.concatenate(hits).astype(np.float64), labels, K),
            "target_prob": per_label(np.concatenate(tps), labels, K), "perplexity_g0": float(np.mean(ppl)),
            "distinct_2": M.distinct_n(texts, 2), "degenerate": M.degenerate_share(texts),
            "samples_per_label": {str(y): [t for t, l in zip(texts, labels) if l == y][:5] for y in range(K)}}


def blocks(records, every, K):
    """Block means of the step records: [(first step, last step, {name: value or per-label list}, samples)]."""
    from ms_dfkd import metrics as M
    out = []
    for i in range(0, len(records), every):
        blk = records[i:i + every]
        row = {k: np.nanmean([r[k] for r in blk], axis=0).tolist() for k in ("specificity", "target_prob")}
        for k in ("kl_to_g0", "perplexity_g0", "degenerate", "loss_g"):
            row[k] = float(np.mean([r[k] for r in blk if r[k] is not None]))
        texts = [t for r in blk for t in r["texts"]]
        row["distinct_2"] = M.distinct_n(texts, 2)
        last = blk[-1]
        samples = {y: [t for t, l in zip(last["texts"], last["labels"]) if l == y] for y in range(K)}
        for r in reversed(blk[:-1]):  # five per label, from the block's last steps
            for t, l in zip(r["texts"], r["labels"]):
                if len(samples[l]) < 5:
                    samples[l].append(t)
        out.append((blk[0]["step"], blk[-1]["step"], row, {y: v[:5] for y, v in samples.items()}))
    return out


def write_report(out, records, ref, every, names):
    K = len(names)
    rows = blocks(records, every, K)
    lines = ["# Generator diagnostic", "",
             f"Prompted (frozen generator, {ref['samples']} samples): specificity "
             + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, ref["specificity"]))
             + f"; perplexity under G0 {ref['perplexity_g0']:.1f}; distinct-2 {ref['distinct_2']:.3f};"
             f" degenerate {ref['degenerate']:.1%}.", "",
             "| steps | " + " | ".join(f"spec {n}" for n in names) + " | " + " | ".join(f"p(target) {n}" for n in names)
             + " | KL to G0 | ppl under G0 | distinct-2 | degenerate |",
             "|---" * (2 * K + 5) + "|"]
    for a, b, row, _ in rows:
        lines.append(f"| {a}-{b} | " + " | ".join(f"{v:.3f}" for v in row["specificity"]) + " | "
                     + " | ".join(f"{v:.3f}" for v in row["target_prob"])
                     + f" | {row['kl_to_g0']:.3f} | {row['perplexity_g0']:.1f} | {row['distinct_2']:.3f} | "
                       f"{row['degenerate']:.1%} |")
    lines += ["", "## Samples (five per label, the last steps of each block)", ""]
    for a, b, _, samples in rows:
        lines.append(f"### steps {a}-{b}")
        for y, texts in samples.items():
            lines.append(f"- **{names[y]}**: " + " | ".join(repr(t) for t in texts))
        lines.append("")
    (out / "blocks.md").write_text("\n".join(lines) + "\n")
    plot(out, rows, ref, names)
    return lines


def plot(out, rows, ref, names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [(a + b) / 2 for a, b, _, _ in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for y, name in enumerate(names):
        line, = ax1.plot(x, [r["specificity"][y] for _, _, r, _ in rows], marker="o", label=f"dfkd-t3 {name}")
        ax1.axhline(ref["specificity"][y], ls="--", color=line.get_color(), label=f"prompted {name}")
    ax1.set_xlabel("generator step")
    ax1.set_ylabel("teacher specificity")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(x, [r["perplexity_g0"] for _, _, r, _ in rows], marker="o", label="ppl under G0")
    ax2.axhline(ref["perplexity_g0"], ls="--", color="gray", label="prompted ppl")
    ax2.plot(x, [100 * r["degenerate"] for _, _, r, _ in rows], marker="s", label="degenerate %")
    ax2.set_xlabel("generator step")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def report_only(out, every):
    """blocks.md and curves.png from OUT's steps.jsonl and reference.json (a run in progress or stopped)."""
    import yaml
    from ms_dfkd.run_files import read_jsonl
    steps, ref, cfg = out / "steps.jsonl", out / "reference.json", out / "run" / "config.yaml"
    for f in (steps, ref, cfg):
        if not f.is_file():
            raise SystemExit(f"generator_diagnostic --report-only: {f} not found (run the diagnostic first)")
    names = yaml.safe_load(cfg.read_text())["task"]["label_names"]
    records = read_jsonl(steps)
    print("\n".join(write_report(out, records, json.loads(ref.read_text()), every, names)))
    print(f"[diagnostic] wrote {out / 'blocks.md'} and {out / 'curves.png'} from {len(records)} steps")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "sentiment_offline.yaml"))
    ap.add_argument("--steps", type=int, default=300, help="generator steps")
    ap.add_argument("--every", type=int, default=10, help="steps per block line (and per checkpoint)")
    # 40 batches of 8: 160 samples a label, a standard error of about 0.035 on prompted's specificity
    # (the 8 of before gave 0.78 for a level that 40 put at 0.72)
    ap.add_argument("--reference-batches", type=int, default=40, help="batches of the prompted reference")
    ap.add_argument("--out", default=str(ROOT / "runs" / "diagnostic"))
    ap.add_argument("--report-only", action="store_true",
                    help="write blocks.md and curves.png from the steps recorded so far; run nothing")
    args, rest = ap.parse_known_args(argv)
    for name in ("steps", "every", "reference_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.out)
    if args.report_only:
        return report_only(out, args.every)
    import mindspore as ms
    from ms_dfkd.config import ConfigError, load_config, parse_overrides
    from ms_dfkd.run_files import RunFolderBusy, RunLock
    try:
        cfg = load_config(args.config, parse_overrides(rest) + [
            ("run.method", "dfkd-t3"), ("run.out_dir", str(out / "run")), ("run.gen_warmup_steps", str(args.steps)),
            ("run.gen_steps_per_round", str(args.every)), ("run.rounds", "1")])
    except ConfigError as e:
        raise SystemExit(f"generator_diagnostic: {e}") from None
    if cfg.task.kind != "sequence":
        raise SystemExit(f"generator_diagnostic: task.kind {cfg.task.kind}: follows sequence tasks only")
    ms.set_context(mode=ms.GRAPH_MODE if cfg.run.mode == "graph" else ms.PYNATIVE_MODE)
    from ms_dfkd.cpu_runtime import configure_runtime  # as ms-dfkd's command line sets it up
    configure_runtime(cfg.run.threads)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(out):  # the diagnostic's own files; the run folder inside has its own lock
            return diagnose(args, cfg, out)
    except RunFolderBusy as e:
        raise SystemExit(f"generator_diagnostic: {e}") from None


def diagnose(args, cfg, out):
    from ms_dfkd.models.checkpoint_io import safetensors_metadata
    from ms_dfkd.run_files import JsonlWriter, offset_of_step, read_jsonl
    from ms_dfkd.train import CKPT_NAME, NOISE_STREAM_WARMUP, Distiller
    d = Distiller(cfg)
    K, names = d.K, list(cfg.task.label_names)
    ref_path = out / "reference.json"
    if not ref_path.exists():
        print(f"[diagnostic] prompted reference: {args.reference_batches} batches of the frozen generator", flush=True)
        ref_path.write_text(json.dumps(reference(d, args.reference_batches, K), indent=1))
    ref = json.loads(ref_path.read_text())
    steps_out = JsonlWriter(out / "steps.jsonl")
    ckpt = Path(cfg.fmt(cfg.run.out_dir)) / CKPT_NAME
    done = (json.loads(safetensors_metadata(ckpt)["state"])["counters"]["warmup_steps"] if ckpt.exists() else 0)
    if steps_out.path.exists():  # steps recorded after the checkpoint go to a side file, as the run's own
        steps_out.rewind(offset_of_step(steps_out.path, done), f"after-step{done}")

    # the current block's step records, for its summary line (on resume, those kept from before)
    start = done - done % args.every
    block = [r for r in read_jsonl(steps_out.path) if r["step"] >= start] if steps_out.path.exists() else []
    current = {}
    real_generate, real_stats = d.generate_batch, d._label_stats

    def generate(step_id, stream=NOISE_STREAM_WARMUP, **kw):
        current["s"] = real_generate(step_id, stream, **kw)
        current["step"] = step_id
        return current["s"]

    def label_stats(probs, labels, info):
        rec = step_record(current["step"], current["s"], probs, info, K)
        steps_out.write([rec])
        block.append(rec)
        real_stats(probs, labels, info)
        if (rec["step"] + 1) % args.every == 0:
            blk, block[:] = block[-args.every:], []
            spec = np.nanmean([r["specificity"] for r in blk], axis=0)
            print(f"[diagnostic] steps {blk[0]['step']}-{rec['step']}: specificity "
                  + ", ".join(f"{n} {v:.2f} (prompted {p:.2f})" for n, v, p in zip(names, spec, ref["specificity"]))
                  + f"; KL to G0 {np.mean([r['kl_to_g0'] for r in blk]):.3f}; ppl under G0 "
                    f"{np.mean([r['perplexity_g0'] for r in blk]):.1f} (prompted {ref['perplexity_g0']:.1f}); "
                    f"degenerate {np.mean([r['degenerate'] for r in blk]):.0%}", flush=True)

    d.generate_batch, d._label_stats = generate, label_stats
    d._rounds = lambda bar, kG, kS: None  # generator steps only: the warm-up is the whole run
    if d.run() is None:
        print("[diagnostic] interrupted; rerun the same command to continue", file=sys.stderr)
        return 130
    records = read_jsonl(steps_out.path)
    lines = write_report(out, records, ref, args.every, names)
    print("\n".join(lines))
    print(f"[diagnostic] wrote {out / 'blocks.md'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    # Ctrl-C must reach the driver (finish the step, save), not MindSpore's handler, which would end
    # the process with SIGTERM: block it here, before mindspore is imported (ms_dfkd/interrupts.py)
    from ms_dfkd import interrupts
    interrupts.install()
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the run started (the prompted reference): nothing to save
        print("[diagnostic] interrupted", file=sys.stderr)
        sys.exit(130)
