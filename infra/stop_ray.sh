#!/usr/bin/env bash
# Stop the Ray processes that infra/start_ray_head.sh / infra/start_ray_worker.sh started, and nothing else.
#
#   infra/stop_ray.sh                                   # every node in FEATUP_RAY_DIR: workers first, then the head
#   FEATUP_WORKER_NAME=gpu2 infra/stop_ray.sh --worker  # one worker node only
#
# Each node runs in its own session; this sends SIGTERM to that session's leader (`ray start --block`, which stops
# its raylet, GCS, dashboard and workers in order), waits up to FEATUP_STOP_TIMEOUT seconds (default 20), then SIGKILLs
# what is left and says so. Nodes started by these scripts have Ray's SIGTERM drain turned off (_lib.sh,
# ray_loopback_env), so they stop within a few seconds even while a job runs; a running job fails (its driver is
# stopped with the node). It never runs `ray stop`, which would kill every Ray process of the user on this machine
# (other clusters, test sessions) and has no option to pick one cluster.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

if [ "${1:-}" = "--worker" ]; then
    name="${FEATUP_WORKER_NAME:-worker1}"
    stop_session "$FEATUP_RAY_DIR/worker-$name.pid" "ray node $name"
    exit 0
fi
[ $# -eq 0 ] || die "unknown argument '$1' (usage: infra/stop_ray.sh [--worker])"

shopt -s nullglob
for pidfile in "$FEATUP_RAY_DIR"/worker-*.pid; do
    name="$(basename "$pidfile" .pid)"
    stop_session "$pidfile" "ray node ${name#worker-}"
done
stop_session "$FEATUP_RAY_DIR/head.pid" "ray head"
