"""The aot path without a GPU: the launcher's argument marshalling against a recording mock of the CUDA
driver, and the Triton compiler producing sm_90 cubins here. (Running the cubins needs a GPU:
scripts/gpu_check_kernels.sh.)

Every launch the launcher makes is written down by the mock (kernel, cubin variant, grid, block,
shared memory, each argument's value) and compared with the launches these tests expect, derived
here from the kernels' signatures and block sizes: pointers as (buffer, byte offset), sizes, strides.
"""
import ctypes  # noqa: F401  (used by the script run in the subprocess)
import glob
import inspect
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from kernels import aot_build, aot_ops, triton_config as cfg

ROOT = pathlib.Path(__file__).resolve().parent.parent
LOGIT_KERNELS = ("se_forward_kernel", "se_backward_logits_kernel", "se_backward_table_kernel",
                 "kd_forward_kernel", "kd_backward_kernel")
SHARED = {"se_forward_kernel": 57600}  # above 48 KiB: the launcher must raise the function's limit

MOCK_DRIVER = r"""
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef int CUresult;
static FILE *out(void) { static FILE *f; if (!f) f = fopen(getenv("MOCK_CUDA_LOG"), "w"); return f; }
static int n_params(const char *name) {  /* "name count" lines in MOCK_CUDA_SIGS */
  FILE *f = fopen(getenv("MOCK_CUDA_SIGS"), "r"); char n[128]; int c, found = -1;
  while (fscanf(f, "%127s %d", n, &c) == 2) if (!strcmp(n, name)) found = c;
  fclose(f); return found;
}
typedef struct { char name[128]; char image[128]; } Fn;
CUresult cuInit(unsigned f) { return 0; }
CUresult cuDeviceGet(int *d, int o) { *d = 0; return 0; }
CUresult cuDevicePrimaryCtxRetain(void **c, int d) { *c = (void *)1; return 0; }
CUresult cuCtxGetCurrent(void **c) { *c = (void *)1; return 0; }
CUresult cuCtxSetCurrent(void *c) { return 0; }
CUresult cuModuleLoadData(void **m, const void *image) {
  fprintf(out(), "load %s\n", memcmp(image, "\x7f" "ELF", 4) ? "not-elf" : (const char *)image + 4);
  *m = (void *)image; return 0;
}
CUresult cuModuleGetFunction(void **f, void *m, const char *name) {
  Fn *fn = calloc(1, sizeof(Fn)); strncpy(fn->name, name, 127); strncpy(fn->image, (const char *)m + 4, 127);
  *f = fn; return 0;
}
CUresult cuFuncSetAttribute(void *f, int attr, int value) {
  fprintf(out(), "attr %s %d %d\n", ((Fn *)f)->name, attr, value); return 0;
}
CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, void *stream, void **params, void **extra) {
  Fn *fn = f; int n = n_params(fn->name);
  fprintf(out(), "launch %s %u %u %u %u %u %u %u %p", fn->image, gx, gy, gz, bx, by, bz, shared, stream);
  for (int i = 0; i < n; ++i) { uint64_t v; memcpy(&v, params[i], 8); fprintf(out(), " %llx", (unsigned long long)v); }
  fprintf(out(), "\n"); fflush(out()); return 0;
}
CUresult cuGetErrorString(CUresult r, const char **s) { *s = "mock"; return 0; }
"""

# Calls made through the aot ABI in the subprocess: (entry point, [(shape, dtype)] of inputs then outputs).
N, V, H0, H1, HG = 70, 1000, 100, 30, 20
FN, FR = 300, cfg.FUSED_ROWS
SCALARS = [((1,), "int64"), ((1,), "float32"), ((1,), "int64")]  # seed, tau, row_offset
CALLS = [
    ("MsDfkdSeForward", [((N, V), "float16"), ((V, H0), "float32"), ((V, H1), "float32"), ((N,), "int32")] + SCALARS
     + [((N, H0 + H1), "float32")] * 2 + [((N,), "float32"), ((N,), "int32")]),
    ("MsDfkdSeForwardOneTable", [((N, V), "float32"), ((V, H0), "float32"), ((V, H0), "float32"), ((N,), "int32")]
     + SCALARS + [((N, H0), "float32")] * 2 + [((N,), "float32"), ((N,), "int32")]),
    ("MsDfkdSeBackward", [((N, V), "bfloat16"), ((V, H0), "float32"), ((V, H1), "float32")] + SCALARS
     + [((N,), "float32"), ((N, H0 + H1), "float32"), ((N, H0 + H1), "float32"), ((N, V), "bfloat16")]),
    ("MsDfkdSeBackwardTables", [((N, V), "float32")] + SCALARS + [((N,), "float32"), ((N, H0 + H1), "float32"),
                                                                  ((V, H0), "float32"), ((V, H1), "float32"),
                                                                  ((V, H0), "float32"), ((V, H1), "float32")]),
    ("MsDfkdFusedForward", [((FN, HG), "float32"), ((V, HG), "float32"), ((V, H0), "float32"), ((V, H1), "float32"),
                            ((FN,), "int32")] + SCALARS + [((FN, H0 + H1), "float32")] * 2
     + [((FN,), "float32"), ((FN,), "int32"), ((FR, V), "float32")]),
    ("MsDfkdFusedBackward", [((FN, HG), "float32"), ((V, HG), "float32"), ((V, H0), "float32"), ((V, H1), "float32")]
     + SCALARS + [((FN,), "float32"), ((FN, H0 + H1), "float32"), ((FN, H0 + H1), "float32"),
                  ((FN, HG), "float32"), ((V, HG), "float32"), ((FR, V), "float32")]),
    ("MsDfkdKdForward", [((N, V), "float16"), ((N, V), "float16"), ((1,), "float32")] + [((N,), "float32")] * 3),
    ("MsDfkdKdBackward", [((N, V), "bfloat16"), ((N, V), "bfloat16"), ((1,), "float32")] + [((N,), "float32")] * 4
     + [((N, V), "bfloat16")] * 2),
    ("MsDfkdGumbel", [((1,), "int64"), ((1,), "int64"), ((N, V), "float32"), ((N, V), "float32")]),
]


def base(i):
    """The fake device address of parameter i of a call."""
    return (i + 1) << 36


def cdiv(a, b):
    return -(-a // b)


def ptr(i, offset=0):
    return ("ptr", base(i) + offset)


def launch(kernel, variant, grid, args):
    return (f"{kernel}:{variant}", grid, [("ptr", a[1]) if isinstance(a, tuple) else ("i32", a) for a in args]
            + [("ptr", 0), ("ptr", 0)])  # Triton's two trailing scratch pointers, null


def se_forward_launch(variant, n, logits, t0, t1, h1, ids, scalars, outs, row_base=0):
    width = H0 + h1
    args = [logits, t0, t1, ptr(ids, 4 * row_base)] + [ptr(s) for s in scalars]
    args += [ptr(outs[0], 4 * row_base * width), ptr(outs[1], 4 * row_base * width), ptr(outs[2], 4 * row_base),
             ptr(outs[3], 4 * row_base)]
    args += [n, V, H0, h1, row_base, V, H0, h1 if h1 else H0, width]
    grid = (cdiv(n, cfg.SE_BLOCK_M), cdiv(H0, cfg.SE_BLOCK_H) + cdiv(h1, cfg.SE_BLOCK_H))
    return launch("se_forward_kernel", variant, grid, args)


def se_backward_launch(variant, n, logits, t0, t1, h1, scalars, lse, soft, dout, dlogits, row_base=0):
    width = H0 + h1
    args = [logits, t0, t1] + [ptr(s) for s in scalars]
    args += [ptr(lse, 4 * row_base), ptr(soft, 4 * row_base * width), ptr(dout, 4 * row_base * width), dlogits]
    args += [n, V, H0, h1, row_base, V, H0, h1 if h1 else H0, width, V]
    return launch("se_backward_logits_kernel", variant, (cdiv(n, cfg.SE_BLOCK_M), cdiv(V, cfg.SE_BLOCK_V)), args)


def matmul_launch(accumulate, a, b, c, m, n, k, strides):
    grid = (cdiv(m, cfg.MM_BLOCK_M), cdiv(n, cfg.MM_BLOCK_N))
    return launch("matmul_kernel", f"acc{int(accumulate)}", grid, [a, b, c, m, n, k] + list(strides))


def expected_launches():
    w = H0 + H1
    table = lambda col0, h, out: launch(  # noqa: E731
        "se_backward_table_kernel", "fp32", (cdiv(V, cfg.SE_BLOCK_V), cdiv(h, cfg.SE_BLOCK_H)),
        [ptr(0), ptr(1), ptr(2), ptr(3), ptr(4), ptr(5), ptr(out), N, V, h, col0, V, w, h])
    expected = {
        "MsDfkdSeForward": [se_forward_launch("fp16", N, ptr(0), ptr(1), ptr(2), H1, 3, (4, 5, 6), (7, 8, 9, 10))],
        "MsDfkdSeForwardOneTable": [se_forward_launch("fp32", N, ptr(0), ptr(1), ptr(2), 0, 3, (4, 5, 6),
                                                      (7, 8, 9, 10))],
        "MsDfkdSeBackward": [se_backward_launch("bf16", N, ptr(0), ptr(1), ptr(2), H1, (3, 4, 5), 6, 7, 8, ptr(9))],
        "MsDfkdSeBackwardTables": [table(0, H0, 8), table(H0, H1, 9)],
        "MsDfkdKdForward": [launch("kd_forward_kernel", "fp16", (N, 1), [ptr(i) for i in range(6)] + [V] * 3)],
        "MsDfkdKdBackward": [launch("kd_backward_kernel", "bf16", (N, cdiv(V, cfg.KD_BLOCK)),
                                    [ptr(i) for i in range(9)] + [V] * 5)],
        "MsDfkdGumbel": [launch("gumbel_kernel", "fp32", (cdiv(N, cfg.SE_BLOCK_M), cdiv(V, cfg.SE_BLOCK_V)),
                                [ptr(0), ptr(1), ptr(2), ptr(3), N, V])],
        "MsDfkdFusedForward": [],
        "MsDfkdFusedBackward": [],
    }
    for r0 in range(0, FN, FR):
        rows = min(FR, FN - r0)
        logits = matmul_launch(False, ptr(0, 4 * r0 * HG), ptr(1), ptr(12), rows, V, HG, (HG, 1, 1, HG, V, 1))
        expected["MsDfkdFusedForward"] += [logits, se_forward_launch("fp32", rows, ptr(12), ptr(2), ptr(3), H1, 4,
                                                                     (5, 6, 7), (8, 9, 10, 11), row_base=r0)]
        expected["MsDfkdFusedBackward"] += [
            logits,
            se_backward_launch("fp32", rows, ptr(12), ptr(2), ptr(3), H1, (4, 5, 6), 7, 8, 9, ptr(12), row_base=r0),
            matmul_launch(False, ptr(12), ptr(1), ptr(10, 4 * r0 * HG), rows, HG, V, (V, 1, HG, 1, HG, 1)),
            matmul_launch(r0 > 0, ptr(12), ptr(0, 4 * r0 * HG), ptr(11), V, HG, rows, (1, V, HG, 1, HG, 1)),
        ]
    return expected


def _n_args(kernel_name):
    from kernels import triton_kernels
    fn = getattr(triton_kernels, kernel_name).fn
    return sum(1 for p in inspect.signature(fn).parameters.values() if "constexpr" not in str(p.annotation))


def _cuda_include():
    for candidate in [os.environ.get("CUDA_HOME", "")] + sorted(glob.glob("/usr/local/cuda*")):
        if candidate and os.path.isfile(os.path.join(candidate, "include", "cuda.h")):
            return os.path.join(candidate, "include")
    return None


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    nvcc, cc, include = shutil.which("nvcc"), shutil.which("cc") or shutil.which("gcc"), _cuda_include()
    if not (nvcc and cc and include):
        pytest.skip(f"needs nvcc, a C compiler and cuda.h (nvcc={nvcc}, cc={cc}, cuda.h in {include})")
    tmp = tmp_path_factory.mktemp("aot")
    kernels = [(k, v) for k in LOGIT_KERNELS for v in aot_build.LOGIT_DTYPES] + [
        ("matmul_kernel", "acc0"), ("matmul_kernel", "acc1"), ("gumbel_kernel", "fp32")]
    fake = [{"name": k, "variant": v, "cubin": b"\x7fELF" + f"{k}:{v}".encode() + b"\0", "num_warps": 4,
             "shared": SHARED.get(k, 1024), "n_scratch": 2} for k, v in kernels]
    aot_build.write_header(fake, cfg, tmp / "aot_kernels.h", 90)
    (tmp / "sigs.txt").write_text("".join(f"{k} {_n_args(k) + 2}\n" for k in dict(kernels)))
    (tmp / "mock.c").write_text(MOCK_DRIVER)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(tmp / "libcuda.so.1"), str(tmp / "mock.c")], check=True)
    subprocess.run([nvcc, "-O1", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-I", str(tmp), "-I", include,
                    str(ROOT / "kernels" / "aot" / "launcher.cu"), "-o", str(tmp / aot_ops.LIB_NAME), "-ldl"],
                   check=True, capture_output=True)
    return tmp


def _run_calls(lib_dir, calls):
    script = textwrap.dedent(f"""
        import ctypes, sys
        lib = ctypes.CDLL({str(lib_dir / aot_ops.LIB_NAME)!r})
        for name, params in {calls!r}:
            n = len(params)
            ptrs = (ctypes.c_void_p * n)(*[(i + 1) << 36 for i in range(n)])
            ndims = (ctypes.c_int * n)(*[len(s) for s, _ in params])
            shape_arrays = [(ctypes.c_int64 * len(s))(*s) for s, _ in params]
            shapes = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(a, ctypes.POINTER(ctypes.c_int64))
                                                           for a in shape_arrays])
            dtypes = (ctypes.c_char_p * n)(*[d.encode() for _, d in params])
            rc = getattr(lib, name)(n, ptrs, ndims, shapes, dtypes, ctypes.c_void_p(0x5EA), None)
            print(name, rc)
    """)
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib_dir), MOCK_CUDA_LOG=str(lib_dir / "launches.log"),
               MOCK_CUDA_SIGS=str(lib_dir / "sigs.txt"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return dict(line.split() for line in out.stdout.splitlines()), (lib_dir / "launches.log").read_text()


def _parse(log, signatures):
    launches = []
    for line in log.splitlines():
        if not line.startswith("launch "):
            continue
        _, kernel, gx, gy, gz, bx, by, bz, shared, stream, *values = line.split()
        assert (int(gz), int(bx), int(by), int(bz)) == (1, 128, 1, 1), line
        assert int(stream, 16) == 0x5EA and int(shared) == SHARED.get(kernel.split(":")[0], 1024), line
        kinds = signatures[kernel.split(":")[0]]
        args = [(kind, int(v, 16) if kind == "ptr" else ctypes_i32(int(v, 16))) for kind, v in zip(kinds, values)]
        launches.append((kernel, (int(gx), int(gy)), args))
    return launches


def ctypes_i32(value):
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _signatures():
    from kernels import triton_kernels
    kinds = {}
    for name in LOGIT_KERNELS + ("matmul_kernel", "gumbel_kernel"):
        params = inspect.signature(getattr(triton_kernels, name).fn).parameters.values()
        kinds[name] = [("ptr" if p.name.endswith("_ptr") else "i32") for p in params
                       if "constexpr" not in str(p.annotation)] + ["ptr", "ptr"]
    return kinds


def test_launcher_makes_the_expected_launches(launcher):
    codes, log = _run_calls(launcher, CALLS)
    assert all(rc == "0" for rc in codes.values()), codes
    assert "not-elf" not in log
    assert "attr se_forward_kernel 8 57600" in log  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    launches = _parse(log, _signatures())
    expected = expected_launches()
    for name, _ in CALLS:
        got, launches = launches[:len(expected[name])], launches[len(expected[name]):]
        assert got == [(k, g, a) for k, g, a in expected[name]], name
    assert launches == []


def test_one_table_backward_and_bad_dtypes(launcher):
    one_table = [("MsDfkdSeBackwardTablesOneTable", CALLS[3][1]),
                 ("MsDfkdKdForward", [((N, V), "int32"), ((N, V), "int32"), ((1,), "float32")]
                  + [((N,), "float32")] * 3)]
    codes, log = _run_calls(launcher, one_table)
    assert codes == {"MsDfkdSeBackwardTablesOneTable": "0", "MsDfkdKdForward": "1"}
    launches = _parse(log, _signatures())
    assert len(launches) == 1 and launches[0][0] == "se_backward_table_kernel:fp32"


def test_triton_compiles_an_sm90_cubin_without_a_gpu():
    """One kernel through aot_build's compiler call, in a process without TRITON_INTERPRET."""
    code = textwrap.dedent("""
        from kernels import aot_build, triton_kernels as k
        spec = [s for s in aot_build.kernel_specs(k) if s[0] == "kd_forward_kernel" and s[1] == "bf16"]
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        name, variant, fn, sig, consts = spec[0]
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        print(kernel.asm["cubin"][:4] == b"\\x7fELF", ".target sm_90a" in kernel.asm["ptx"], kernel.metadata.name)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.stdout.split() == ["True", "True", "kd_forward_kernel"], out.stdout + out.stderr[-3000:]


def test_aot_library_is_refused_on_cpu():
    assert "GPU only" in aot_ops.unavailable_reason()
