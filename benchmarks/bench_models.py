"""Throughput of the models on this machine (a benchmark, not a test), graph mode (ms.jit).

Rows: SmolLM2-135M forward (logits [B, L, V]) and forward+backward (all parameters),
KV-cache sampling (Gumbel-max, no early stop), and the MiniLM-L6 encoder. Compile time is reported separately from the
timed runs (median of --repeats after one warm-up call).

A second table puts the SmolLM2 rows against the compute bound: the weight-matmul FLOPs each call does (2 x the
decoder layers' parameters per token through the layers, 2 x hidden x vocab per row of logits; attention scores
and element-wise work left out) over its median time, and that rate as a share of the fastest forward row's
(the forward reaches the matmul rate MindSpore gets on this machine). A sampling call puts its P prompt tokens and
T - 1 new tokens through the layers and computes T rows of logits (the prefill's last position, then one a step).

    python -m benchmarks.bench_models         # from the repository root; about 2-3 minutes on 2 CPU cores
"""
import argparse
import statistics
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ms_dfkd.assets import asset_path


def timed(fn, repeats):
    """(first-call seconds incl. compile, median seconds of the next `repeats` calls)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def matmul_gflop(cfg, layer_tokens, logit_rows):
    """Weight-matmul GFLOP of a call that puts ``layer_tokens`` tokens through the decoder layers and computes
    ``logit_rows`` rows of vocabulary logits."""
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (H // cfg.num_attention_heads)
    per_layer = H * H * 2 + H * kv * 2 + 3 * H * I          # q, o; k, v; gate, up, down
    return (2 * per_layer * L * layer_tokens + 2 * H * cfg.vocab_size * logit_rows) / 1e9


def bench_generator(rows, args):
    from ms_dfkd.models.llama_sampling import sample
    from ms_dfkd.models.llama_weights import load_gguf_llama
    t = time.perf_counter()
    cfg, model = load_gguf_llama(asset_path("smollm2_gguf"))
    print(f"loaded SmolLM2 in {time.perf_counter() - t:.1f} s", flush=True)
    rng = np.random.default_rng(0)
    L = args.seq_len
    for b in args.batches:
        ids = Tensor(rng.integers(3, cfg.vocab_size, (b, L)).astype(np.int32))
        mask = Tensor(np.ones((b, L), np.int32))

        def fwd(i, m):
            return model(i, attention_mask=m)

        f = ms.jit(fwd)
        first, med = timed(lambda: f(ids, mask).asnumpy(), args.repeats)
        rows.append(("SmolLM2 forward", f"B={b} L={L}", first, med, b * L / med,
                     matmul_gflop(cfg, b * L, b * L)))

    if args.backward:
        b = args.batches[0]
        ids = Tensor(rng.integers(3, cfg.vocab_size, (b, L)).astype(np.int32))
        mask = Tensor(np.ones((b, L), np.int32))

        def loss(i, m):
            return model(i, attention_mask=m).mean()

        g = ms.jit(ms.value_and_grad(loss, None, model.trainable_params()))
        first, med = timed(lambda: g(ids, mask)[0].asnumpy(), max(1, args.repeats - 1))
        rows.append(("SmolLM2 fwd+bwd (all params)", f"B={b} L={L}", first, med, b * L / med))

    P, T = args.prompt_len, args.new_tokens
    for b in args.batches:
        ids = rng.integers(3, cfg.vocab_size, (b, P)).astype(np.int32)
        mask = np.ones((b, P), np.int32)
        first, med = timed(lambda: sample(model, ids, mask, T, seed=1, temperature=1.0, eos_id=-1),
                           args.repeats)
        rows.append(("SmolLM2 KV-cache sampling", f"B={b} P={P} T={T}", first, med, b * T / med,
                     matmul_gflop(cfg, b * (P + T - 1), b * T)))


def bench_encoder(rows, args):
    from ms_dfkd.models.bert_weights import load_hf_bert
    model = load_hf_bert(asset_path("minilm_l6_dir"), head="model")
    rng = np.random.default_rng(0)
    L = args.seq_len
    for b in (8, 32):
        ids = Tensor(rng.integers(1000, 30000, (b, L)).astype(np.int32))
        mask = Tensor(np.ones((b, L), np.int32))

        def fwd(i, m):
            out = model(i, attention_mask=m)
            return out[0] if isinstance(out, (tuple, list)) else out

        f = ms.jit(fwd)
        first, med = timed(lambda: f(ids, mask).asnumpy(), args.repeats)
        rows.append(("MiniLM-L6 encoder forward", f"B={b} L={L}", first, med, b * L / med))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-backward", dest="backward", action="store_false")
    args = ap.parse_args()
    ms.set_context(mode=ms.PYNATIVE_MODE)  # the timed functions are ms.jit graphs
    from ms_dfkd.cpu_runtime import configure_runtime  # as ms-dfkd's command line sets it up
    configure_runtime()
    rows = []
    t0 = time.perf_counter()
    bench_generator(rows, args)
    bench_encoder(rows, args)
    print(f"\n{'model / mode':32s} {'shape':18s} {'1st call s':>10s} {'median s':>9s} {'tokens/s':>9s}")
    for name, shape, first, med, tps, *_ in rows:
        print(f"{name:32s} {shape:18s} {first:10.2f} {med:9.3f} {tps:9.0f}")
    gen = [(r[0], r[1], r[3], r[5] / r[3]) for r in rows if len(r) > 5]  # (name, shape, median s, GFLOP/s)
    fwd_rates = [rate for name, _, _, rate in gen if name == "SmolLM2 forward"]
    if fwd_rates:
        best = max(fwd_rates)
        print(f"\n{'SmolLM2 call':32s} {'shape':18s} {'GFLOP/s':>9s} {'of bound':>9s} {'s per row':>10s}")
        for name, shape, med, rate in gen:
            b = int(shape.split()[0][2:])
            print(f"{name:32s} {shape:18s} {rate:9.1f} {rate / best:9.0%} {med / b:10.3f}")
        print(f"(bound: the fastest forward row, {best:.1f} GFLOP/s of weight matmuls)")
    print(f"(device: {ms.get_context('device_target')}, total {time.perf_counter() - t0:.0f} s; "
          f"1st call includes graph compilation)")


if __name__ == "__main__":
    main()
