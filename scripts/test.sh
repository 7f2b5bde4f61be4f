#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up if needed, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export GLOG_v=${GLOG_v:-3}   # MindSpore: errors only
exec python -m pytest -q "$@"
