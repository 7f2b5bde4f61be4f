#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up if needed, then run the suite.
# By default it leaves out the tests marked `real` (the real pretrained weights: SmolLM2, MiniLM, the
# PyTorch parity on them) and `slow` (2-process msrun jobs), which together take about two fifths of the
# suite's time on a 2-core CPU. MS_DFKD_ALL_TESTS=1 runs them too; .ci/run sets it. A `-m` of your own
# replaces the default selection (pytest keeps the last -m).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export GLOG_v=${GLOG_v:-3}   # MindSpore: errors only
if [ "${MS_DFKD_ALL_TESTS:-0}" != 1 ]; then
  set -- -m "not real and not slow" "$@"   # before the caller's arguments, so that their -m wins
  echo "[test] the real-weight and msrun tests are left out; MS_DFKD_ALL_TESTS=1 runs them too" >&2
fi
# --durations: the suite is budgeted at 20 min on a 2-core CPU; CI logs show which tests spend it
if [ "${MS_DFKD_ALL_TESTS:-0}" != 1 ] || [ $# -gt 0 ]; then
  exec python -m pytest -q --durations=15 "$@"
fi
# Everything: the real-weight modules each in a process of its own, after the rest. One process that had
# loaded SmolLM2, Qwen2.5-0.5B, MiniLM and the torch parity models held 21 GB at its peak, on a 24 GB machine.
status=0
python -m pytest -q --durations=15 -m "not real" || status=$?
for f in $(grep -l "pytest.mark.real" tests/test_*.py); do
  echo "[test] real-weight tests of $f"
  python -m pytest -q --durations=5 -m real "$f" || { c=$?; [ "$c" = 5 ] || status=$c; }  # 5: none selected
done
exit $status
