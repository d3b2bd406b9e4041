#!/usr/bin/env bash
# Start a local S3-compatible server (moto) on 127.0.0.1 for by-hand use; tests start their own (tests/conftest.py).
#
#   eval "$(infra/start_s3.sh my-bucket)"     # optional arguments: buckets to create
#   infra/start_ray_head.sh ...               # start Ray AFTER the exports so its workers inherit the endpoint
#   infra/stop_s3.sh
#
# stdout: the `export` lines for s3fs/boto3 (AWS_ENDPOINT_URL and moto's fake test credentials); the rest on stderr.
# The fake credentials matter: without any, botocore asks the EC2 metadata address for credentials, which is
# traffic off this machine; AWS_EC2_METADATA_DISABLED=true makes sure it never does.
# Settings (environment): FEATUP_S3_PORT (default 5000), FEATUP_S3_DIR (pidfile + log; /tmp/featup-s3-$UID),
# FEATUP_VENV. Data lives in the server's memory only and is gone when it stops.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

FEATUP_S3_PORT="${FEATUP_S3_PORT:-5000}"
endpoint="http://127.0.0.1:$FEATUP_S3_PORT"
use_venv
mkdir -p "$FEATUP_S3_DIR"
chmod 700 "$FEATUP_S3_DIR"
pidfile="$FEATUP_S3_DIR/moto.pid"
log="$FEATUP_S3_DIR/moto.log"
if pid="$(pid_alive "$pidfile")"; then
    die "an S3 server started by this script is already running (pid $pid); stop it with infra/stop_s3.sh"
fi

start_detached "$pidfile" "$log" moto_server -H 127.0.0.1 -p "$FEATUP_S3_PORT"
pid="$(cat "$pidfile")"
info "starting moto S3 server (pid $pid, log $log) ..."

export AWS_ENDPOINT_URL="$endpoint" AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
wait_ready "$pidfile" "$log" "moto" \
    "moto_server exited; the log above says why (port $FEATUP_S3_PORT in use? set FEATUP_S3_PORT)" \
    "the S3 server on $endpoint did not answer within ${FEATUP_START_TIMEOUT}s" \
    curl -fsS -o /dev/null --max-time 2 --noproxy 127.0.0.1 "$endpoint/"

if [ $# -gt 0 ]; then
    python - "$@" <<'PY'
import sys
import boto3

s3 = boto3.client("s3")
for bucket in sys.argv[1:]:
    s3.create_bucket(Bucket=bucket)
    print(f"created bucket s3://{bucket}", file=sys.stderr)
PY
fi

info "S3 server ready on $endpoint (moto, in memory); stop with infra/stop_s3.sh"
echo "export AWS_ENDPOINT_URL=$endpoint"
echo "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1"
echo "export AWS_EC2_METADATA_DISABLED=true"
