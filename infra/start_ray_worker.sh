#!/usr/bin/env bash
# Start one more Ray node on this machine (127.0.0.1) and join it to the head of infra/start_ray_head.sh.
#
#   infra/start_ray_worker.sh --num-cpus 1                           # extra arguments go to `ray start`
#   FEATUP_WORKER_NAME=gpu2 infra/start_ray_worker.sh --num-gpus 1
#
# On a machine without GPUs, `--num-gpus 1` makes a stand-in "GPU node": Ray schedules the featurizer actors
# (num_gpus=1 each, pipeline/featurize/plan.py) only there, and they run on its CPU since CUDA is absent. That is how
# tests/test_multinode.py forces work onto both nodes. FEATUP_WORKER_RESOURCES adds custom resources.
# Each node keeps its own Ray temp dir ($FEATUP_RAY_DIR/node-NAME): nodes sharing the head's would share its
# runtime_resources/ folder, and one node's runtime-env agent then deletes the job working dir another node's
# processes run in (seen here: a job driver's cwd vanished a second after ray.init()).
# Settings (environment):
#   FEATUP_RAY_DIR               state dir shared with the head          (default /tmp/featup-ray-$UID)
#   FEATUP_RAY_PORT              the head's GCS port                     (6379)
#   FEATUP_WORKER_NAME           names the pidfile/log: worker-NAME.pid  (worker1)
#   FEATUP_WORKER_RESOURCES      JSON custom resources of this node      (none), e.g. '{"decode_node": 4}'
#   FEATUP_DASHBOARD_AGENT_PORT  this node's dashboard agent HTTP port   (a free port: the head uses 52365)
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH   the head's token              (default ~/.ray/auth_token)
# Stop it alone with `FEATUP_WORKER_NAME=NAME infra/stop_ray.sh --worker`, or everything with infra/stop_ray.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

FEATUP_RAY_PORT="${FEATUP_RAY_PORT:-6379}"
FEATUP_WORKER_NAME="${FEATUP_WORKER_NAME:-worker1}"
FEATUP_WORKER_RESOURCES="${FEATUP_WORKER_RESOURCES:-}"
resource_args=()
[ -z "$FEATUP_WORKER_RESOURCES" ] || resource_args=(--resources="$FEATUP_WORKER_RESOURCES")
[[ "$FEATUP_WORKER_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "FEATUP_WORKER_NAME must be letters, digits, '.', '_' or '-'"

use_venv
ray_loopback_env
ray_token_env require
FEATUP_DASHBOARD_AGENT_PORT="${FEATUP_DASHBOARD_AGENT_PORT:-$(free_port)}"

pidfile="$FEATUP_RAY_DIR/worker-$FEATUP_WORKER_NAME.pid"
log="$FEATUP_RAY_DIR/worker-$FEATUP_WORKER_NAME.log"
[ -d "$FEATUP_RAY_DIR" ] || die "no state dir $FEATUP_RAY_DIR; start the head first (infra/start_ray_head.sh)"
if pid="$(pid_alive "$pidfile")"; then
    die "node '$FEATUP_WORKER_NAME' is already running (pid $pid); pick another FEATUP_WORKER_NAME"
fi

start_detached "$pidfile" "$log" \
    python "$INFRA_DIR/ray_start_loopback.py" --block \
    --address="127.0.0.1:$FEATUP_RAY_PORT" \
    --node-ip-address=127.0.0.1 \
    --temp-dir="$FEATUP_RAY_DIR/node-$FEATUP_WORKER_NAME" \
    --dashboard-agent-listen-port="$FEATUP_DASHBOARD_AGENT_PORT" \
    "${resource_args[@]}" \
    --disable-usage-stats \
    "$@"
pid="$(cat "$pidfile")"
info "starting Ray node '$FEATUP_WORKER_NAME' (pid $pid, log $log) ..."

wait_ready "$pidfile" "$log" "ray node $FEATUP_WORKER_NAME" \
    "ray start exited; the log above says why (is the head running on 127.0.0.1:$FEATUP_RAY_PORT?)" \
    "the node did not join within ${FEATUP_START_TIMEOUT}s" \
    grep -q "Ray runtime started" "$log"
info "Ray node '$FEATUP_WORKER_NAME' joined 127.0.0.1:$FEATUP_RAY_PORT${FEATUP_WORKER_RESOURCES:+ with resources $FEATUP_WORKER_RESOURCES}"
echo "$pid"
