#!/usr/bin/env bash
# Installs lctx on every worker of a TPU VM, into ~/lctx, with the `tpu` extra.
#
#   tpu_scripts/setup.sh --name=lctx-v4-32                 # copies this checkout
#   tpu_scripts/setup.sh --name=lctx-v4-32 --repo=https://github.com/you/lctx --ref=main
# shellcheck source-path=SCRIPTDIR source=_common.sh
source "$(dirname "$0")/_common.sh"

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPO=""
REF=""
EXTRAS=tpu
USAGE="setup.sh [flags]
  --repo=URL       clone this git repository on the workers (default: copy this checkout)
  --ref=REF        branch, tag or commit to check out with --repo
  --extras=LIST    pip extras to install (default tpu; e.g. tpu,hf)
$COMMON_USAGE"

for arg in "$@"; do
  parse_common_flag "$arg" && continue
  case "$arg" in
    --repo=*) REPO=${arg#*=} ;;
    --ref=*) REF=${arg#*=} ;;
    --extras=*) EXTRAS=${arg#*=} ;;
    -h | --help) echo "$USAGE"; exit 0 ;;
    *) unknown_flag "$arg" ;;
  esac
done
check_common
[[ -z $REF || -n $REPO ]] || die "--ref='$REF' needs --repo (a copied checkout has no refs to pick)"
[[ $EXTRAS =~ ^[a-z0-9,_-]+$ ]] || die "--extras='$EXTRAS': expected names like tpu or tpu,hf"

install="cd $REMOTE_DIR && python3 -m pip install --quiet --upgrade pip && python3 -m pip install --quiet -e $(quote ".[$EXTRAS]")"
if [[ -n $REPO ]]; then
  checkout=""
  [[ -n $REF ]] && checkout=" && git -C $REMOTE_DIR checkout --quiet $(quote "$REF")"
  on_workers all "rm -rf $REMOTE_DIR && git clone --quiet $(quote "$REPO") $REMOTE_DIR$checkout && $install"
else
  # The working tree as it is (uncommitted edits included), without caches and runs.
  tarball="${TMPDIR:-/tmp}/lctx-$TPU_NAME.tar.gz"
  run tar -czf "$tarball" -C "$ROOT" --exclude=.git --exclude=.venv --exclude=runs \
    --exclude=__pycache__ --exclude='*.egg-info' .
  tpu_vm scp "$tarball" "$TPU_NAME:lctx.tar.gz" --worker=all
  on_workers all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/lctx.tar.gz -C $REMOTE_DIR && $install"
fi
