# Shared by the tpu_scripts (sourced, not run): settings and running gcloud.
#
# Every script takes --name, --zone, --project and --dry-run, or reads them from
# LCTX_TPU_NAME, LCTX_TPU_ZONE, LCTX_TPU_PROJECT (flags win). --dry-run prints the
# commands, one per line, shell-quoted, and runs none of them.
# shellcheck shell=bash

set -euo pipefail

TPU_NAME=${LCTX_TPU_NAME:-}
ZONE=${LCTX_TPU_ZONE:-us-central2-b}  # where v4 slices are offered
PROJECT=${LCTX_TPU_PROJECT:-}  # empty: gcloud's configured project
DRY_RUN=0
# Used by the scripts that source this file; '~' is for the workers' shells to expand.
# shellcheck disable=SC2034,SC2088
REMOTE_DIR='~/lctx'  # the checkout on every worker (expanded there, by the worker's shell)
# shellcheck disable=SC2034,SC2088
LOG_DIR='~/lctx_logs'  # one log and one pid file per run on every worker
# shellcheck disable=SC2034
COMMON_USAGE="  --name=NAME        TPU VM name (or LCTX_TPU_NAME)
  --zone=ZONE        zone (or LCTX_TPU_ZONE; default us-central2-b)
  --project=PROJECT  project (or LCTX_TPU_PROJECT; default: gcloud's)
  --dry-run          print the commands instead of running them"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# parse_common_flag ARG: takes a common flag; returns 1 when ARG is not one.
parse_common_flag() {
  case "$1" in
    --name=*) TPU_NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --dry-run) DRY_RUN=1 ;;
    *) return 1 ;;
  esac
}

unknown_flag() {
  die "unknown argument '$1'; allowed:
$USAGE"
}

# check_common: the TPU name is required and names are what gcloud accepts.
check_common() {
  [[ -n $TPU_NAME ]] || die "--name (or LCTX_TPU_NAME) is required: the TPU VM's name"
  [[ $TPU_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name='$TPU_NAME': expected lower-case letters, digits and '-', starting with a letter"
  [[ -n $ZONE ]] || die "--zone (or LCTX_TPU_ZONE) must not be empty"
}

# tpu_vm SUBCOMMAND ARGS...: one `gcloud compute tpus tpu-vm` command on this TPU VM.
tpu_vm() {
  local sub=$1
  shift
  local where=(--zone="$ZONE")
  [[ -n $PROJECT ]] && where+=(--project="$PROJECT")
  run gcloud compute tpus tpu-vm "$sub" "$@" "${where[@]}"
}

# on_workers WORKER COMMAND: runs a shell command on one worker (0, 1, ...) or all.
on_workers() {
  tpu_vm ssh "$TPU_NAME" --worker="$1" --command="$2"
}

# run ARGS...: prints (dry run) or echoes to stderr and runs one command.
run() {
  local line
  printf -v line '%q ' "$@"
  if ((DRY_RUN)); then
    echo "${line% }"
  else
    echo "+ ${line% }" >&2
    "$@"
  fi
}

# quote ARGS...: the arguments as one shell-quoted string, to embed in a remote command.
quote() {
  local line
  printf -v line '%q ' "$@"
  echo "${line% }"
}
