# Shared by the infra/*.sh scripts (sourced, never run): paths, the project's Python environment, the
# loopback-only Ray settings, token authentication, and starting/stopping a detached process by its own id.
#
# Every process these scripts start runs in its own session (setsid), so that stopping it means signalling
# exactly that session and nothing else on the machine. `ray stop` is never used: it kills every Ray process
# of the user, including other people's clusters and test sessions.

INFRA_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$INFRA_DIR/.." && pwd)"
# The environment whose `python` Ray jobs use: a job's `python` comes from the PATH of whoever ran `ray start`.
FEATUP_VENV="${FEATUP_VENV:-$REPO_DIR/.venv}"
# State (pidfiles, logs, Ray's temp dir). Short on purpose: Ray puts unix sockets under it (108-byte limit).
FEATUP_RAY_DIR="${FEATUP_RAY_DIR:-/tmp/featup-ray-$(id -u)}"
FEATUP_S3_DIR="${FEATUP_S3_DIR:-/tmp/featup-s3-$(id -u)}"
# Seconds to wait for a started process to answer, and for a stopped one to exit before SIGKILL.
FEATUP_START_TIMEOUT="${FEATUP_START_TIMEOUT:-90}"
FEATUP_STOP_TIMEOUT="${FEATUP_STOP_TIMEOUT:-20}"

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

info() {
    echo "$*" >&2
}

use_venv() {
    [ -x "$FEATUP_VENV/bin/python" ] || die "no Python environment at $FEATUP_VENV; run 'make env' or set FEATUP_VENV"
    export PATH="$FEATUP_VENV/bin:$PATH"
    export VIRTUAL_ENV="$FEATUP_VENV"
}

# The environment of every Ray node these scripts start.
# Loopback only (docs/design.md "Running"): with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment of every Ray
# process, `ray start` binds 127.0.0.1 and never advertises the machine's external address.
# Quick stop: on SIGTERM, `ray start --block` (Ray 2.60) first drains its node, waiting until every running task and
# actor has returned its lease, for up to RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (default 30 s). That is longer than
# stop_session waits, so a node stopped while a job ran was always SIGKILLed after FEATUP_STOP_TIMEOUT. The drain
# serves Ray Serve replicas, which nothing here runs: off (0) unless set; the node then stops its processes at once.
ray_loopback_env() {
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    export RAY_USAGE_STATS_ENABLED=0
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
}

# Token authentication (Ray >= 2.52): every node and every client (`ray job submit`) needs RAY_AUTH_MODE=token and
# the same token. The token comes from RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else Ray's default
# ~/.ray/auth_token, which a head generates here (with Ray's own `ray get-auth-token --generate`) when missing.
# ray_token_env [generate|require]
ray_token_env() {
    local missing="${1:-generate}"
    export RAY_AUTH_MODE=token
    if [ -n "${RAY_AUTH_TOKEN:-}" ]; then
        return 0
    fi
    if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        [ -s "$RAY_AUTH_TOKEN_PATH" ] \
            || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty; write a token there or unset it"
        return 0
    fi
    if [ ! -s "$HOME/.ray/auth_token" ]; then
        [ "$missing" = generate ] \
            || die "no Ray auth token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); use the head's"
        ray get-auth-token --generate >/dev/null 2>&1 || die "could not generate a Ray auth token in ~/.ray/auth_token"
        chmod 600 "$HOME/.ray/auth_token"
        info "generated a new Ray auth token in ~/.ray/auth_token"
    fi
}

# The lines a client shell needs to talk to the cluster's job API.
print_client_exports() {
    local dashboard_port="$1"
    echo "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:$dashboard_port"
    echo "export RAY_AUTH_MODE=token"
    if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
    fi
}

free_port() {
    python - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

# pid_alive PIDFILE -> prints the pid and returns 0 when the pidfile names a live session leader.
pid_alive() {
    local pidfile="$1" pid sid
    [ -f "$pidfile" ] || return 1
    pid="$(cat "$pidfile")"
    [ -n "$pid" ] || return 1
    sid="$(ps -o sid=,stat= -p "$pid" 2>/dev/null | awk '$2 !~ /^Z/ { print $1 }')"
    [ "$sid" = "$pid" ] || return 1
    echo "$pid"
}

# start_detached PIDFILE LOG CMD... : run CMD in a new session, detached from the terminal, recording its pid.
start_detached() {
    local pidfile="$1" log="$2"
    shift 2
    setsid "$@" </dev/null >"$log" 2>&1 &
    echo $! >"$pidfile"
}

# wait_ready PIDFILE LOG NAME DIED_MSG LATE_MSG CHECK... : run CHECK until it succeeds. If the started process
# dies first, show its log and die with DIED_MSG; past FEATUP_START_TIMEOUT, show the log, stop it, die with LATE_MSG.
wait_ready() {
    local pidfile="$1" log="$2" name="$3" died="$4" late="$5" pid deadline=$((SECONDS + FEATUP_START_TIMEOUT))
    shift 5
    pid="$(cat "$pidfile")"
    until "$@" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$log" >&2
            rm -f "$pidfile"
            die "$died"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$log" >&2
            stop_session "$pidfile" "$name"
            die "$late"
        fi
        sleep 0.5
    done
}

# session_pids SID -> the pids of every live process of session SID. Zombies are left out: they are dead already, and
# where PID 1 reaps orphans only now and then (containers, micro-VMs) they linger in `ps` for seconds.
session_pids() {
    ps -e -o pid=,sid=,stat= | awk -v sid="$1" '$2 == sid && $3 !~ /^Z/ { print $1 }'
}

# stop_session PIDFILE NAME : SIGTERM the session leader the pidfile names, wait up to FEATUP_STOP_TIMEOUT seconds,
# then SIGKILL what is left of it (and say so: a clean stop never needs it).
stop_session() {
    local pidfile="$1" name="$2" sid pids waited deadline
    if ! sid="$(pid_alive "$pidfile")"; then
        if [ -f "$pidfile" ]; then
            sid="$(cat "$pidfile")"
            pids="$(session_pids "$sid")"
            [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
            rm -f "$pidfile"
            info "$name: not running (removed a stale pidfile)"
        else
            info "$name: not running"
        fi
        return 0
    fi
    # SIGTERM to the session leader only: `ray start --block` then stops its children in order (raylet before
    # GCS); signalling them all at once leaves the GCS waiting out its drain timeout.
    # A Ray node started by these scripts exits within a few seconds (ray_loopback_env turns its drain off).
    kill -TERM "$sid" 2>/dev/null || true
    deadline=$((SECONDS + FEATUP_STOP_TIMEOUT))
    while [ -n "$(session_pids "$sid")" ] && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.2
    done
    pids="$(session_pids "$sid")"
    if [ -n "$pids" ]; then
        # Again until none is left: a process may fork between `ps` and `kill`, and SIGKILL takes effect a moment later.
        waited=0
        while [ -n "$pids" ] && [ "$waited" -lt 50 ]; do
            kill -KILL $pids 2>/dev/null || true
            sleep 0.1
            pids="$(session_pids "$sid")"
            waited=$((waited + 1))
        done
        [ -z "$pids" ] || die "$name: processes $pids of session $sid survived SIGKILL; check them with: ps -o pid,stat,cmd -p $(echo $pids | tr " " ,)"
        info "$name: killed what was left after ${FEATUP_STOP_TIMEOUT}s"
    fi
    rm -f "$pidfile"
    info "$name: stopped (session $sid)"
}
