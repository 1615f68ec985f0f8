#!/usr/bin/env bash
# The TPU VM's state, and on every worker which lctx runs are alive with their last log line.
#
#   tpu_scripts/status.sh --name=lctx-v4-32
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "$0")/_common.sh"

USAGE="status.sh [flags]
$COMMON_USAGE"

for arg in "$@"; do
  parse_common_flag "$arg" && continue
  case "$arg" in
    -h | --help) echo "$USAGE"; exit 0 ;;
    *) unknown_flag "$arg" ;;
  esac
done
check_common

tpu_vm describe "$TPU_NAME" --format='value(name.basename(),acceleratorType.basename(),state,health)'
on_workers all "for pid_file in $LOG_DIR/*.pid; do [ -e \"\$pid_file\" ] || { echo \"\$(hostname): no runs\"; break; }; run=\$(basename \"\$pid_file\" .pid); case \$(ps -o stat= -p \"\$(cat \"\$pid_file\")\" | cut -c1) in ''|Z) state=exited ;; *) state=running ;; esac; echo \"\$(hostname): \$run \$state; \$(tail -c 300 $LOG_DIR/\$run.log | tr '\\r' '\\n' | grep -v '^\$' | tail -n 1)\"; done"
