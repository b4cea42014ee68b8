#!/usr/bin/env bash
# What launch/torchrun.sh and launch/mpirun.sh share; they source this file. It defines:
#   usage [CODE]     print the calling script's header comment and exit (2, or CODE)
#   die MESSAGE      print "launch/SCRIPT: MESSAGE" and exit 2
#   parse_args ARGS  CONFIG first, then --set K=V, --, -h and the script's own options; sets `config`
#                    and `trainer` (the arguments for coe_dist.train)
#   private_tmpdir   export TMPDIR as a new private directory, removed once the job has ended

usage() { awk 'NR > 1 { if (!/^#/) exit; print }' "$0" >&2; exit "${1:-2}"; }
die() { echo "launch/${0##*/}: $*" >&2; exit 2; }
need() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

# The script names its own options, each taking one value, in the associative array OPTIONS
# (option -> variable to set). Any other argument goes to the trainer.
parse_args() {
  [ $# -ge 1 ] || usage
  case $1 in -h|--help) usage 0 ;; -*) die "the first argument is the config file, got '$1'" ;; esac
  config=$1
  shift
  [ -f "$config" ] || die "config file '$config' does not exist: pass a YAML such as configs/tiny.yaml"
  trainer=()
  while [ $# -gt 0 ]; do
    case $1 in
      --set) need "$@"; trainer+=(--set "$2"); shift 2 ;;
      --) shift; trainer+=("$@"); break ;;
      -h|--help) usage 0 ;;
      *) if [ -n "${OPTIONS[$1]:-}" ]; then
           need "$@"; printf -v "${OPTIONS[$1]}" %s "$2"; shift 2
         else
           trainer+=("$1"); shift
         fi ;;
    esac
  done
}

# The job's temporary files go to a directory only this user can enter (mktemp -d: mode 0700), not
# loose into a shared /tmp: torchrun's log directory (torchelastic_*, which torchrun never removes),
# Open MPI's session directory, Python's tempfile. torchrun.sh then `exec`s torchrun, which keeps this
# PID, so that every signal meant for the job (Ctrl-C, kill PID, kill -- -PGID, Slurm's) reaches it once
# and directly (mpirun.sh stays the parent of mpirun and passes stop signals on as SIGUSR1); an EXIT trap
# does not survive exec, so a watcher in the background removes the directory when that PID is gone. It ignores the job's stop signals, which would otherwise leave the
# directory behind.
private_tmpdir() {
  local job=$$ dir
  dir=$(mktemp -d "${TMPDIR:-/tmp}/coe-dist.XXXXXX") ||
    die "cannot create a directory in ${TMPDIR:-/tmp}: set TMPDIR to a writable directory"
  # Forked twice: the watcher is nobody's child once the script execs its launcher, so a launcher that
  # waits for its children on a signal (torchrun's agent waits for its trainers) does not wait for it.
  ( (
    trap '' INT TERM HUP QUIT USR1 USR2
    trap 'rm -rf -- "$dir"' EXIT
    while kill -0 "$job" 2>/dev/null; do sleep 1; done
  ) </dev/null >/dev/null 2>&1 & )
  export TMPDIR=$dir
}
