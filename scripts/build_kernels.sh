#!/usr/bin/env bash
# Build the GPU path of the fused kernels: the Triton kernels compiled ahead of time into cubins for one
# GPU architecture, embedded in a small CUDA-driver launcher that is MindSpore's `aot` custom op.
#
#   scripts/build_kernels.sh [ARCH]          ARCH: 90 (default; H100/H200), 80 (A100), sm_89, ...
#   OUT=dir PYTHON=python scripts/build_kernels.sh
#
# Needs no GPU: Triton's compiler runs ptxas here, and nvcc only compiles host code. The result,
# $OUT/libdfkd_kernels.so (default kernels/build/), is what kernels/aot_ops.py loads; run
# scripts/gpu_check_kernels.sh on a GPU machine to check it against the numpy references.
set -euo pipefail

ARCH="${1:-${ARCH:-90}}"
ARCH="${ARCH#sm_}"
ARCH="${ARCH%a}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/kernels/build}"
PYTHON="${PYTHON:-python}"
NVCC="${NVCC:-nvcc}"

case "$ARCH" in
  ''|*[!0-9]*) echo "build_kernels.sh: ARCH must be a compute capability like 90 or sm_90, got '$1'" >&2; exit 2;;
esac
command -v "$NVCC" >/dev/null || { echo "build_kernels.sh: nvcc not found (set NVCC=/path/to/nvcc)" >&2; exit 2; }

mkdir -p "$OUT"
echo "== compiling Triton kernels for sm_$ARCH into $OUT/aot_kernels.h"
(cd "$ROOT" && env -u TRITON_INTERPRET "$PYTHON" -m kernels.aot_build --arch "$ARCH" --out "$OUT")

# Hopper's Triton cubins target sm_90a; the launcher is host code, the -gencode only stamps the arch.
echo "== building $OUT/libdfkd_kernels.so with $NVCC"
"$NVCC" -O2 -std=c++17 -shared -Xcompiler -fPIC \
  -gencode "arch=compute_$ARCH,code=sm_$ARCH" \
  -I"$OUT" "$ROOT/kernels/aot/launcher.cu" -o "$OUT/libdfkd_kernels.so" -ldl
echo "== built $OUT/libdfkd_kernels.so"
nm -D --defined-only "$OUT/libdfkd_kernels.so" | grep -o 'MsDfkd[A-Za-z]*' | sort | tr '\n' ' '
echo
