#!/usr/bin/env bash
# Prints (or follows) a run's log on one worker or all of them.
#
#   tpu_scripts/logs.sh --name=lctx-v4-32 --run=extend_128k --worker=0 --follow
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "$0")/_common.sh"

RUN=""
WORKER=0
LINES=50
FOLLOW=0
USAGE="logs.sh [flags]
  --run=NAME     the run (launch.sh --run; default: every run's log)
  --worker=N     worker index or all (default 0: process 0 logs the metrics and progress)
  --lines=N      last N lines (default 50)
  --follow       keep printing as the log grows (Ctrl-C to stop; the run goes on)
$COMMON_USAGE"

for arg in "$@"; do
  parse_common_flag "$arg" && continue
  case "$arg" in
    --run=*) RUN=${arg#*=} ;;
    --worker=*) WORKER=${arg#*=} ;;
    --lines=*) LINES=${arg#*=} ;;
    --follow) FOLLOW=1 ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
    *) unknown_flag "$arg" ;;
  esac
done
check_common
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker='$WORKER': expected a worker index or all"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines='$LINES': expected a number of lines"
[[ -z $RUN || $RUN =~ ^[A-Za-z0-9._-]+$ ]] || die "--run='$RUN': expected letters, digits, '.', '_' or '-'"

files="$LOG_DIR/*.log"
[[ -n $RUN ]] && files="$LOG_DIR/$RUN.log"
follow=""
((FOLLOW)) && follow=" -F"
on_workers "$WORKER" "tail -n $LINES$follow $files"
