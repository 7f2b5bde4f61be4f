#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up if needed, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export GLOG_v=${GLOG_v:-3}   # MindSpore: errors only
# --durations: the suite is budgeted at 20 min on a 2-core CPU; CI logs show which tests spend it
exec python -m pytest -q --durations=15 "$@"
