#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying the Slurm launch path and for CI.
# Debian/Ubuntu, run as root, no systemd or cgroups needed: munged + slurmctld + slurmd run
# in the background with all their state (config, spool, logs, munge key) under one DIR.
#
#   scripts/local-slurm.sh start [DIR]   install the packages if missing, start the daemons,
#                                        wait for the node to be idle, print the export to use:
#                                          eval "$(scripts/local-slurm.sh start)"
#   scripts/local-slurm.sh stop [DIR]    cancel all jobs, stop the daemons (by recorded PID)
#   scripts/local-slurm.sh status [DIR]  sinfo + squeue
#   scripts/local-slurm.sh env [DIR]     print the export line again
#
# DIR defaults to /var/lib/coe-dist/local-slurm. It must be owned by root, not writable by others
# and reached without symbolic links: the daemons run as root and this script deletes and
# recreates state under it.
# Knobs (environment):
#   LOCAL_SLURM_CPUS     CPUs the node declares (default: nproc; more = oversubscribe)
#   LOCAL_SLURM_GPUS     placeholder GPUs the node declares (default 0), so that jobs asking
#                        --gpus-per-node=N get scheduled (they get no real device)
#   LOCAL_SLURM_NODE     node name (default: short host name, or localhost if that does not
#                        resolve; jobs use it as the rendezvous address)
#   LOCAL_SLURM_PORT     slurmctld port; slurmd uses PORT+1 (default 6817)
#   LOCAL_SLURM_TIMEOUT  seconds to wait for the node to become idle (default 60)
# There is no accounting daemon, hence no sacct: use `sbatch --wait`, `coe-dist slurm status`,
# `scontrol show job ID` (kept 10 minutes after the end) or DIR/log/jobcomp.log.
set -euo pipefail
umask 077  # state, keys and logs are root's; the few paths others must read are opened below

mode=start
case "${1:-}" in start|stop|status|env) mode=$1; shift ;; -h|--help) sed -n '2,26p' "$0"; exit 0 ;; esac
ARG=${1:-/var/lib/coe-dist/local-slurm}
D=$(realpath -m -- "$ARG")
NPROC=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS otherwise
CPUS=${LOCAL_SLURM_CPUS:-$NPROC}
GPUS=${LOCAL_SLURM_GPUS:-0}
PORT=${LOCAL_SLURM_PORT:-6817}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-60}
export SLURM_CONF=$D/slurm.conf
log() { echo "local-slurm: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for v in CPUS GPUS PORT TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "LOCAL_SLURM_$v=${!v} is not a whole number"
done
[ "$CPUS" -ge 1 ] || die "LOCAL_SLURM_CPUS=$CPUS: declare at least 1 CPU"

# check_dir: DIR is ours to wipe. A directory someone else can write to (or a symlink they
# planted) would let them swap the munge key or the config the root daemons read.
check_dir() {
  # Any symbolic link on the way (not only the last one) could point the wipe below elsewhere.
  local literal
  literal=$(realpath -m -s -- "$ARG")
  [ "$literal" = "$D" ] || die "$literal is (or goes through) a symbolic link to $D: give the real path"
  if [ -e "$D" ]; then
    [ -d "$D" ] || die "$D exists and is not a directory: give another DIR"
    [ "$(stat -c %u "$D")" = 0 ] || die "$D is not owned by root: give a directory root created"
    case "$(stat -c %A "$D")" in
      ?????w????|????????w?) die "$D is writable by group or others: chmod go-w it or give another DIR" ;;
    esac
  fi
}

# alive NAME: the PID recorded in DIR/NAME.pid runs and is ours (its command line names DIR).
alive() {
  local p
  p=$(cat "$D/$1.pid" 2>/dev/null) || return 1
  [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -qF -- "$D/"
}

stop() {
  if alive slurmctld; then  # let Slurm end running jobs (and their slurmstepd) first
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 40); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  local n p
  for n in slurmd slurmctld munged; do
    if alive "$n"; then
      p=$(cat "$D/$n.pid")
      kill "$p" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$p" 2>/dev/null || true
      log "stopped $n (pid $p)"
    fi
    rm -f "$D/$n.pid"
  done
}

install_pkgs() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
    command -v sbatch >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "Slurm is not installed and there is no apt-get: install slurmctld, slurmd, slurm-client and munge"
  log "installing slurmctld slurmd slurm-client munge (Debian packages)"
  # Keep the packages' init scripts from starting system-wide daemons next to ours.
  local rcd=/usr/sbin/policy-rc.d added='' ok=1
  if [ ! -e $rcd ]; then printf '#!/bin/sh\nexit 101\n' >$rcd; chmod 755 $rcd; added=1; fi
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends slurmctld slurmd slurm-client munge; } >&2 || ok=''
  [ -n "$added" ] && rm -f $rcd
  [ -n "$ok" ] || die "apt-get install of slurmctld slurmd slurm-client munge failed (see above)"
}

write_conf() {
  local node=$1 mem over='' gres='' i
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  # Declaring more CPUs than the machine has is refused unless config_overrides.
  [ "$CPUS" -gt "$NPROC" ] && over="SlurmdParameters=config_overrides"
  rm -rf "$D/gres.conf" "$D/fake-gpu"
  if [ "$GPUS" -gt 0 ]; then  # slurmd drops GPUs without a device file: give it plain files
    mkdir -p "$D/fake-gpu"
    for i in $(seq 0 $((GPUS - 1))); do : >"$D/fake-gpu/gpu$i"; done
    echo "Name=gpu File=$D/fake-gpu/gpu[0-$((GPUS - 1))]" >"$D/gres.conf"
    chmod 644 "$D/gres.conf"
    gres="Gres=gpu:$GPUS"
    over="$over${over:+
}GresTypes=gpu"
  fi
  cat >"$SLURM_CONF" <<EOF
# Written by scripts/local-slurm.sh: one node on 127.0.0.1, state under $D
ClusterName=local
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$D/run/munge.sock,cred_expire=10
StateSaveLocation=$D/spool/ctld
SlurmdSpoolDir=$D/spool/d
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
# No cgroups here: track job processes by parentage; signals reach the whole process tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Reject at submission a job that could never run, instead of queueing it forever.
EnforcePartLimits=ALL
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# Seconds between SIGTERM and SIGKILL on cancel or time limit: the trainer's checkpoint window.
KillWait=30
MinJobAge=600
$over
NodeName=$node NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem $gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 644 "$SLURM_CONF"  # every Slurm client (sbatch, srun as any user) reads it
}

# launch NAME CMD...: start CMD in the background (foreground mode), record its PID.
launch() {
  local n=$1
  shift
  nohup "$@" >"$D/log/$n.out" 2>&1 </dev/null &
  echo $! >"$D/$n.pid"
}

start() {
  if alive munged && alive slurmctld && alive slurmd; then
    log "already running in $D"
    echo "export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "run as root: slurmd starts job processes as their users and munged owns the key"
  stop  # clear any partial earlier start
  install_pkgs
  local p t0=$SECONDS node=${LOCAL_SLURM_NODE:-$(hostname -s)}
  getent hosts "$node" >/dev/null || { log "'$node' does not resolve, using localhost"; node=localhost; }
  for p in "$PORT" $((PORT + 1)); do  # another slurmctld/slurmd there would answer instead of ours
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      die "port $p on 127.0.0.1 is in use: set LOCAL_SLURM_PORT to a free pair of ports"
    fi
  done

  mkdir -p "$D"
  check_dir  # again: someone may have made it between the first check and mkdir
  rm -rf "$D/spool" "$D/run" "$D/log" "$D/munge"  # fresh state each start
  mkdir -p "$D/spool/ctld" "$D/spool/d" "$D/run" "$D/log" "$D/munge"
  # munged insists on a private key directory; clients of any user need to reach the socket.
  chmod 755 "$D" "$D/run"
  chmod 700 "$D/munge"
  mungekey --create --keyfile="$D/munge/munge.key" 2>/dev/null ||
    dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$D/munge/munge.key"
  launch munged munged -F --socket="$D/run/munge.sock" --key-file="$D/munge/munge.key" \
    --pid-file="$D/run/munged.pid" --seed-file="$D/munge/munged.seed"
  for _ in $(seq 50); do
    munge -n -S "$D/run/munge.sock" 2>/dev/null | unmunge -S "$D/run/munge.sock" >/dev/null 2>&1 && break
    sleep 0.2
  done
  alive munged || die "munged did not start: $(tail -n 5 "$D/log/munged.out")"

  write_conf "$node"
  launch slurmctld slurmctld -D -f "$SLURM_CONF"
  launch slurmd slurmd -D -f "$SLURM_CONF" -N "$node"

  local state=
  while [ $((SECONDS - t0)) -lt "$TIMEOUT" ]; do
    state=$(sinfo -h -n "$node" -o %T 2>/dev/null || true)
    [ "$state" = idle ] && break
    { alive slurmctld && alive slurmd; } || break
    sleep 0.5
  done
  if [ "$state" != idle ]; then
    tail -n 20 "$D/log/slurmctld.out" "$D/log/slurmd.out" >&2 || true
    stop
    die "node '$node' not idle after $((SECONDS - t0)) s (state '${state:-none}'); logs in $D/log"
  fi
  log "node $node idle with $CPUS CPUs, $GPUS GPUs after $((SECONDS - t0)) s; state in $D"
  echo "export SLURM_CONF=$SLURM_CONF"
}

check_dir
case $mode in
  start) start ;;
  stop) stop ;;
  status) alive slurmctld || die "no cluster running from $D"; sinfo && squeue ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
esac
