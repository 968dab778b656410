#!/usr/bin/env bash
# Launch a fine-tuning run with `accelerate launch` on this node.
#
#   ./launch.sh [--config accelerate_configs/X.yaml] [--dry-run] <preset> [--flags for finetune/train.py]
#
# Picks accelerate_configs/single_gpu.yaml when one GPU is visible, cpu.yaml when none, and passes every other
# argument through to finetune/train.py. --dry-run prints the exact command instead of running it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
config=""
dry_run=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --config=*) config="${1#--config=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

if [ -z "$config" ]; then
  gpus=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | wc -l || echo 0)
  if [ "$gpus" -ge 1 ]; then config="$here/accelerate_configs/single_gpu.yaml"; else config="$here/accelerate_configs/cpu.yaml"; fi
fi
if [ ! -f "$config" ]; then
  echo "launch.sh: accelerate config '$config' does not exist; see $here/accelerate_configs/" >&2
  exit 2
fi

accelerate="accelerate"
[ -x "$here/.venv/bin/accelerate" ] && accelerate="$here/.venv/bin/accelerate"
cmd=("$accelerate" launch --config_file "$config" "$here/finetune/train.py" "${args[@]}")
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
