#!/usr/bin/env bash
# Creates a TPU VM (a single host or a pod slice: every host is one worker).
#
#   tpu_scripts/create.sh --name=lctx-v4-32 --accelerator-type=v4-32 --spot
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "$0")/_common.sh"

ACCELERATOR=${LCTX_TPU_TYPE:-v4-32}
VERSION=${LCTX_TPU_VERSION:-tpu-ubuntu2204-base}  # the runtime image for v4 / v5p
CAPACITY=${LCTX_TPU_CAPACITY:-on-demand}
USAGE="create.sh [flags]
  --accelerator-type=TYPE  e.g. v4-8, v4-32, v5litepod-16 (or LCTX_TPU_TYPE; default v4-32)
  --version=RUNTIME        TPU software version (or LCTX_TPU_VERSION; default tpu-ubuntu2204-base,
                           v5e / v6e use v2-alpha-tpuv5-lite / v2-alpha-tpuv6e)
  --spot | --preemptible   cheaper capacity that can be taken back (SIGTERM first; lctx saves)
$COMMON_USAGE"

for arg in "$@"; do
  parse_common_flag "$arg" && continue
  case "$arg" in
    --accelerator-type=*) ACCELERATOR=${arg#*=} ;;
    --version=*) VERSION=${arg#*=} ;;
    --spot) CAPACITY=spot ;;
    --preemptible) CAPACITY=preemptible ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
    *) unknown_flag "$arg" ;;
  esac
done
check_common
[[ $ACCELERATOR =~ ^v[0-9]+[a-z]*(-[a-z]+)?-[0-9]+$ ]] ||
  die "--accelerator-type='$ACCELERATOR': expected a TPU type such as v4-32 or v5litepod-16"
[[ -n $VERSION ]] || die "--version must not be empty (e.g. tpu-ubuntu2204-base)"
case "$CAPACITY" in
  on-demand) capacity=() ;;
  spot | preemptible) capacity=(--"$CAPACITY") ;;
  *) die "LCTX_TPU_CAPACITY='$CAPACITY': expected on-demand, spot or preemptible" ;;
esac

tpu_vm create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" "${capacity[@]}"
