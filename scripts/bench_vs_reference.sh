#!/usr/bin/env bash
# ms_dfkd (MindSpore graph mode) vs the PyTorch eager reference: prints one table (see the .py's docstring).
# Needs torch: MS_DFKD_BENCH=1 bash scripts/setup.sh (or pip install torch==2.13.0 into .venv).
# About 10 minutes on 2 CPU cores with the defaults. Arguments go to benchmarks/bench_vs_reference.py,
# e.g. --kinds smoke --repeats 3 --profile
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
python -c "import torch" 2>/dev/null || { echo "bench_vs_reference: torch is not installed; run MS_DFKD_BENCH=1 bash scripts/setup.sh (installs torch==2.13.0)" >&2; exit 1; }
export GLOG_v=${GLOG_v:-3}   # MindSpore: errors only
exec python -m benchmarks.bench_vs_reference "$@"
