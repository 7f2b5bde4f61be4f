#!/usr/bin/env bash
# The README's first command: set up (pinned venv + offline assets), fine-tune the Rotten Tomatoes
# teacher (cached after the first run), run a short DFKD-T3 distillation with SmolLM2 -> MiniLM,
# then print teacher and student test accuracy and generated texts per label.
# Extra arguments are config overrides, e.g. --run.rounds 2 --run.out_dir runs/try2
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export GLOG_v=${GLOG_v:-3}
CFG=${CFG:-configs/sentiment_offline.yaml}
start=$(date +%s)
ms-dfkd train-teacher --config "$CFG" "$@"
ms-dfkd distill --config "$CFG" "$@"
echo "quickstart wall time: $(( $(date +%s) - start )) s (after set-up)"
