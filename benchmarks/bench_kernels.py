"""Time and peak memory of the fused ops against unfused / unchunked MindSpore, forward + backward.

    python -m benchmarks.bench_kernels                       # from the repository root; the issue's grid
                                                             # (slow on 2 cores)
    python -m benchmarks.bench_kernels --n 512 --v 30522 --h 384 --ops soft_embedding kd_loss
    python -m benchmarks.bench_kernels --backend aot         # on a GPU with MindSpore and the built library
    python -m benchmarks.bench_kernels --ops fused_linear --n 4096 --v 49152 --h 576 \
        --variants logits+composite fused --fused-dweight-group 1 8   # fused once per LM-head grad group

(``python benchmarks/bench_kernels.py`` works too, where the ms-dfkd package is installed.)

Each (op, variant, N, V, H) runs in a fresh subprocess, so that its peak resident memory (the process's
RSS high-water mark, getrusage) is its own; the table shows that peak above the RSS measured just before
the op first runs at full size (inputs built, libraries set up by a tiny run), and the whole-process
peak. Variants:
    soft_embedding   naive: one [N, V] noise / softmax / matmul with autodiff (straight-through hard);
                     composite: kernels.soft_embedding (row slabs, noise regenerated in bprop)
    fused_linear     logits+naive, logits+composite: hidden @ lm_head^T then the above;
                     fused: kernels.fused_linear_soft_embedding (token-chunked, logits never whole)
    kd_loss          naive: log_softmax KL with autodiff; composite: kernels.kd_loss (chunked)
H is the width of the one embedding table and, for fused_linear, also the hidden size.
Times are the median of --repeats runs after one warm-up run (first calls pay one-off set-up).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the workers run here
VARIANTS = {"soft_embedding": ("naive", "composite"), "fused_linear": ("logits+naive", "logits+composite", "fused"),
            "kd_loss": ("naive", "composite")}
FUSED_OF = {"soft_embedding": "composite", "fused_linear": "fused", "kd_loss": "composite"}
BASE_OF = {"soft_embedding": "naive", "fused_linear": "logits+composite", "kd_loss": "naive"}


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _naive_soft_embedding(logits, table, seed, tau, utils, ops):
    """Unchunked: the whole [N, V] noise, softmax and matmul, with MindSpore's autodiff."""
    n, v = logits.shape
    x = logits + utils.gumbel(utils.row_keys(seed, n), 0, v)
    y = ops.softmax(x / tau, axis=-1)
    soft = ops.matmul(y, table)
    hard = ops.gather(table, ops.argmax(x, dim=1), 0)
    return hard + soft - ops.stop_gradient(soft)


def worker(case):
    import mindspore as ms
    import numpy as np
    from mindspore import ops

    from kernels import dispatch, fused_linear_soft_embedding, kd_loss, soft_embedding
    from kernels import soft_embedding_composite as composite
    from kernels import utils

    if case.get("fused_chunk_elements"):
        composite.FUSED_CHUNK_ELEMENTS = case["fused_chunk_elements"]
    if case.get("fused_dweight_group"):
        composite.FUSED_DWEIGHT_GROUP = case["fused_dweight_group"]
    if case["mode"] == "graph":
        ms.set_context(mode=ms.GRAPH_MODE)
    if case["backend"]:
        dispatch.set_kernel_backend(case["backend"])
    if case["device"]:
        ms.set_context(device_target=case["device"])
    from ms_dfkd.cpu_runtime import configure_runtime  # as ms-dfkd's command line sets it up
    configure_runtime()
    n, v, h, op, variant = case["n"], case["v"], case["h"], case["op"], case["variant"]
    rng = np.random.default_rng(0)
    seed, tau, temperature = 7, 0.5, 2.0

    def t(*shape, scale=1.0):
        return ms.Tensor((rng.standard_normal(shape, dtype=np.float32) * scale))

    def make_inputs(n, v, h):
        if op == "soft_embedding":
            return t(n, v, scale=3.0), t(v, h), t(n, h)
        if op == "fused_linear":
            ids = (ms.Tensor(rng.integers(0, v, size=n).astype(np.int32)),) if case.get("given_ids") else ()
            return (t(n, h), t(v, h, scale=h ** -0.5 * 3), t(v, h), t(n, h)) + ids
        return t(n, v, scale=2.0), t(n, v, scale=2.0)

    if op == "soft_embedding":
        def loss(x, table, dout):
            if variant == "naive":
                return (_naive_soft_embedding(x, table, seed, tau, utils, ops) * dout).sum()
            return (soft_embedding(x, [table], seed, tau, hard=True) * dout).sum()
        grad_position = 0
    elif op == "fused_linear":
        # --given-ids: the tokens are known (DFKD-T3 passes the sampled ones), so the hard forward is a
        # gather; the naive variant has no such input and always takes the argmax
        def loss(hidden, lm_head, table, dout, *ids):
            given = ids[0] if ids else None
            if variant == "fused":
                return (fused_linear_soft_embedding(hidden, lm_head, [table], seed, tau, hard=True, ids=given)
                        * dout).sum()
            logits = ops.matmul(hidden, lm_head.T)
            if variant == "logits+naive":
                return (_naive_soft_embedding(logits, table, seed, tau, utils, ops) * dout).sum()
            return (soft_embedding(logits, [table], seed, tau, hard=True, ids=given) * dout).sum()
        grad_position = (0, 1)
    else:
        def loss(s, te):
            if variant == "naive":
                log_q = ops.log_softmax(s / temperature, axis=-1)
                log_p = ops.log_softmax(te / temperature, axis=-1)
                return temperature ** 2 * (ops.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()
            return kd_loss(s, te, temperature)
        grad_position = (0, 1)

    step = ms.value_and_grad(loss, grad_position=grad_position)
    if case["mode"] == "graph":
        step = ms.jit(step)

    def run(inputs):
        value, grads = step(*inputs)
        grads = grads if isinstance(grads, tuple) else (grads,)
        for g in grads:
            g.asnumpy()
        return float(value)

    run(make_inputs(4, 16, 8))  # one-time library set-up (thread pools, kernel caches) is not the op's
    inputs = make_inputs(n, v, h)
    rss_before = _rss_mib()
    times = []
    for _ in range(case["repeats"] + 1):
        start = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"first_s": times[0], "time_s": float(np.median(times[1:])) if len(times) > 1 else times[0],
                      "peak_mib": peak, "rss_before_mib": rss_before}))


def run_case(case, timeout):
    cmd = [sys.executable, "-m", "benchmarks.bench_kernels", "--worker", json.dumps(case)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout}s"}
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ops", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--variants", nargs="+", help="subset of variants to run (default: all of each op)")
    parser.add_argument("--n", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--v", type=int, nargs="+", default=[30522, 49152])
    parser.add_argument("--h", type=int, nargs="+", default=[384, 576])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up run")
    parser.add_argument("--mode", choices=["pynative", "graph"], default="pynative")
    parser.add_argument("--backend", default="", help="kernels backend for the fused variants (default: auto)")
    parser.add_argument("--device", default="", help="MindSpore device_target (default: MindSpore's)")
    parser.add_argument("--fused-chunk-elements", type=int, default=0,
                        help="values per slab of the fused-linear op (default: kernels' FUSED_CHUNK_ELEMENTS)")
    parser.add_argument("--fused-dweight-group", type=int, nargs="+", default=[0],
                        help="slabs per LM-head gradient update of the fused-linear op; several values run "
                             "the fused variant once each (default: kernels' FUSED_DWEIGHT_GROUP)")
    parser.add_argument("--given-ids", action="store_true",
                        help="fused_linear: pass the tokens (as DFKD-T3 does), so the hard forward is a gather")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    parser.add_argument("--json", help="also append every result as a JSON line to this file")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    print(f"mode {args.mode}, backend {args.backend or 'auto'}, {args.repeats} timed run(s) after one warm-up"
          f"{', tokens given (hard forward is a gather)' if args.given_ids else ''}\n")
    print("| op | N | V | H | variant | fwd+bwd s | first run s | peak above inputs MiB | process peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = []
    for op in args.ops:
        for n in args.n:
            for v in args.v:
                for h in args.h:
                    results, variant_of = {}, {}  # label -> result, label -> variant
                    for variant in VARIANTS[op]:
                        if args.variants and variant not in args.variants:
                            continue
                        groups = args.fused_dweight_group if (op, variant) == ("fused_linear", "fused") else [0]
                        for group in groups:
                            case = {"op": op, "variant": variant, "n": n, "v": v, "h": h, "repeats": args.repeats,
                                    "mode": args.mode, "backend": args.backend, "device": args.device,
                                    "fused_chunk_elements": args.fused_chunk_elements, "given_ids": args.given_ids,
                                    "fused_dweight_group": group}
                            label = variant + (f" (group {group})" if group else "")
                            results[label] = r = run_case(case, args.timeout)
                            variant_of[label] = variant
                            if args.json:
                                with open(args.json, "a") as f:
                                    f.write(json.dumps({**case, **r}) + "\n")
                            if "error" in r:
                                print(f"| {op} | {n} | {v} | {h} | {label} | {r['error']} | | | |", flush=True)
                                continue
                            print(f"| {op} | {n} | {v} | {h} | {label} | {r['time_s']:.2f} | {r['first_s']:.2f} "
                                  f"| {r['peak_mib'] - r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} |", flush=True)
                    base = results.get(BASE_OF[op], {})
                    for label, fused in results.items():
                        if variant_of[label] == FUSED_OF[op] and "time_s" in fused and "time_s" in base:
                            summary.append((op, n, v, h, label, BASE_OF[op], fused["time_s"] / base["time_s"],
                                            (fused["peak_mib"] - fused["rss_before_mib"])
                                            / max(base["peak_mib"] - base["rss_before_mib"], 1e-9)))
    if summary:
        print("\n| op | N | V | H | ratio | time | peak memory above inputs |")
        print("|---|---|---|---|---|---|---|")
        for op, n, v, h, fused, base, time_ratio, mem_ratio in summary:
            print(f"| {op} | {n} | {v} | {h} | {fused} / {base} | {time_ratio:.2f}x | {mem_ratio:.2f}x |")


if __name__ == "__main__":
    main()
