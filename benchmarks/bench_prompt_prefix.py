"""KV-cache sampling on the driver's own prompts, with the shared prompt start computed once per group of rows
and with every prompt row in full (a benchmark, not a test).

The prompts are the offline default's: corpus passages in the sentiment template and the generator's chat
format, labels balanced in each batch, left-padded to generator.prompt_max_length. The two paths alternate,
the same batches and noise for both; medians of --repeats after one compiling call each. The last columns say
how many of the texts the two paths wrote are the same (their logits differ by float rounding only, so a
near-tie of the Gumbel-max can go the other way) and how many prompt positions the shared path skips.

    python -m benchmarks.bench_prompt_prefix            # from the repository root; about 5 minutes on 2 CPU cores
"""
import argparse
import statistics
import time
from types import SimpleNamespace

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/sentiment_offline.yaml")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import mindspore as ms
    from ms_dfkd import build
    from ms_dfkd.config import load_config
    from ms_dfkd.corpus import Corpus, CorpusSampler, balanced_labels
    from ms_dfkd.models.llama_sampling import sample, shared_prefix
    from ms_dfkd.train import Distiller

    ms.set_context(mode=ms.GRAPH_MODE)
    from ms_dfkd.cpu_runtime import configure_runtime  # as ms-dfkd's command line sets it up
    configure_runtime()
    cfg = load_config(args.config)
    g = cfg.generator
    tok = build.generator_tokenizer(cfg)
    model, _ = build.build_generator(cfg)
    corpus = Corpus(cfg.corpus.sources, cfg.corpus.min_words, cfg.corpus.max_words)
    sampler = CorpusSampler(corpus, 0)
    K = len(cfg.task.label_names)
    prompter = SimpleNamespace(cfg=cfg, g_tok=tok, P=g.prompt_max_length)  # what Distiller's prompts read
    stops = Distiller._stop_ids(prompter)

    print(f"| batch | full prompt: s a call | shared start: s a call | full / shared | new tokens/s (shared) "
          f"| prefix n, groups | prompt positions skipped | same texts |")
    print("|---|---|---|---|---|---|---|---|")
    for b in args.batches:
        batches = []
        for i in range(args.repeats + 1):
            labels = np.asarray(balanced_labels(b, K, i), np.int32)
            batches.append(Distiller._prompt_ids(prompter, sampler.next_batch(b), labels))
        times = {True: [], False: []}
        texts = {True: [], False: []}
        new_tokens = 0
        for i, (ids, mask) in enumerate(batches):
            for share in (True, False) if i % 2 == 0 else (False, True):
                t = time.perf_counter()
                new, new_mask = sample(model, ids, mask, g.max_new_tokens, seed=1000 + i, top_p=g.top_p,
                                       temperature=g.sample_temperature, eos_id=tok.eos_id, stop_ids=stops,
                                       share_prefix=share)
                if i:  # the first call of each path compiles
                    times[share].append(time.perf_counter() - t)
                    new_tokens += int(new_mask.sum()) if share else 0
                texts[share] += [tok.decode(r[m == 1]) for r, m in zip(new, new_mask)]
        n, group, first = shared_prefix(*batches[0])
        real = int(batches[0][1].sum())
        full_s, shared_s = statistics.median(times[False]), statistics.median(times[True])
        same = sum(a == c for a, c in zip(texts[True], texts[False]))
        print(f"| {b} | {full_s:.2f} | {shared_s:.2f} | {full_s / shared_s:.2f}x | "
              f"{new_tokens / sum(times[True]):.0f} | {n}, {len(first)} | "
              f"{(b - len(first)) * n / real:.0%} of {real} real | {same} of {len(texts[True])} |", flush=True)


if __name__ == "__main__":
    main()
