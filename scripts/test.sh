#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up if needed, then run the suite.
# By default it leaves out the tests marked `real` (the real pretrained weights: SmolLM2, MiniLM, the
# PyTorch parity on them) and `slow` (2-process msrun jobs), which together take about two fifths of the
# suite's time on a 2-core CPU. MS_DFKD_ALL_TESTS=1 runs them too; .ci/run sets it. A `-m` of your own
# replaces the default selection (pytest keeps the last -m); with arguments of your own the suite runs in
# one process, as pytest does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export GLOG_v=${GLOG_v:-3}   # MindSpore: errors only
# Two worker processes (pytest-xdist), each test file in one of them: most of a test's time is MindSpore's
# graph compilation, which runs on one core, so a single process left the second core idle (110% CPU).
# MS_DFKD_TEST_WORKERS=0 runs everything in this process.
workers=${MS_DFKD_TEST_WORKERS:-2}
parallel=()
[ "$workers" -gt 0 ] && parallel=(-n "$workers" --dist loadfile)
if [ "${MS_DFKD_ALL_TESTS:-0}" != 1 ]; then
  # before the caller's arguments, so that their -m wins
  [ $# -gt 0 ] || set -- "${parallel[@]}"
  set -- -m "not real and not slow" "$@"
  echo "[test] the real-weight and msrun tests are left out; MS_DFKD_ALL_TESTS=1 runs them too" >&2
  exec python -m pytest -q --durations=15 "$@"   # --durations: CI logs show which tests spend the time
fi
if [ $# -gt 0 ]; then
  exec python -m pytest -q --durations=15 "$@"
fi
# Everything: the real-weight modules each in a process of its own, after the rest, in two lanes. One process
# that had loaded SmolLM2, Qwen2.5-0.5B, MiniLM and the torch parity models held 21 GB at its peak, on a
# 24 GB machine; one file at a time a lane, two lanes hold at most two files' models.
status=0
python -m pytest -q --durations=15 "${parallel[@]}" -m "not real" || status=$?
real_files=($(grep -l "pytest.mark.real" tests/test_*.py))
lanes=$(( workers > 1 ? 2 : 1 ))
results=$(mktemp -d)
run_lane() {  # run_lane K: the real-weight files K, K+lanes, K+2*lanes, ... one process each
  local k=$1 s=0 i f
  for ((i = k; i < ${#real_files[@]}; i += lanes)); do
    f=${real_files[$i]}
    echo "[test] real-weight tests of $f"
    python -m pytest -q --durations=5 -m real "$f" || { c=$?; [ "$c" = 5 ] || s=$c; }  # 5: none selected
  done
  echo "$s" > "$results/lane$k"
}
for ((k = 0; k < lanes; k++)); do
  run_lane "$k" 2>&1 | sed -u "s/^/[real lane $((k + 1))] /" &
done
wait
for ((k = 0; k < lanes; k++)); do
  s=$(cat "$results/lane$k" 2>/dev/null || echo 1)
  [ "$s" = 0 ] || status=$s
done
rm -rf "$results"
exit $status
