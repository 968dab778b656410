#!/usr/bin/env bash
# Launch a fine-tuning run with `accelerate launch` on one node or many (run it once on every node).
#
#   ./launch.sh [--config accelerate_configs/X.yaml | --config X] [--dry-run] <preset> [--flags for finetune/train.py]
#
# Topology, read from SLURM when present, else from plain variables (which win over SLURM's when both are set):
#   NNODES          nodes in the job           (SLURM_JOB_NUM_NODES / SLURM_NNODES; default 1)
#   NODE_RANK       this node, 0..NNODES-1     (SLURM_NODEID; default 0)
#   MASTER_ADDR     head node's address        (first host of SLURM_JOB_NODELIST; required when NNODES > 1)
#   MASTER_PORT     head node's port           (default 29500 on several nodes; on one node Accelerate's own)
#   GPUS_PER_NODE   processes per node         (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES, nvidia-smi; default all)
# Config, unless --config is given: cpu.yaml without GPUs, single_gpu.yaml with one, ddp.yaml with more or several
# nodes. Every other argument goes to finetune/train.py unchanged. --dry-run prints the exact command instead.
# FINETUNE_DIST_TIMEOUT_S sets how long a collective waits for a lost rank before the job fails (default 1800).
# Exit status: the run's (0 done, 2 bad input or config, 3 non-finite training), or 75 when it was preempted
# (SIGTERM/SIGUSR1): its checkpoint is written, requeue with --resume auto (examples/slurm_requeue.sbatch).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

die() { echo "launch.sh: $*" >&2; exit 2; }

config=""
dry_run=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) [ $# -ge 2 ] || die "--config needs a file"; config="$2"; shift 2 ;;
    --config=*) config="${1#--config=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

# First host of a SLURM node list: "gpu[03-05,9],cpu1" -> gpu03, "a1,b2" -> a1.
first_host() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1" | head -n 1
    return
  fi
  local list="$1" head
  head="${list%%,*}"
  if [[ "$head" == *"["* ]]; then
    local prefix="${list%%[*}" inner="${list#*[}"
    inner="${inner%%]*}"; inner="${inner%%,*}"; inner="${inner%%-*}"
    echo "${prefix}${inner}"
  else
    echo "$head"
  fi
}

local_gpus() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    if [ -z "$CUDA_VISIBLE_DEVICES" ]; then echo 0; else echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .; fi
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; return; fi
  echo 0
}

nnodes="${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}}"
node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
master_addr="${MASTER_ADDR:-}"
if [ -z "$master_addr" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then master_addr="$(first_host "$SLURM_JOB_NODELIST")"; fi
master_port="${MASTER_PORT:-}"
gpus="${GPUS_PER_NODE:-$(local_gpus)}"

is_int "$nnodes" && [ "$nnodes" -ge 1 ] || die "NNODES must be a positive integer, got '$nnodes'"
is_int "$node_rank" || die "NODE_RANK must be an integer >= 0, got '$node_rank'"
is_int "$gpus" || die "GPUS_PER_NODE must be an integer >= 0, got '$gpus'"
[ -z "$master_port" ] || is_int "$master_port" || die "MASTER_PORT must be an integer, got '$master_port'"
[ "$node_rank" -lt "$nnodes" ] || die "NODE_RANK $node_rank is out of range for NNODES $nnodes (ranks are 0..$((nnodes - 1)))"
if [ "$nnodes" -gt 1 ]; then
  [ -n "$master_addr" ] || die "NNODES is $nnodes but MASTER_ADDR is not set: give the head node's address (SLURM sets it from SLURM_JOB_NODELIST)"
  [ "$gpus" -ge 1 ] || die "NNODES is $nnodes but no GPU was found on this node; set GPUS_PER_NODE"
  master_port="${master_port:-29500}"
fi

if [ -z "$config" ]; then
  if [ "$gpus" -eq 0 ]; then config="cpu.yaml"
  elif [ "$gpus" -eq 1 ] && [ "$nnodes" -eq 1 ]; then config="single_gpu.yaml"
  else config="ddp.yaml"; fi
  config="$here/accelerate_configs/$config"
elif [ ! -f "$config" ]; then  # relative to the repository, or a short name: --config zero3
  for candidate in "$here/$config" "$here/accelerate_configs/$config" "$here/accelerate_configs/$config.yaml"; do
    if [ -f "$candidate" ]; then config="$candidate"; break; fi
  done
fi
if [ ! -f "$config" ]; then
  die "accelerate config '$config' does not exist; choose one of: $(cd "$here/accelerate_configs" && ls ./*.yaml | sed 's|^\./||' | tr '\n' ' ')"
fi

config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
distributed_type="$(sed -n "s/^distributed_type:[[:space:]]*['\"]\{0,1\}\([A-Za-z_]*\).*/\1/p" "$config" | head -n 1)"
launch=(--config_file "$config")
if [ "$distributed_type" = "NO" ]; then
  [ "$nnodes" -eq 1 ] || die "$config runs one process; for $nnodes nodes use ddp.yaml or a DeepSpeed config"
elif [ "$gpus" -ge 1 ]; then  # GPU configs: all local GPUs of every node; CPU configs keep their own process count
  launch+=(--num_processes "$((nnodes * gpus))" --num_machines "$nnodes" --machine_rank "$node_rank")
  if [ "$nnodes" -gt 1 ]; then
    launch+=(--main_process_ip "$master_addr")
    [ "$distributed_type" = "DEEPSPEED" ] && launch+=(--deepspeed_multinode_launcher standard)
  fi
fi
[ -n "$master_port" ] && launch+=(--main_process_port "$master_port")

accelerate="accelerate"
[ -x "$here/.venv/bin/accelerate" ] && accelerate="$here/.venv/bin/accelerate"
cmd=("$accelerate" launch "${launch[@]}" "$here/finetune/train.py" ${args[@]+"${args[@]}"})
summary="node $node_rank of $nnodes, $gpus GPU(s) per node, config $(basename "$config")"
[ "$nnodes" -gt 1 ] && summary+=", head node $master_addr:$master_port"
echo "launch.sh: $summary" >&2
if [ "$dry_run" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi

# Preemption. SLURM signals every process of the job step (--signal=USR1@120 before the time limit, SIGTERM at it).
# The training processes finish their optimizer step, checkpoint and stop; the launchers above them must outlive
# that, so they ignore both signals (inherited as "ignore"; train.py installs its own handlers, and torchrun forwards
# SIGTERM to its workers itself). The workers report "preempted" in FINETUNE_STATUS_FILE and exit 0, so the launchers
# stay quiet; this script then exits 75 (EX_TEMPFAIL): checkpoint written, requeue with --resume auto. A run that
# fails writes its exit status there too, which this script returns instead of the launcher's 1.
status="$(mktemp "${TMPDIR:-/tmp}/finetune-status.XXXXXX")"
trap 'rm -f "$status"' EXIT
# The cluster, `timeout` and Ctrl-C signal the whole process group: the launchers ignore SIGTERM, SIGUSR1 and SIGINT
# (inherited; torchrun is told not to take SIGTERM/SIGINT over) and leave them to the training ranks, which save.
trap '' USR1 TERM INT
export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGHUP,SIGQUIT}"
rc=0
FINETUNE_STATUS_FILE="$status" "${cmd[@]}" || rc=$?
said="$(cat "$status" 2>/dev/null || true)"
if [ "$said" = "preempted" ]; then
  echo "launch.sh: preempted; the checkpoint is written. Exit 75: requeue and continue with --resume auto" >&2
  exit 75
fi
# The run's own status (2: bad input, 3: non-finite training), which the launchers report as 1.
[[ "$said" =~ ^exit\ ([0-9]+)$ ]] && exit "${BASH_REMATCH[1]}"
exit "$rc"
