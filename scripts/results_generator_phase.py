"""The generator phase of a two_phase results profile (run.gen_phase_log_every): its curve by blocks against
prompted's level, and the generator-learning target within its first 300 steps, from the run folders.
Used by scripts/reproduce_results.py."""
import os
import statistics

from ms_dfkd.run_files import read_jsonl

# the generator-learning target: within PHASE_WITHIN steps, over the PHASE_TAIL steps that end there
PHASE_WITHIN, PHASE_TAIL, PHASE_SPEC_GAIN, PHASE_PPL_RATIO, PHASE_DEGENERATE = 300, 100, 0.10, 1.5, 0.05


def _jsonl(path):
    """The records of a run's metrics.jsonl; none for a run not started yet."""
    return read_jsonl(path) if path.exists() else []


def generator_phase(out, prof):
    """The generator phase's curve (two_phase with run.gen_phase_log_every) from the first seed's dfkd-t3 run's
    warm-up lines, and prompted's level (its rounds' means over every seed). None without such lines."""
    r = prof.run
    if r.schedule != "two_phase" or not r.gen_warmup_steps or not r.gen_phase_log_every:
        return None
    warm = [m for m in _jsonl(out / f"dfkd-t3_seed{prof.results.seeds[0]}" / "metrics.jsonl")
            if m.get("phase") == "warmup"]
    if not warm:
        return None
    rounds = [m for s in prof.results.seeds for m in _jsonl(out / f"prompted_seed{s}" / "metrics.jsonl")
              if "round" in m]
    keys = [f"{k}_{n}" for k in ("specificity", "target_prob") for n in prof.task.label_names] + ["perplexity_g0"]
    level = {k: statistics.mean(m[k] for m in rounds) for k in keys if rounds and all(k in m for m in rounds)}
    return warm, level


def generator_phase_lines(out, prof, name, root):
    """RESULTS lines of the generator phase: its curve by blocks, prompted's level, the generator-learning target
    over the PHASE_TAIL steps that end at step PHASE_WITHIN or at the phase's end if sooner (each label's specificity at least PHASE_SPEC_GAIN above prompted's, perplexity
    under G0 at most PHASE_PPL_RATIO times prompted's, at most PHASE_DEGENERATE degenerate samples), the phase's last
    PHASE_TAIL steps when it ran longer, and a PNG."""
    got = generator_phase(out, prof)
    if got is None:
        return []
    warm, level = got
    names = prof.task.label_names
    cols = [f"specificity_{n}" for n in names] + [f"target_prob_{n}" for n in names] + [
        "loss_flu", "perplexity_g0", "batch_distinct_2", "degenerate"]
    heads = [f"spec {n}" for n in names] + [f"p(target) {n}" for n in names] + [
        "KL to G0", "ppl under G0", "distinct-2 (batch)", "degenerate"]
    lines = ["", "## The generator phase", "",
             f"dfkd-t3's generator over its {prof.run.gen_warmup_steps} steps (the seed-{prof.results.seeds[0]} run, "
             f"batches of {prof.generator.batch_size}), a line every {prof.run.gen_phase_log_every} steps; prompted's "
             "level is the mean over its runs' rounds (its data phase, every seed).", "",
             "| steps | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    first = 0
    for m in warm:
        lines.append(f"| {first}-{m['warmup_steps'] - 1} | " + " | ".join(
            f"{m[k]:.3f}" if k in m else "-" for k in cols) + " |")
        first = m["warmup_steps"]
    if level:
        lines.append("| prompted | " + " | ".join(f"{level[k]:.3f}" if k in level else "-" for k in cols) + " |")
    done = warm[-1]["warmup_steps"]
    if level and done >= prof.run.gen_warmup_steps:
        target_end = min(done, PHASE_WITHIN)
        lines += ["", _window_line(warm, level, names, cols, target_end, target=True)]
        if done > target_end:  # a longer phase: where it ended, for comparison
            lines += ["", _window_line(warm, level, names, cols, done, target=False)]
    png = plot_generator_phase(warm, level, names, root / f"results_{prof.results.section or name}_generator_phase.png")
    return lines + ["", f"![the generator phase: specificity per label]({os.path.relpath(png, root)})"]


def _window_line(warm, level, names, cols, end, target):
    """One line: the blocks of the PHASE_TAIL steps that end at step `end` against prompted's level, and, with
    `target`, whether they meet the generator-learning target."""
    tail = [m for m in warm if end - PHASE_TAIL < m["warmup_steps"] <= end]
    w = [m["steps_in_record"] for m in tail]
    mean = {k: sum(m[k] * n for m, n in zip(tail, w)) / sum(w) for k in cols if all(k in m for m in tail)}
    gains = {n: mean[f"specificity_{n}"] - level[f"specificity_{n}"] for n in names}
    ratio = mean["perplexity_g0"] / level["perplexity_g0"]
    last = tail[-1]["warmup_steps"]
    text = (f"Over steps {last - sum(w)}-{last - 1}: specificity above prompted's by "
            + ", ".join(f"{g:+.3f} ({n})" for n, g in gains.items())
            + f"; perplexity under G0 {ratio:.2f}x prompted's; {mean['degenerate']:.1%} degenerate.")
    if not target:
        return text + f" (The phase's last {PHASE_TAIL} steps, past the target's {PHASE_WITHIN}.)"
    met = (all(g >= PHASE_SPEC_GAIN for g in gains.values()) and ratio <= PHASE_PPL_RATIO
           and mean["degenerate"] <= PHASE_DEGENERATE)
    return text + (f" Target (within {PHASE_WITHIN} steps: at least +{PHASE_SPEC_GAIN:.2f} for each label, at most "
                   f"{PHASE_PPL_RATIO}x, at most {PHASE_DEGENERATE:.0%}): {'met' if met else 'not met'}.")


def plot_generator_phase(warm, level, names, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [m["warmup_steps"] for m in warm]
    for i, n in enumerate(names):
        line, = ax.plot(steps, [m.get(f"specificity_{n}", float("nan")) for m in warm], marker="o", label=n)
        if f"specificity_{n}" in level:
            ax.axhline(level[f"specificity_{n}"], ls="--", color=line.get_color(), label=f"prompted, {n}")
    bx.plot(steps, [m.get("perplexity_g0", float("nan")) for m in warm], marker="o", label="dfkd-t3")
    if "perplexity_g0" in level:
        bx.axhline(level["perplexity_g0"], ls="--", color="gray", label="prompted")
    for a, y in ((ax, "teacher specificity"), (bx, "perplexity under G0")):
        a.set_xlabel("generator steps")
        a.set_ylabel(y)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
