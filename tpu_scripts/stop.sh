#!/usr/bin/env bash
# Stops a run on every worker with SIGTERM: the hosts agree on a step, save a
# checkpoint and exit (rerun launch.sh to resume). --vm also stops the TPU VM.
#
#   tpu_scripts/stop.sh --name=lctx-v4-32 --run=extend_128k
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "$0")/_common.sh"

RUN=""
STOP_VM=0
USAGE="stop.sh [flags]
  --run=NAME   the run to stop (default: every run launched on the workers)
  --vm         then stop the TPU VM itself (single-host TPU VMs; delete pod slices)
$COMMON_USAGE"

for arg in "$@"; do
  parse_common_flag "$arg" && continue
  case "$arg" in
    --run=*) RUN=${arg#*=} ;;
    --vm) STOP_VM=1 ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
    *) unknown_flag "$arg" ;;
  esac
done
check_common
[[ -z $RUN || $RUN =~ ^[A-Za-z0-9._-]+$ ]] || die "--run='$RUN': expected letters, digits, '.', '_' or '-'"

pids="$LOG_DIR/*.pid"
[[ -n $RUN ]] && pids="$LOG_DIR/$RUN.pid"
on_workers all "for pid_file in $pids; do [ -e \"\$pid_file\" ] || continue; pid=\$(cat \"\$pid_file\"); if kill -TERM \"\$pid\" 2>/dev/null; then echo \"\$(hostname): sent SIGTERM to \$(basename \"\$pid_file\" .pid) (pid \$pid)\"; fi; done"
((STOP_VM)) && tpu_vm stop "$TPU_NAME"
exit 0
