#!/usr/bin/env bash
# The results tables: bash scripts/reproduce_results.sh [--task sentiment|ner] [--quick]. Resumable: rerun to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export GLOG_v=${GLOG_v:-3}
exec python scripts/reproduce_results.py "$@"
