#!/usr/bin/env bash
# `ms-dfkd distill` on one GPU: bash scripts/run_standalone_gpu.sh CONFIG [--section.key value ...]
# DEVICE_ID picks the GPU (default 0). Needs MindSpore's GPU wheel in the active environment (or .venv);
# check it once with: python -c "import mindspore; mindspore.set_device('GPU'); mindspore.run_check()"
set -euo pipefail
[[ $# -ge 1 && "$1" != -h && "$1" != --help ]] || { sed -n 2,4p "$0" | sed 's/^# //'; exit 2; }
CONFIG=$1; shift
cd "$(dirname "$0")/.."
[[ -f "$CONFIG" ]] || { echo "run_standalone_gpu.sh: error: config file not found: $CONFIG" >&2; exit 2; }
if [[ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
export GLOG_v=${GLOG_v:-3} DEVICE_ID=${DEVICE_ID:-0}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
exec python -m ms_dfkd.cli distill --config "$CONFIG" --device-target GPU "$@"
