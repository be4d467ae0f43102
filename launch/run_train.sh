#!/usr/bin/env bash
# Starts `python -m sdfm.train --resume` as one process, a torchrun job or an accelerate job, as the
# environment says. Extra arguments are appended as config overrides (--train.steps 500 ...).
#   SDFM_CONFIG       preset (default launch/configs/default.toml)
#   SDFM_RUN_DIR      run folder (default runs/<preset name>); must be shared by all nodes of a job
#   SDFM_LAUNCHER     auto (default) | python | torchrun | accelerate; auto is python for one process
#                     on one node without restarts, torchrun otherwise
#   NPROC_PER_NODE    processes per node (default 1; torchrun also takes "gpu")
#   NNODES            nodes, or MIN:MAX for an elastic job (default 1)
#   RDZV_ENDPOINT     host:port of the c10d rendezvous of a multi-node job (default MASTER_ADDR:MASTER_PORT)
#   RDZV_ID           rendezvous id, the same on every node (default sdfm)
#   MASTER_ADDR, MASTER_PORT, NODE_RANK
#                     with NODE_RANK set and no RDZV_ENDPOINT: static rendezvous, fixed node ranks
#   MAX_RESTARTS      torchrun --max-restarts: the process group restarts and resumes (default 0)
#   ACCELERATE_CONFIG accelerate config file (default launch/accelerate/one-node.yaml)
#   SDFM_PYTHON       interpreter of the plain-python launch (default python)
#   SDFM_DRY_RUN=1    print the command instead of running it
# PET_* variables (set by the Kubeflow training operator) stand in for unset NPROC_PER_NODE, NNODES,
# RDZV_ENDPOINT, RDZV_ID and MAX_RESTARTS.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="${SDFM_CONFIG:-$root/launch/configs/default.toml}"
run_dir="${SDFM_RUN_DIR:-$root/runs/$(basename "$config" .toml)}"
nproc="${NPROC_PER_NODE:-${PET_NPROC_PER_NODE:-1}}"
nnodes="${NNODES:-${PET_NNODES:-1}}"
max_restarts="${MAX_RESTARTS:-${PET_MAX_RESTARTS:-0}}"
rdzv_endpoint="${RDZV_ENDPOINT:-${PET_RDZV_ENDPOINT:-}}"
launcher="${SDFM_LAUNCHER:-auto}"
die() { echo "error: $*" >&2; exit 2; }

# --resume on an empty run folder starts at step 0, so the same command starts a run and continues it
# after a requeue, a preemption or a torchrun restart.
train=(-m sdfm.train --config "$config" --run-dir "$run_dir" --resume "$@")

if [ "$launcher" = auto ]; then
  if [ "$nproc" = 1 ] && [ "$nnodes" = 1 ] && [ "$max_restarts" = 0 ]; then launcher=python; else launcher=torchrun; fi
fi

case "$launcher" in
  python)
    cmd=("${SDFM_PYTHON:-python}" "${train[@]}")
    ;;
  torchrun)
    cmd=(torchrun --nproc_per_node="$nproc" --max_restarts="$max_restarts")
    if [ "$nnodes" = 1 ]; then
      # A private rendezvous on a free port: no fixed port to collide with another job on the node.
      cmd+=(--standalone --nnodes=1)
    elif [ -n "${NODE_RANK:-}" ] && [ -z "$rdzv_endpoint" ]; then
      [ -n "${MASTER_ADDR:-}" ] || die "NODE_RANK without RDZV_ENDPOINT means a static rendezvous, which needs MASTER_ADDR"
      cmd+=(--nnodes="$nnodes" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}")
    else
      # c10d: nodes may join in any order (or, with NNODES=MIN:MAX, come and go); ranks are assigned.
      if [ -z "$rdzv_endpoint" ]; then
        [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$nnodes needs RDZV_ENDPOINT (host:port) or MASTER_ADDR"
        rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}"
      fi
      cmd+=(--nnodes="$nnodes" --rdzv_backend=c10d --rdzv_endpoint="$rdzv_endpoint"
        --rdzv_id="${RDZV_ID:-${PET_RDZV_ID:-sdfm}}")
    fi
    cmd+=("${train[@]}")
    ;;
  accelerate)
    # Process counts come from the config file (its num_processes counts all machines); variables
    # that are set override it, so one file serves every node of a job.
    cmd=(accelerate launch --config_file "${ACCELERATE_CONFIG:-$root/launch/accelerate/one-node.yaml}")
    if [ -n "${NPROC_PER_NODE:-}" ]; then
      [[ "$NPROC_PER_NODE" =~ ^[0-9]+$ ]] || die "accelerate needs a number in NPROC_PER_NODE, got '$NPROC_PER_NODE'"
      cmd+=(--num_machines "${NNODES:-1}" --num_processes "$((NPROC_PER_NODE * ${NNODES:-1}))")
    elif [ -n "${NNODES:-}" ]; then
      cmd+=(--num_machines "$NNODES")
    fi
    [ -z "${NODE_RANK:-}" ] || cmd+=(--machine_rank "$NODE_RANK")
    addr="${MASTER_ADDR:-}" port="${MASTER_PORT:-}"
    if [ -n "${RDZV_ENDPOINT:-}" ]; then addr="${RDZV_ENDPOINT%:*}" port="${RDZV_ENDPOINT##*:}"; fi
    [ -z "$addr" ] || cmd+=(--main_process_ip "$addr")
    [ -z "$port" ] || cmd+=(--main_process_port "$port")
    [ -z "${MAX_RESTARTS:-}" ] || cmd+=(--max_restarts "$MAX_RESTARTS")
    cmd+=("${train[@]}")
    ;;
  *)
    die "SDFM_LAUNCHER='$launcher'; use auto, python, torchrun or accelerate"
    ;;
esac

if [ "${SDFM_DRY_RUN:-0}" = 1 ]; then
  printf '%q' "${cmd[0]}"
  printf ' %q' "${cmd[@]:1}"
  echo
  exit 0
fi
# exec: the launcher replaces this shell, so SIGTERM from Slurm, Kubernetes or docker stop reaches it.
exec "${cmd[@]}"
