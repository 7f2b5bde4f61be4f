"""One KV-cache decode step of SmolLM2 on its CPU paths: MindSpore's ops, each decoder layer as one C++ op with
float32 weights, and the same op reading the frozen layers and the LM head from the GGUF blocks (in ggml's
layout, and in the layout this CPU's loops read fastest: interleaved by 8 weight rows for AVX2).

    python -m benchmarks.bench_decode_step                     # B=8, the offline default's cache of 104 slots
    python -m benchmarks.bench_decode_step --batch 32 --repeats 30

The step graph alone (KVCacheDecoder.step, then reading its logits back), with the top 2 layers trainable as
in dfkd-t3 (they keep float32 weights on every path). Each path runs in a process of its own, one after
another, so a path does not inherit the others' caches or compiled graphs; the table gives the median of
--repeats steps after 3, and the logits' largest difference from MindSpore's ops' (same inputs; random caches),
relative to the largest logit.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

PATHS = {"ops": "MindSpore's ops", "fused": "one C++ op a layer, float32 weights",
         "blocks-ggml": "one C++ op a layer, GGUF blocks for frozen weights, ggml's layout",
         "blocks": "one C++ op a layer, GGUF blocks for frozen weights, the layout its loops read fastest"}


def worker(path, batch, slots, repeats, out):
    import mindspore as ms
    from mindspore import Tensor
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from ms_dfkd.cpu_runtime import configure_runtime
    configure_runtime(0)
    from ms_dfkd.assets import asset_path
    from ms_dfkd.models.llama import set_trainable
    from ms_dfkd.models.llama_sampling import _decoder, decode_blocks
    from ms_dfkd.models.llama_weights import load_gguf_llama
    cfg, model = load_gguf_llama(asset_path("smollm2_gguf"))
    set_trainable(model, "top_k", 2)
    dec = _decoder(model, True)
    rng = np.random.default_rng(0)
    d = cfg.hidden_size // cfg.num_attention_heads
    caches = tuple(Tensor((rng.standard_normal((batch, cfg.num_key_value_heads, slots, d)) * 0.5).astype(np.float32))
                   for _ in range(2 * cfg.num_hidden_layers))
    written = slots - 24
    ids = Tensor(rng.integers(100, 40000, (batch, 1)).astype(np.int32))
    positions = Tensor(np.full((batch, 1), written, np.int32))
    key_mask = np.zeros((batch, slots), np.int32)
    key_mask[:, :written + 1] = 1
    write_slot = np.zeros(slots, bool)
    write_slot[written] = True
    block_set = -1
    if path.startswith("blocks"):
        block_set = dec.block_set(*decode_blocks(model, interleaved=False if path == "blocks-ggml" else None)[:2])

    def step():
        return dec.step(ids, positions, Tensor(key_mask), Tensor(write_slot), ms.mutable(caches), None, 0, 0,
                        path != "ops", block_set)[0].asnumpy()

    for _ in range(3):
        logits = step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    np.save(out + ".npy", logits)
    with open(out + ".json", "w") as f:
        json.dump({"median_ms": float(np.median(times) * 1e3)}, f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--slots", type=int, default=104, help="cache length: padded prompt + new tokens")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--worker", choices=sorted(PATHS), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.slots <= 24:
        ap.error(f"--slots {args.slots}: needs more than 24 (the step writes slot slots - 24)")
    if args.worker:
        worker(args.worker, args.batch, args.slots, args.repeats, args.out)
        return 0
    import tempfile
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in PATHS:
            out = os.path.join(tmp, path)
            done = subprocess.run([sys.executable, "-m", "benchmarks.bench_decode_step", "--worker", path, "--out", out,
                                   "--batch", str(args.batch), "--slots", str(args.slots), "--repeats",
                                   str(args.repeats)], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"bench_decode_step: the {path} path failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            with open(out + ".json") as f:
                results[path] = dict(json.load(f), logits=np.load(out + ".npy"))
    base = results["ops"]
    print(f"SmolLM2 decode step, B={args.batch}, {args.slots} cache slots, median of {args.repeats} "
          f"(top 2 layers trainable)\n")
    print("| path | ms a step | against MindSpore's ops | logits' largest difference / largest logit |")
    print("|---|---|---|---|")
    for path, label in PATHS.items():
        r = results[path]
        diff = float(np.abs(r["logits"] - base["logits"]).max() / np.abs(base["logits"]).max())
        print(f"| {label} | {r['median_ms']:.1f} | {base['median_ms'] / r['median_ms']:.2f}x | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
