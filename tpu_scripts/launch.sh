#!/usr/bin/env bash
# Starts `python -m lctx.train` on every worker at once, in the background, one log
# per worker (~/lctx_logs/RUN.log on each). The workers find each other by
# themselves (jax.distributed on Cloud TPU VMs).
#
#   tpu_scripts/launch.sh --name=lctx-v4-32 --config=configs/extend_128k.py -- \
#       --config.workdir=gs://BUCKET/runs/extend_128k
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "$0")/_common.sh"

CONFIG=""
RUN=""
ENVS=()
TRAIN_ARGS=()
USAGE="launch.sh [flags] --config=configs/NAME.py [-- lctx.train flags]
  --config=PATH    recipe, relative to the checkout (required)
  --run=NAME       log / pid name on the workers (default: the recipe's file name)
  --env=KEY=VALUE  environment for the run (repeatable), e.g. --env=LCTX_HEARTBEAT_TIMEOUT=60
$COMMON_USAGE
  after --: passed to lctx.train, e.g. --config.workdir=gs://BUCKET/runs/x"

while (($#)); do
  arg=$1
  shift
  parse_common_flag "$arg" && continue
  case "$arg" in
    --config=*) CONFIG=${arg#*=} ;;
    --run=*) RUN=${arg#*=} ;;
    --env=*) ENVS+=("${arg#*=}") ;;
    --) TRAIN_ARGS=("$@"); break ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
    *) unknown_flag "$arg" ;;
  esac
done
check_common
[[ -n $CONFIG ]] || die "--config=configs/NAME.py is required"
[[ $CONFIG == *.py ]] || die "--config='$CONFIG': expected a recipe file, configs/NAME.py"
RUN=${RUN:-$(basename "$CONFIG" .py)}
[[ $RUN =~ ^[A-Za-z0-9._-]+$ ]] || die "--run='$RUN': expected letters, digits, '.', '_' or '-'"
for kv in "${ENVS[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env='$kv': expected KEY=VALUE"
done

# setsid + nohup + no stdin: the run outlives the ssh session; $! is its pid.
envs=""
((${#ENVS[@]})) && envs="env $(quote "${ENVS[@]}") "
train="${envs}python3 -m lctx.train $(quote "--config=$CONFIG" "${TRAIN_ARGS[@]}")"
log="$LOG_DIR/$RUN.log"
on_workers all "mkdir -p $LOG_DIR && cd $REMOTE_DIR && { setsid nohup $train > $log 2>&1 < /dev/null & echo \$! > $LOG_DIR/$RUN.pid; } && echo \"\$(hostname): started $RUN (pid \$(cat $LOG_DIR/$RUN.pid)), log $log\""
