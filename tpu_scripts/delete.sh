#!/usr/bin/env bash
# Deletes the TPU VM (all workers and their disks; checkpoints on gs:// stay).
#
#   tpu_scripts/delete.sh --name=lctx-v4-32 --yes
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "$0")/_common.sh"

YES=0
USAGE="delete.sh [flags]
  --yes   do not ask for confirmation
$COMMON_USAGE"

for arg in "$@"; do
  parse_common_flag "$arg" && continue
  case "$arg" in
    --yes) YES=1 ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
    *) unknown_flag "$arg" ;;
  esac
done
check_common

quiet=()
((YES)) && quiet=(--quiet)
tpu_vm delete "$TPU_NAME" "${quiet[@]}"
