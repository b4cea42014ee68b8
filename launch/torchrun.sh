#!/usr/bin/env bash
# Train with torchrun: one agent per node starts --nproc trainer processes.
#
#   launch/torchrun.sh CONFIG [options] [--set section.key=value ...] [trainer args ...]
#
# One node:
#   launch/torchrun.sh configs/tiny.yaml --nproc 2 --set train.steps=50
# Several nodes, c10d rendezvous (run the same command on every node; ranks are assigned at
# rendezvous, the agent on the endpoint's host serves it; nodes may join in any order):
#   launch/torchrun.sh configs/tiny.yaml --nnodes 2 --nproc 8 --rdzv-endpoint node01:29400 --rdzv-id run42
# Several nodes, fixed ranks (each node passes its own --node-rank; rank 0's host is the endpoint):
#   launch/torchrun.sh configs/tiny.yaml --nnodes 2 --node-rank 1 --nproc 8 --rdzv-endpoint node01:29400
#
# Options:
#   --nproc P               trainer processes on this node (default: visible GPUs, else 1)
#   --nnodes N              nodes in the job (default 1)
#   --node-rank R           this node's rank: static rendezvous instead of c10d
#   --rdzv-endpoint H[:P]   the first node's address as every node reaches it; required with
#                           --nnodes > 1 (there is no wildcard default). Port default 29400
#   --rdzv-id ID            the job's name, the same on every node (default $SLURM_JOB_ID or coe-dist)
#   --local-addr A          this node's address as the others reach it, where the host name
#                           resolves to loopback (containers, network namespaces)
#   --set K=V               config override, passed to the trainer (repeatable)
#   --                      everything after goes to the trainer unchanged
# Any other argument goes to the trainer too (e.g. --resume auto, --debug).
# Environment: PYTHON (interpreter, default python3: activate the venv first),
#   TORCHRUN_ARGS (extra torchrun options, split on spaces), GLOO_SOCKET_IFNAME /
#   NCCL_SOCKET_IFNAME (the interface to use between nodes when it is not the default route's).
# On one node the rendezvous endpoint, the trainers' store and gloo use 127.0.0.1 only (torchrun's
# own store listens on every interface: docs/launching.md). Temporary files go to a private
# directory in $TMPDIR (default /tmp), removed when the job ends.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

PYTHON=${PYTHON:-python3}
nproc='' nnodes=1 node_rank='' endpoint='' rdzv_id=${SLURM_JOB_ID:-coe-dist} local_addr=''
# shellcheck disable=SC2034  # read by parse_args
declare -A OPTIONS=([--nproc]=nproc [--nproc-per-node]=nproc [--nnodes]=nnodes [--node-rank]=node_rank
                    [--rdzv-endpoint]=endpoint [--rdzv-id]=rdzv_id [--local-addr]=local_addr)
parse_args "$@"

if [ -z "$nproc" ]; then  # one process per GPU; CPU-only nodes get one (ask for more with --nproc)
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    nproc=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  else
    nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  [ "$nproc" -gt 0 ] 2>/dev/null || nproc=1
fi
for v in nproc nnodes; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--$v=${!v}: expected a whole number >= 1"
done
[ -z "$node_rank" ] || [[ $node_rank =~ ^[0-9]+$ && $node_rank -lt $nnodes ]] ||
  die "--node-rank=$node_rank: expected 0..$((nnodes - 1))"

# torchrun's own main, run by coe_dist.local_launch: a signal ends the job with 128 + the signal once the
# trainers have saved, and a failed trainer with its one-line error (torchrun would print a traceback for
# the one and a ChildFailedError dump for the other).
run=("$PYTHON" -m coe_dist.local_launch "--nproc-per-node=$nproc")
if [ "$nnodes" -eq 1 ] && [ -z "$endpoint" ]; then
  # c10d on 127.0.0.1 with a free port: several single-node jobs can share a machine. The local
  # address becomes the trainers' MASTER_ADDR: their store and gloo then stay on loopback too.
  run+=(--nnodes=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:0 "--rdzv-id=$rdzv_id")
  local_addr=${local_addr:-127.0.0.1}
else
  [ -n "$endpoint" ] || die "--nnodes=$nnodes needs --rdzv-endpoint HOST[:PORT], the first node's address"
  host=${endpoint%:*} port=29400
  [ "$host" != "$endpoint" ] && port=${endpoint##*:}
  [[ $port =~ ^[0-9]+$ ]] || die "--rdzv-endpoint=$endpoint: the port '$port' is not a number"
  if [ -n "$node_rank" ]; then
    run+=("--nnodes=$nnodes" "--node-rank=$node_rank" "--master-addr=$host" "--master-port=$port")
  else
    run+=("--nnodes=$nnodes" --rdzv-backend=c10d "--rdzv-endpoint=$host:$port" "--rdzv-id=$rdzv_id")
    # torchrun serves the rendezvous where the endpoint matches the host name's addresses; an
    # address of a second interface (or of a network namespace) is missed: say so explicitly.
    # (Loopback endpoints are left to torchrun: every agent there tries to serve, one wins.)
    case $host in
      127.*|localhost|::1) ;;
      *) if [ "$host" = "$local_addr" ] || { hostname -I 2>/dev/null | tr ' ' '\n' | grep -qxF -- "$host"; }; then
           run+=(--rdzv-conf=is_host=true)
         fi ;;
    esac
  fi
fi
[ -z "$local_addr" ] || run+=("--local-addr=$local_addr")
# Extra torchrun options are word-split on purpose: TORCHRUN_ARGS="--max-restarts=1 --log-dir=logs".
# shellcheck disable=SC2206
[ -z "${TORCHRUN_ARGS:-}" ] || run+=(${TORCHRUN_ARGS})

# The agent forwards these to the trainers, which save a checkpoint and exit: SIGUSR1 is what
# slurm/train.sbatch sends before the time limit. Give them time to finish the step and save.
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
# A fresh rendezvous store per restart: a shared one hands restarted ranks the previous attempt's
# addresses and start-up hangs (pytorch/pytorch#135712). Unshared, rank 0 serves the trainers' store
# on MASTER_ADDR only, not the agent on every interface.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

echo "launch/torchrun.sh: ${run[*]} -m coe_dist.train --config $config ${trainer[*]}" >&2
private_tmpdir
exec "${run[@]}" -m coe_dist.train --config "$config" "${trainer[@]}"
