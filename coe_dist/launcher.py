"""Where am I in the job? Rank, local rank, world size and rendezvous address from the launcher.

Sources, in this order (the first that is present wins):
  1. torchrun / torch.distributed.run: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  2. Slurm (srun):  SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, first host of SLURM_JOB_NODELIST
  3. MPI (mpirun / srun --mpi=pmix) through mpi4py: COMM_WORLD rank/size, local rank from a
     shared-memory split, rank 0's host name broadcast as the rendezvous address
  4. nothing: a single process (rank 0 of 1)
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

DEFAULT_PORT = 29500


class LaunchError(RuntimeError):
    """The launcher's environment is incomplete or malformed."""


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | mpi | single


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list: 'node[01-03,07],gpu5' -> [node01, node02, node03, node07, gpu5]."""
    hosts: list[str] = []
    # Split on commas that are not inside brackets.
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist.strip()):
        hosts.extend(_expand_host(part.strip(), nodelist))
    if not hosts:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts


def _expand_host(pattern: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        if "[" in pattern or "]" in pattern:
            raise LaunchError(f"SLURM_JOB_NODELIST={whole!r}: unbalanced brackets in {pattern!r}")
        return [pattern] if pattern else []
    head, tail = pattern[:m.start()], pattern[m.end():]
    out = []
    for item in m.group(1).split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LaunchError(f"SLURM_JOB_NODELIST={whole!r}: bad range {item!r} (expected e.g. 01-04)")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(_expand_host(f"{head}{n:0{width}d}{tail}", whole))
    return out


def _int(env: Mapping[str, str], key: str, source: str) -> int:
    if key not in env:
        raise LaunchError(f"{source} launch detected but {key} is not set: launch with {source} as documented "
                          "in launch/ or set the variable")
    try:
        return int(env[key])
    except ValueError:
        raise LaunchError(f"{key}={env[key]!r} is not an integer") from None


def discover(env: Mapping[str, str] | None = None, *, use_mpi: bool = True) -> ProcessEnv:
    env = os.environ if env is None else env
    if "RANK" in env or "TORCHELASTIC_RUN_ID" in env:
        return ProcessEnv(_int(env, "RANK", "torchrun"), _int(env, "LOCAL_RANK", "torchrun"),
                          _int(env, "WORLD_SIZE", "torchrun"), env.get("MASTER_ADDR", "127.0.0.1"),
                          int(env.get("MASTER_PORT", DEFAULT_PORT)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError("Slurm launch detected but SLURM_JOB_NODELIST is not set: run inside an allocation "
                              "(sbatch/salloc) with srun")
        port = int(env.get("MASTER_PORT", DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000))
        return ProcessEnv(_int(env, "SLURM_PROCID", "Slurm"), _int(env, "SLURM_LOCALID", "Slurm"),
                          _int(env, "SLURM_NTASKS", "Slurm"), env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
                          port, "slurm")
    mpi_vars = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
    if use_mpi and any(k in env for k in mpi_vars):
        return _discover_mpi(env)
    return ProcessEnv(0, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", DEFAULT_PORT)),
                      "single")


def _discover_mpi(env: Mapping[str, str]) -> ProcessEnv:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(f"MPI launch detected but mpi4py does not import ({e}): pip install mpi4py") from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr = env.get("MASTER_ADDR") or comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, root=0)
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    return ProcessEnv(comm.Get_rank(), local.Get_rank(), comm.Get_size(), addr, port, "mpi")


def pick_backend(requested: str, device_type: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(penv: ProcessEnv, backend: str, timeout_s: float) -> None:
    """Start torch.distributed (and DeepSpeed's comm wrapper) for any world size, 1 included."""
    import deepspeed
    import torch.distributed as dist

    for key, value in (("RANK", penv.rank), ("LOCAL_RANK", penv.local_rank), ("WORLD_SIZE", penv.world_size),
                       ("MASTER_ADDR", penv.master_addr), ("MASTER_PORT", penv.master_port)):
        os.environ[key] = str(value)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=penv.rank, world_size=penv.world_size,
                                timeout=timedelta(seconds=timeout_s))
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False,
                               timeout=timedelta(seconds=timeout_s))
