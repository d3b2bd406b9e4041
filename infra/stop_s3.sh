#!/usr/bin/env bash
# Stop the moto S3 server that infra/start_s3.sh started (by its recorded pid; its data is discarded).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"
[ $# -eq 0 ] || die "takes no arguments"
stop_session "$FEATUP_S3_DIR/moto.pid" "moto S3 server"
