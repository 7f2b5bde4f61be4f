#!/usr/bin/env bash
# Data-parallel `ms-dfkd distill` on one or many nodes, started by MindSpore's own launcher (msrun).
# Run `bash scripts/run_distributed.sh --help` for the options.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: bash scripts/run_distributed.sh [options] CONFIG [--section.key value ...]

Starts `ms-dfkd distill --config CONFIG [overrides]` as a data-parallel job with msrun:
one process per device, gradients averaged across all ranks, rank 0 writes the checkpoint,
metrics and progress bar, every rank writes RUN_DIR/generated.rank<r>.jsonl.
Run it on every node with the same CONFIG and options except --node-rank.

options (each also read from the environment variable in brackets):
  --nproc-per-node N   processes (devices) on this node                    [NPROC_PER_NODE, 2]
  --nnodes N           number of nodes                                     [NNODES, 1]
  --node-rank R        rank of this node, 0 .. nnodes-1                    [NODE_RANK, 0]
  --master-addr A      address of node 0 (it runs msrun's scheduler)       [MASTER_ADDR, 127.0.0.1]
  --master-port P      free TCP port on node 0, 1024-65535                 [MASTER_PORT, 8118]
  --rank-table FILE    Ascend rank-table JSON (optional, legacy HCCL set-up) [RANK_TABLE_FILE]
  --device-target T    CPU | GPU | Ascend (default: what MindSpore targets) [DEVICE_TARGET]
  --log-dir DIR        logs: worker_<r>.log per rank, scheduler.log, msrun.log [LOG_DIR, RUN_DIR/msrun_log]
  --timeout S          seconds to wait for all ranks to join the cluster   [CLUSTER_TIMEOUT, 600]
  --bind-core          pin each rank to its own CPU cores (msrun --bind_core): helps CPU runs [BIND_CORE=1]
  --dump-params        every rank also writes RUN_DIR/params.rank<r>.safetensors at the end
  -h, --help           this text

Relative paths (CONFIG, overrides, --log-dir) are taken from the repository root, as in the
other scripts. A run resumes from RUN_DIR/checkpoint.safetensors, also with another number of ranks.
The console shows rank 0's log; exit status 0 only if every rank finished.
EOF
}

die() { echo "run_distributed.sh: error: $*" >&2; exit 2; }

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

NPROC_PER_NODE=${NPROC_PER_NODE:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-8118}
RANK_TABLE_FILE=${RANK_TABLE_FILE:-}
DEVICE_TARGET=${DEVICE_TARGET:-}
LOG_DIR=${LOG_DIR:-}
CLUSTER_TIMEOUT=${CLUSTER_TIMEOUT:-600}
BIND_CORE=${BIND_CORE:-}
DUMP_PARAMS=""

need_value() { [[ $# -ge 2 && "$2" != --* ]] || die "option $1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nproc-per-node) need_value "$@"; NPROC_PER_NODE=$2; shift 2 ;;
    --nnodes) need_value "$@"; NNODES=$2; shift 2 ;;
    --node-rank) need_value "$@"; NODE_RANK=$2; shift 2 ;;
    --master-addr) need_value "$@"; MASTER_ADDR=$2; shift 2 ;;
    --master-port) need_value "$@"; MASTER_PORT=$2; shift 2 ;;
    --rank-table) need_value "$@"; RANK_TABLE_FILE=$2; shift 2 ;;
    --device-target) need_value "$@"; DEVICE_TARGET=$2; shift 2 ;;
    --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
    --timeout) need_value "$@"; CLUSTER_TIMEOUT=$2; shift 2 ;;
    --bind-core) BIND_CORE=1; shift ;;
    --dump-params) DUMP_PARAMS="--dump-params"; shift ;;
    --) shift; break ;;
    --*.*) die "config override $1 given before CONFIG: put CONFIG first, then the overrides" ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; die "missing CONFIG"; }
CONFIG=$1; shift

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

# ---- arguments
for pair in "nproc-per-node:$NPROC_PER_NODE" "nnodes:$NNODES" "node-rank:$NODE_RANK" \
            "master-port:$MASTER_PORT" "timeout:$CLUSTER_TIMEOUT"; do
  is_int "${pair#*:}" || die "--${pair%%:*} must be a non-negative integer, got '${pair#*:}'"
done
(( NPROC_PER_NODE >= 1 )) || die "--nproc-per-node must be >= 1, got $NPROC_PER_NODE"
(( NNODES >= 1 )) || die "--nnodes must be >= 1, got $NNODES"
(( NODE_RANK < NNODES )) || die "--node-rank $NODE_RANK must be below --nnodes $NNODES"
(( MASTER_PORT >= 1024 && MASTER_PORT <= 65535 )) || die "--master-port must be in 1024-65535, got $MASTER_PORT"
case "$DEVICE_TARGET" in ""|CPU|GPU|Ascend) ;; *) die "--device-target must be CPU, GPU or Ascend, got '$DEVICE_TARGET'" ;; esac
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG (relative paths start at $ROOT)"
if [[ -n "$RANK_TABLE_FILE" ]]; then
  [[ -f "$RANK_TABLE_FILE" ]] || die "rank-table file not found: $RANK_TABLE_FILE"
  RANK_TABLE_FILE=$(cd "$(dirname "$RANK_TABLE_FILE")" && pwd)/$(basename "$RANK_TABLE_FILE")
fi

# ---- environment: the active one (e.g. a cluster's Ascend MindSpore), else the repo's .venv
if [[ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && -f .venv/bin/activate ]]; then . .venv/bin/activate; fi
command -v msrun >/dev/null 2>&1 || die "msrun not found on PATH: it comes with MindSpore >= 2.3; \
activate the environment that has MindSpore (bash scripts/setup.sh makes .venv)"
command -v python >/dev/null 2>&1 || die "python not found on PATH (msrun starts each rank with 'python')"
export GLOG_v=${GLOG_v:-3}   # MindSpore's C++ log: errors only
# CPU collectives give up after about 30 s of waiting for a peer (measured), which a rank compiling its
# graph on a busy machine, or rank 0 evaluating at the end of a round, easily exceeds
export MS_CPU_COMM_OP_TIMEOUT=${MS_CPU_COMM_OP_TIMEOUT:-1800}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT"

# the config and overrides are checked here, before any process starts; this also gives RUN_DIR
RUN_DIR=$(python - "$CONFIG" "$@" <<'EOF'
import sys
from ms_dfkd.config import ConfigError, load_config, parse_overrides
try:
    cfg = load_config(sys.argv[1], parse_overrides(sys.argv[2:]))
except ConfigError as e:
    sys.exit(f"run_distributed.sh: error: {e}")
print(cfg.fmt(cfg.run.out_dir))
EOF
) || exit 2
LOG_DIR=${LOG_DIR:-$RUN_DIR/msrun_log}

# msrun's scheduler listens on MASTER_PORT of node 0: a port already taken makes every rank wait
# for a cluster that never forms, so check it here where we can (on node 0 only).
if (( NODE_RANK == 0 )); then
  python - "$MASTER_ADDR" "$MASTER_PORT" <<'EOF' || exit 2
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
try:
    s.bind(("" if addr in ("127.0.0.1", "localhost") else addr, port))
except OSError as e:
    sys.exit(f"run_distributed.sh: error: master port {port} on {addr} is not free ({e.strerror}); "
             f"another job uses it: choose another --master-port")
finally:
    s.close()
EOF
fi

WORLD=$(( NPROC_PER_NODE * NNODES ))
MSRUN_ARGS=(--worker_num="$WORLD" --local_worker_num="$NPROC_PER_NODE" --node_rank="$NODE_RANK"
            --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --log_dir="$LOG_DIR"
            --cluster_time_out="$CLUSTER_TIMEOUT" --join=True --tail_worker_log=0)
[[ -n "$RANK_TABLE_FILE" ]] && MSRUN_ARGS+=(--rank_table_file="$RANK_TABLE_FILE")
[[ -n "$BIND_CORE" && "$BIND_CORE" != 0 ]] && MSRUN_ARGS+=(--bind_core=True)
DISTILL_ARGS=(distill --config "$CONFIG")
[[ -n "$DEVICE_TARGET" ]] && DISTILL_ARGS+=(--device-target "$DEVICE_TARGET")
[[ -n "$DUMP_PARAMS" ]] && DISTILL_ARGS+=("$DUMP_PARAMS")

echo "run_distributed.sh: $WORLD ranks ($NNODES node(s) x $NPROC_PER_NODE), node $NODE_RANK, master" \
     "$MASTER_ADDR:$MASTER_PORT, run folder $RUN_DIR, logs $LOG_DIR/worker_<rank>.log"
# msrun stops every rank on Ctrl-C (and then exits 0): remember it to report it
interrupted=0
trap 'interrupted=1' INT
mkdir -p "$LOG_DIR"
# msrun's own messages (which worker died) also go to msrun.log; tee ignores Ctrl-C so that msrun can
# still report while it stops the ranks
{ msrun "${MSRUN_ARGS[@]}" python -m ms_dfkd.cli "${DISTILL_ARGS[@]}" "$@" 2>&1 1>&3 3>&- |
  (trap '' INT; exec tee "$LOG_DIR/msrun.log" >&2); rc=${PIPESTATUS[0]}; } 3>&1
trap - INT
if (( interrupted )); then
  echo "run_distributed.sh: interrupted; every rank was stopped. Rerun the same command to resume from" \
       "the last checkpoint in $RUN_DIR" >&2
  exit 130
fi
if (( rc != 0 )); then
  echo "run_distributed.sh: error: the distributed job failed (msrun exit $rc); every rank was stopped." >&2
  # which rank failed first: msrun names its pid, each rank logged "rank R of W (pid P)"
  grep -o "Worker process [0-9]* exit with exception. Error code: -\?[0-9]*" "$LOG_DIR/msrun.log" 2>/dev/null |
  while read -r _ _ pid _ _ _ _ _ code; do
    f=$(grep -l "of $WORLD (pid $pid)" "$LOG_DIR"/worker_*.log 2>/dev/null | head -n 1)
    who=${f:+rank $(basename "$f" .log | sed 's/worker_//')}
    if (( code < 0 )); then how="was killed by signal $(( -code ))"; else how="exited with code $code"; fi
    echo "  ${who:-a rank} (pid $pid) $how" >&2
  done
  for f in "$LOG_DIR"/worker_*.log; do
    [[ -f "$f" ]] || continue
    err=$(grep -E "^[A-Za-z_.]*(Error|Exception|Interrupt)\b|^ms-dfkd .*: error:" "$f" | tail -n 1)
    [[ -n "$err" ]] && echo "  $(basename "$f"): $err" >&2
  done
  echo "  per-rank logs: $LOG_DIR; the last checkpoint (if any) is in $RUN_DIR and resumes with the same command" >&2
  exit 1
fi
echo "run_distributed.sh: done; run folder $RUN_DIR (rank 0 wrote the checkpoint and metrics)"
