"""Choose the generator prompt without any task data: the teacher's specificity rate on samples of the
frozen generator, per prompt template and sampling temperature.

    python scripts/prompt_specificity.py --config configs/sentiment_offline.yaml \
        --teacher.checkpoint runs/teachers/sentiment.safetensors \
        --template "Rewrite the text below as a short {label} movie review.\n{text}" \
        --template "Here is a text:\n{text}\n\nNow write one sentence of a {label} review of a film, like a critic." \
        --temperatures 1.0 0.7 --batches 6

Specificity is the share of samples whose teacher argmax is the label the prompt asked for (METHOD.md);
distinct-2 and self-BLEU of the same samples are printed beside it, because a more specific prompt can
be a less diverse one (configs/sentiment_offline.yaml has such a case: specificity up, students no better).
It needs only the teacher and the general corpus, so a user without the teacher's data can use it; the
same corpus passages and noise seeds are used for every (template, temperature). Templates take
{label} and {text}; "\n" in a template on the command line is a newline. Other arguments are config
overrides (--key value). Prints a table and a few samples of each.
"""
import argparse
import math
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "sentiment_offline.yaml"))
    ap.add_argument("--template", action="append", default=[],
                    help="a prompt template with {label} and {text}; repeat for several (default: the config's)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=None,
                    help="sampling temperatures (default: the config's generator.sample_temperature)")
    ap.add_argument("--batches", type=int, default=4, help="generator batches per setting")
    ap.add_argument("--show", type=int, default=3, help="samples printed per setting")
    args, rest = ap.parse_known_args(argv)

    import mindspore as ms
    import numpy as np
    from ms_dfkd import metrics as M
    from ms_dfkd.config import load_config, parse_overrides
    ms.set_context(mode=ms.GRAPH_MODE)
    cfg = load_config(args.config, parse_overrides(rest))
    from ms_dfkd.cpu_runtime import configure_runtime  # as ms-dfkd's command line sets it up
    configure_runtime(cfg.run.threads)
    if cfg.task.kind != "sequence":
        raise SystemExit(f"prompt_specificity: task.kind {cfg.task.kind}: scores sequence tasks only")
    templates = [t.replace("\\n", "\n") for t in args.template] or [cfg.task.prompt_template]
    for t in templates:
        if "{label}" not in t or "{text}" not in t:
            raise SystemExit(f"--template {t!r}: needs both {{label}} and {{text}}")
    temps = args.temperatures or [cfg.generator.sample_temperature]
    if args.batches < 1:
        raise SystemExit(f"--batches must be >= 1, got {args.batches}")
    cfg.run.method = "prompted"

    from ms_dfkd.train import Distiller
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run.out_dir = tmp
        d = Distiller(cfg)
        # every setting reads the same passages: draw them once, replay them per setting
        state = d.corpus_sampler.state_dict()
        rows = []
        for ti, template in enumerate(templates):
            for temp in temps:
                cfg.task.prompt_template, cfg.generator.sample_temperature = template, temp
                d.corpus_sampler.load_state_dict(state)
                t0, preds, labels, texts = time.time(), [], [], []
                for b in range(args.batches):
                    s = d.generate_batch(b)
                    preds.append(d.teacher_run.probs(s["texts"]).argmax(-1))
                    labels.append(s["labels"])
                    texts += s["texts"]
                labels = np.concatenate(labels)
                rate, n = M.specificity_rate(np.concatenate(preds), labels), len(texts)
                rows.append((ti, temp, rate, math.sqrt(rate * (1 - rate) / n), n, time.time() - t0,
                             M.distinct_n(texts, 2), M.self_bleu(texts, max_samples=64)))
                print(f"\n[template {ti}, temperature {temp}] specificity {rate:.3f} over {n} samples", flush=True)
                for y, text in list(zip(labels, texts))[:args.show]:
                    print(f"  {cfg.task.label_names[y]:>10}: {text[:160]!r}")
    print("\n| template | temperature | specificity | std. error | samples | s | distinct-2 | self-BLEU |\n"
          "|---|---|---|---|---|---|---|---|")
    for ti, temp, rate, se, n, sec, d2, sb in rows:
        print(f"| {ti} | {temp} | {rate:.3f} | {se:.3f} | {n} | {sec:.0f} | {d2:.3f} | {sb:.3f} |")
    for ti, t in enumerate(templates):
        print(f"template {ti}: {t!r}")


if __name__ == "__main__":
    main()
