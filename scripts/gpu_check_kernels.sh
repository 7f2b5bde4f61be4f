#!/usr/bin/env bash
# On a GPU machine: check the aot Triton kernels against the numpy references, then time them.
#
#   scripts/gpu_check_kernels.sh [--no-timing]
#
# Uses kernels/build/libdfkd_kernels.so if it is there (carried from the build machine; built for
# sm_90 by default), else builds it for this GPU with scripts/build_kernels.sh (needs nvcc and triton).
# REBUILD=1 forces the build. Needs python3 with numpy and CuPy; MindSpore is not needed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
LIB="${MS_DFKD_KERNELS_LIB:-$ROOT/kernels/build/libdfkd_kernels.so}"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader || true
if [ ! -f "$LIB" ] || [ "${REBUILD:-0}" = 1 ]; then
  ARCH="${ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')}"
  PYTHON="$PYTHON" "$ROOT/scripts/build_kernels.sh" "$ARCH"
  LIB="$ROOT/kernels/build/libdfkd_kernels.so"
fi
exec "$PYTHON" "$ROOT/scripts/gpu_check_kernels.py" --lib "$LIB" "$@"
