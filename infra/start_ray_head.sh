#!/usr/bin/env bash
# Start a local Ray head on 127.0.0.1 only, with the dashboard/job API, for `ray job submit` by hand.
#
#   eval "$(infra/start_ray_head.sh --num-cpus 2)"      # extra arguments go to `ray start`
#   ray job submit --working-dir . -- python jobs/featurize_coco.py --demo
#   infra/stop_ray.sh
#
# stdout: the `export` lines a client shell needs (job API address, token auth); everything else goes to stderr.
# Settings (environment):
#   FEATUP_RAY_DIR               state: pidfile, log, Ray temp dir      (default /tmp/featup-ray-$UID)
#   FEATUP_RAY_PORT              GCS port                               (6379)
#   FEATUP_DASHBOARD_PORT        dashboard + job API port               (8265)
#   FEATUP_RAY_CLIENT_PORT       Ray client server port                 (10001)
#   FEATUP_DASHBOARD_AGENT_PORT  this node's dashboard agent HTTP port  (52365)
#   FEATUP_VENV                  Python env that jobs run in            (<repo>/.venv)
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH   the cluster token            (default ~/.ray/auth_token, made if missing)
# Security: every Ray port binds 127.0.0.1 (node IP, dashboard host and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) and
# token authentication is on, so neither other machines nor other local users without the token can submit code.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

FEATUP_RAY_PORT="${FEATUP_RAY_PORT:-6379}"
FEATUP_DASHBOARD_PORT="${FEATUP_DASHBOARD_PORT:-8265}"
FEATUP_RAY_CLIENT_PORT="${FEATUP_RAY_CLIENT_PORT:-10001}"
FEATUP_DASHBOARD_AGENT_PORT="${FEATUP_DASHBOARD_AGENT_PORT:-52365}"

use_venv
ray_loopback_env
ray_token_env

# Ray's unix sockets live in $FEATUP_RAY_DIR/ray/session_<date>_<pid>/sockets/ (~66 more bytes; limit 107).
[ "${#FEATUP_RAY_DIR}" -le 40 ] || die "FEATUP_RAY_DIR is too long for Ray's unix sockets (max 40 chars): $FEATUP_RAY_DIR"
mkdir -p "$FEATUP_RAY_DIR"
chmod 700 "$FEATUP_RAY_DIR"
pidfile="$FEATUP_RAY_DIR/head.pid"
log="$FEATUP_RAY_DIR/head.log"
if pid="$(pid_alive "$pidfile")"; then
    die "a head started by this script is already running (pid $pid, state $FEATUP_RAY_DIR); stop it with infra/stop_ray.sh"
fi

start_detached "$pidfile" "$log" \
    ray start --head --block \
    --node-ip-address=127.0.0.1 \
    --port="$FEATUP_RAY_PORT" \
    --include-dashboard=true \
    --dashboard-host=127.0.0.1 \
    --dashboard-port="$FEATUP_DASHBOARD_PORT" \
    --ray-client-server-port="$FEATUP_RAY_CLIENT_PORT" \
    --dashboard-agent-listen-port="$FEATUP_DASHBOARD_AGENT_PORT" \
    --temp-dir="$FEATUP_RAY_DIR/ray" \
    --disable-usage-stats \
    "$@"
pid="$(cat "$pidfile")"
info "starting Ray head (pid $pid, log $log) ..."

# Ready when the job API answers an authenticated request; fail fast if `ray start` died.
job_api_answers() {
    FEATUP_URL="http://127.0.0.1:$FEATUP_DASHBOARD_PORT/api/version" python - <<'EOF'
import os, pathlib, urllib.request
token = os.environ.get("RAY_AUTH_TOKEN") or pathlib.Path(
    os.environ.get("RAY_AUTH_TOKEN_PATH") or pathlib.Path.home() / ".ray" / "auth_token").read_text().strip()
req = urllib.request.Request(os.environ["FEATUP_URL"], headers={"Authorization": f"Bearer {token}"})
urllib.request.urlopen(req, timeout=2).read()
EOF
}
wait_ready "$pidfile" "$log" "ray head" \
    "ray start exited; the log above says why (a port in use? set FEATUP_*_PORT)" \
    "the job API on 127.0.0.1:$FEATUP_DASHBOARD_PORT did not answer within ${FEATUP_START_TIMEOUT}s" \
    job_api_answers

info "Ray head ready: GCS 127.0.0.1:$FEATUP_RAY_PORT, dashboard/job API http://127.0.0.1:$FEATUP_DASHBOARD_PORT (token auth on)"
info "add a node: FEATUP_RAY_PORT=$FEATUP_RAY_PORT infra/start_ray_worker.sh; stop all: infra/stop_ray.sh"
print_client_exports "$FEATUP_DASHBOARD_PORT"
