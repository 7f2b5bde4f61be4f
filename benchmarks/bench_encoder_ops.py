"""The encoder ops (exact GELU, LayerNorm) on their two paths, composite (MindSpore's own ops) and cpu
(the C++ kernels), forward and forward + backward, graph mode, one process.

    python -m benchmarks.bench_encoder_ops                        # a BERT student step's shapes
    python -m benchmarks.bench_encoder_ops --rows 1536 --hidden 384 --intermediate 1536 --repeats 20

GELU runs on [rows, intermediate], LayerNorm on [rows, hidden] (B=32, L=48 gives 1536 rows). The paths
alternate within each measurement, so both see the same machine. Times are medians, in ms, of the call
and the read-back of its outputs (the op's output; for forward+backward, its inputs' gradients for a
given output gradient).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: the cores this process may use)")
    args = ap.parse_args(argv)

    import mindspore as ms
    from mindspore import nn, ops
    ms.set_context(mode=ms.GRAPH_MODE)
    threads = args.threads or len(os.sched_getaffinity(0))
    from kernels import dispatch, gelu, layer_norm, set_kernel_backend
    from ms_dfkd.cpu_runtime import configure_runtime  # as ms-dfkd's command line sets it up: both
    configure_runtime(threads)                           # MindSpore's and the C++ kernels' threads

    class Gelu(nn.Cell):
        def construct(self, x):
            return gelu(x)

    class Norm(nn.Cell):
        def construct(self, x, w, b):
            return layer_norm(x, w, b, 1e-12)

    class Forward(nn.Cell):
        def __init__(self, op):
            super().__init__()
            self.op = op

        def construct(self, *a):
            return self.op(*a[:-1])

    class Backward(Forward):
        """The op's forward and backward: the gradients of its inputs for an output gradient dy."""

        def __init__(self, op):
            super().__init__(op)
            self.grad = ops.GradOperation(get_all=True, sens_param=True)

        def construct(self, *a):
            return self.grad(self.op)(*a)

    rng = np.random.default_rng(0)
    r, h, i = args.rows, args.hidden, args.intermediate
    inputs = {"gelu": [rng.normal(size=(r, i)) * 2, rng.normal(size=(r, i))],
              "layer_norm": [rng.normal(size=(r, h)) * 3 + 1, 1 + 0.1 * rng.normal(size=h),
                             0.1 * rng.normal(size=h), rng.normal(size=(r, h))]}
    inputs = {k: [ms.Tensor(a.astype(np.float32)) for a in v] for k, v in inputs.items()}
    op_cells = {"gelu": Gelu, "layer_norm": Norm}
    paths = ("composite", "cpu")

    def compiled(op, kind, path):
        set_kernel_backend("composite" if path == "composite" else None)
        cell = (Forward if kind == "forward" else Backward)(op_cells[op]())
        cell(*inputs[op])  # compiles under this path
        ran = dispatch.resolve_encoder_path(op)
        set_kernel_backend(None)
        if ran != path:
            sys.exit(f"bench_encoder_ops: asked for the {path} path of {op}, {ran} ran (see the warning above)")
        return cell

    def once(cell, op):
        t = time.perf_counter()
        out = cell(*inputs[op])
        for o in (out if isinstance(out, tuple) else (out,)):
            o.asnumpy()
        return (time.perf_counter() - t) * 1e3

    print(f"threads {threads}; GELU on [{r}, {i}], LayerNorm on [{r}, {h}]; medians of {args.repeats}, ms")
    print("| op | pass | composite | cpu | composite / cpu |")
    print("|---|---|---|---|---|")
    for op in ("gelu", "layer_norm"):
        for kind in ("forward", "forward+backward"):
            cells = {p: compiled(op, kind, p) for p in paths}
            times = {p: [] for p in paths}
            for k in range(args.repeats + 1):
                for p in (paths if k % 2 == 0 else paths[::-1]):
                    ms_ = once(cells[p], op)
                    if k:
                        times[p].append(ms_)
            med = {p: statistics.median(times[p]) for p in paths}
            print(f"| {op} | {kind} | {med['composite']:.2f} | {med['cpu']:.2f} | "
                  f"{med['composite'] / med['cpu']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
