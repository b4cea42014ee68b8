"""Where am I in the job? Rank, local rank, world size and rendezvous address from the launcher.

Sources, in this order (the first that is present wins):
  1. torchrun / torch.distributed.run (also the DeepSpeed launcher):
     RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
  2. Slurm, a task of an `srun` step (one task per process):
     SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, first host of SLURM_STEP_NODELIST (or
     SLURM_JOB_NODELIST); port MASTER_PORT or 29500 + SLURM_JOB_ID % 1000 so that two jobs
     sharing a node do not collide. The batch script itself (no SLURM_STEP_ID) is not a task:
     it has SLURM_PROCID=0 and SLURM_NTASKS=N but only one process would ever join.
  3. MPI (mpirun / mpiexec / `srun --mpi=pmix`) through mpi4py: COMM_WORLD rank and size, local
     rank from a shared-memory split, rendezvous on 127.0.0.1 when all ranks share one node and
     on rank 0's host name otherwise (MASTER_ADDR/MASTER_PORT override both). Detected from the
     variables Open MPI (OMPI_COMM_WORLD_*), MPICH/Intel MPI (PMI_*), PMIx (PMIX_RANK) and
     MVAPICH (MV2_COMM_WORLD_*) set. mpirun inside a Slurm allocation starts its ranks from
     Slurm steps, so they carry SLURM_* variables of that step: when those disagree with the
     MPI rank/size, MPI wins. Under `srun --mpi=pmix` they agree and Slurm's are used.
  4. nothing: a single process (rank 0 of 1)

init_distributed: where rank 0 serves the rendezvous store (every source but torchrun's agent store) it
listens on MASTER_ADDR only, and a loopback MASTER_ADDR keeps gloo on the loopback interface. Before the
process group starts, the ranks meet in the store (meet): each announces its world size and the hash of its
resolved config, and a rank that never arrives, a WORLD_SIZE or a config that differs becomes one line
within parallel.timeout_s, naming the ranks, both values or the differing keys.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import json
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from coe_dist.errors import UserError

if TYPE_CHECKING:
    from torch.distributed import Store

DEFAULT_PORT = 29500
BACKENDS = ("nccl", "gloo")
LOOPBACK_IFNAME = "lo"  # Linux's loopback interface

# Rank and size variables of the MPI launchers we recognise: (rank, size) pairs, first match wins.
MPI_RANK_SIZE = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE"),
                 ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"), ("PMIX_RANK", None))
MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_SIZE",
               "MPI_LOCALNRANKS")
TORCHRUN_MARKERS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")


class LaunchError(UserError, RuntimeError):
    """The launcher's environment is incomplete or malformed. The message names the variable and the fix."""


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | mpi | single


# ---------------------------------------------------------------- Slurm host lists

def _split_top_level(text: str, var: str) -> list[str]:
    """Split on commas outside brackets; reject nested or unbalanced brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise LaunchError(f"{var}={text!r}: nested '[' at position {i}; expected e.g. node[01-04,07]")
            depth = 1
        elif ch == "]":
            if not depth:
                raise LaunchError(f"{var}={text!r}: ']' without '[' at position {i}; expected e.g. node[01-04,07]")
            depth = 0
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise LaunchError(f"{var}={text!r}: '[' is never closed; expected e.g. node[01-04,07]")
    parts.append(text[start:])
    return parts


_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _parse_ranges(group: str, pattern: str, whole: str, var: str) -> list[tuple[int, int, int]]:
    """'01-04,07' -> [(1, 4, 2), (7, 7, 2)]: (low, high, zero-padded width)."""
    ranges = []
    for item in group.split(","):
        m = _RANGE.fullmatch(item.strip())
        if m is None:
            raise LaunchError(f"{var}={whole!r}: bad range {item!r} in {pattern!r}; expected numbers like 07 or 01-04")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise LaunchError(f"{var}={whole!r}: range {item!r} in {pattern!r} runs backwards; write {hi}-{lo}")
        ranges.append((int(lo), int(hi), len(lo)))
    return ranges


def _parse_host(pattern: str, whole: str, var: str) -> list[str | list[tuple[int, int, int]]]:
    """'rack[1-2]-n[01,03]' -> ['rack', [(1, 2, 1)], '-n', [(1, 1, 2), (3, 3, 2)]]."""
    pieces: list[str | list[tuple[int, int, int]]] = []
    pos = 0
    for m in re.finditer(r"\[([^\]]*)\]", pattern):  # brackets were checked balanced and flat
        if m.start() > pos:
            pieces.append(pattern[pos:m.start()])
        pieces.append(_parse_ranges(m.group(1), pattern, whole, var))
        pos = m.end()
    if pos < len(pattern):
        pieces.append(pattern[pos:])
    return pieces


def _expand_pieces(pieces: list) -> Iterator[str]:
    # A generator, not itertools.product: product would materialise 'n[0-9999999]' to name its first host.
    if not pieces:
        yield ""
        return
    head, rest = pieces[0], pieces[1:]
    choices = [head] if isinstance(head, str) else (f"{n:0{w}d}" for lo, hi, w in head for n in range(lo, hi + 1))
    for choice in choices:
        for tail in _expand_pieces(rest):
            yield choice + tail


def iter_nodelist(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> Iterator[str]:
    """Hosts of a Slurm host list, lazily (a list may name thousands). The whole list is checked first."""
    text = nodelist.strip()
    if not text:
        raise LaunchError(f"{var} is empty: run inside an allocation (sbatch/salloc), or set MASTER_ADDR")
    parsed = []
    for part in _split_top_level(text, var):
        part = part.strip()
        if not part:
            raise LaunchError(f"{var}={nodelist!r}: empty host name between commas")
        if any(c.isspace() for c in part):
            raise LaunchError(f"{var}={nodelist!r}: white space inside host name {part!r}")
        parsed.append(_parse_host(part, nodelist, var))
    for pieces in parsed:
        yield from _expand_pieces(pieces)


def expand_nodelist(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a Slurm host list: 'node[01-03,07],gpu5' -> [node01, node02, node03, node07, gpu5].

    Several bracket groups multiply out ('r[1-2]n[1-2]' -> r1n1 r1n2 r2n1 r2n2); zero padding follows
    the lower bound ('n[8-10]' -> n8 n9 n10, 'n[08-10]' -> n08 n09 n10), as `scontrol show hostnames` does.
    """
    hosts = list(iter_nodelist(nodelist, var))
    if not hosts:
        raise LaunchError(f"{var}={nodelist!r} names no host: run inside an allocation (sbatch/salloc)")
    return hosts


def first_host(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> str:
    for host in iter_nodelist(nodelist, var):
        return host
    raise LaunchError(f"{var}={nodelist!r} names no host: run inside an allocation (sbatch/salloc)")


# ---------------------------------------------------------------- discovery

def _int(env: Mapping[str, str], key: str, source: str, fix: str) -> int:
    if key not in env:
        raise LaunchError(f"{source} launch detected but {key} is not set: {fix}")
    try:
        return int(env[key].strip())
    except ValueError:
        raise LaunchError(f"{key}={env[key]!r} is not an integer: {fix}") from None


def _port(env: Mapping[str, str], default: int) -> int:
    raw = env.get("MASTER_PORT")
    if raw is None or raw == "":
        return default
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise LaunchError(f"MASTER_PORT={raw!r} is not a TCP port: set it to a free port in 1-65535, e.g. 29500")
    return port


def _checked(penv: ProcessEnv, names: tuple[str, str, str]) -> ProcessEnv:
    rank_var, local_var, size_var = names
    if penv.world_size < 1:
        raise LaunchError(f"{size_var}={penv.world_size}: the world needs at least one process")
    if not 0 <= penv.rank < penv.world_size:
        raise LaunchError(f"{rank_var}={penv.rank} is outside 0..{penv.world_size - 1} "
                          f"({size_var}={penv.world_size}): the launcher's variables disagree; relaunch")
    if penv.local_rank < 0:
        raise LaunchError(f"{local_var}={penv.local_rank}: a local rank is >= 0")
    if not penv.master_addr:
        raise LaunchError("MASTER_ADDR is empty: set it to rank 0's address (host name or IP)")
    return penv


def discover(env: Mapping[str, str] | None = None, *, use_mpi: bool = True) -> ProcessEnv:
    """This process's place in the job, from the first launcher whose variables are present (see module doc)."""
    env = os.environ if env is None else env
    if any(k in env for k in TORCHRUN_MARKERS):
        return _discover_torchrun(env)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and not _mpi_disagrees_with_slurm(env):
        return _discover_slurm(env)
    if use_mpi and any(k in env for k in MPI_MARKERS):
        return _discover_mpi(env)
    return ProcessEnv(0, 0, 1, env.get("MASTER_ADDR") or "127.0.0.1", _port(env, DEFAULT_PORT), "single")


def _discover_torchrun(env: Mapping[str, str]) -> ProcessEnv:
    fix = "launch with torchrun (see launch/torchrun.sh), or set RANK, LOCAL_RANK and WORLD_SIZE together"
    rank = _int(env, "RANK", "torchrun", fix)
    local = _int(env, "LOCAL_RANK", "torchrun", fix)
    world = _int(env, "WORLD_SIZE", "torchrun", fix)
    addr = env.get("MASTER_ADDR")
    if not addr:
        if world > 1:
            raise LaunchError(f"torchrun launch detected (WORLD_SIZE={world}) but MASTER_ADDR is not set: set it "
                              "to rank 0's address, or launch with torchrun which sets it")
        addr = "127.0.0.1"
    return _checked(ProcessEnv(rank, local, world, addr, _port(env, DEFAULT_PORT), "torchrun"),
                    ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def _discover_slurm(env: Mapping[str, str]) -> ProcessEnv:
    fix = "start one task per process with srun inside an allocation (see slurm/train.sbatch)"
    rank = _int(env, "SLURM_PROCID", "Slurm", fix)
    local = _int(env, "SLURM_LOCALID", "Slurm", fix)
    size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    world = _int(env, size_var, "Slurm", fix)
    addr = env.get("MASTER_ADDR")
    if not addr:
        var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(v)), None)
        if var is None:
            raise LaunchError("Slurm launch detected but SLURM_JOB_NODELIST is not set: run inside an allocation "
                              "(sbatch/salloc) with srun, or set MASTER_ADDR to rank 0's host")
        addr = first_host(env[var], var)
    job = _int(env, "SLURM_JOB_ID", "Slurm", fix) if "SLURM_JOB_ID" in env else 0
    return _checked(ProcessEnv(rank, local, world, addr, _port(env, DEFAULT_PORT + job % 1000), "slurm"),
                    ("SLURM_PROCID", "SLURM_LOCALID", size_var))


def _mpi_rank_size(env: Mapping[str, str]) -> tuple[str, str | None] | None:
    for rank_var, size_var in MPI_RANK_SIZE:
        if rank_var in env:
            return env[rank_var], (env.get(size_var) if size_var else None)
    return None


def _mpi_disagrees_with_slurm(env: Mapping[str, str]) -> bool:
    """True for ranks that mpirun started inside an allocation: they inherit the SLURM_* of mpirun's daemon step."""
    found = _mpi_rank_size(env)
    if found is None:
        return False
    rank, size = found
    slurm_size = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    return rank.strip() != env.get("SLURM_PROCID", "").strip() or (size is not None and size != slurm_size)


def _discover_mpi(env: Mapping[str, str]) -> ProcessEnv:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(f"MPI launch detected but mpi4py does not import ({e}): pip install mpi4py, built "
                          "against the MPI that runs mpirun") from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_node = local.Get_size() == comm.Get_size()
    addr = env.get("MASTER_ADDR")
    if not addr:
        # One node: loopback, which needs no name resolution. Several: rank 0's host name, which the
        # cluster's other nodes resolve; set MASTER_ADDR where they cannot.
        addr = "127.0.0.1" if one_node else comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, 0)
    penv = ProcessEnv(comm.Get_rank(), local.Get_rank(), comm.Get_size(), addr, _port(env, DEFAULT_PORT), "mpi")
    local.Free()
    return _checked(penv, ("MPI rank", "MPI local rank", "MPI size"))


# ---------------------------------------------------------------- process group

def pick_backend(requested: str, device_type: str) -> str:
    """'auto' -> NCCL on CUDA, gloo otherwise; an explicit choice is kept but checked against the device."""
    if requested == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if requested not in BACKENDS:
        raise LaunchError(f"parallel.backend={requested!r}: must be auto, nccl or gloo")
    if requested == "nccl" and device_type != "cuda":
        raise LaunchError(f"parallel.backend=nccl on device {device_type!r}: NCCL needs CUDA tensors; "
                          "use --set parallel.backend=gloo (or auto)")
    return requested


def init_distributed(penv: ProcessEnv, backend: str, timeout_s: float, config: Mapping | None = None) -> None:
    """Start torch.distributed (and DeepSpeed's comm wrapper) for any world size, 1 included; `config` (the
    resolved run config) must be the same on every rank."""
    import torch.distributed as dist

    from coe_dist.parallel.groups import init_deepspeed_comm

    # env:// rendezvous for every source: torchrun already set these; Slurm and MPI tasks get them here.
    for key, value in (("RANK", penv.rank), ("LOCAL_RANK", penv.local_rank), ("WORLD_SIZE", penv.world_size),
                       ("MASTER_ADDR", penv.master_addr), ("MASTER_PORT", penv.master_port)):
        os.environ[key] = str(value)
    if is_loopback(penv.master_addr):
        # Every rank reaches rank 0 over loopback, so all of them run on this host: gloo's data sockets need
        # not listen beyond it (unset, gloo binds the address the host name resolves to, often the LAN's).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_IFNAME)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = rendezvous_store(penv, timeout)
        if penv.world_size > 1:
            # torchrun's agent serves the store that env:// joins: meet in it through a client of our own.
            meet(store if store is not None else _store_client(penv, timeout), penv, config or {}, timeout_s)
        dist.init_process_group(backend, store=store, rank=penv.rank, world_size=penv.world_size, timeout=timeout)
    init_deepspeed_comm(backend, timedelta(seconds=timeout_s))


def is_loopback(host: str) -> bool:
    """A loopback address or `localhost`, by its text: no name is resolved (a host name that resolves to
    127.0.1.1 on one node may be another node's LAN address)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def rendezvous_store(penv: ProcessEnv, timeout: timedelta) -> Store | None:
    """The store init_process_group meets the other ranks through; None for torchrun's (env:// joins it).

    torchrun's agent serves a store of its own when TORCHELASTIC_USE_AGENT_STORE=True (its c10d rendezvous
    shares it unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; the static one always). Otherwise rank 0 serves
    it, and torch's TCPStore would listen on every interface whatever host it is given: rank 0 binds the
    socket itself, to MASTER_ADDR only, and hands it over. One process has no one to meet: a store in memory.
    """
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    if penv.world_size == 1:
        return dist.HashStore()
    if penv.rank != 0:
        return _store_client(penv, timeout)
    sock = listen_socket(penv.master_addr, penv.master_port)
    # wait_for_workers=False: meet() waits for the other ranks, and says which never came.
    try:
        store = dist.TCPStore(penv.master_addr, penv.master_port, penv.world_size, is_master=True, timeout=timeout,
                              master_listen_fd=sock.fileno(), wait_for_workers=False)
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now and closes it
    return store


def _store_client(penv: ProcessEnv, timeout: timedelta) -> Store:
    """A connection to rank 0's (or torchrun's agent's) store; one line when nobody answers there."""
    import torch.distributed as dist

    try:
        # Wait for a listener here: torch's client retries print C++ stack dumps while rank 0 is not up yet.
        _await_listener(penv.master_addr, penv.master_port, timeout.total_seconds())
        return dist.TCPStore(penv.master_addr, penv.master_port, penv.world_size, is_master=False, timeout=timeout)
    except (RuntimeError, OSError) as e:  # torch's DistNetworkError is a RuntimeError
        raise LaunchError(f"rank {penv.rank}: nobody serves the rendezvous at {penv.master_addr}:{penv.master_port} "
                          f"(waited {timeout.total_seconds():g} s, parallel.timeout_s): start rank 0 with the same "
                          f"MASTER_ADDR and MASTER_PORT, or fix them [{_first_line(e)}]") from None


def _await_listener(host: str, port: int, timeout_s: float) -> None:
    """Return once something accepts connections on host:port; TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=min(2.0, timeout_s)).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer on {host}:{port}: {e.strerror or e}") from None
            time.sleep(0.2)


# ---------------------------------------------------------------- meeting: who came, and do they agree

MEET_PREFIX = "coe-dist/meet"
MEET_POLL_S = 0.1


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def flatten(config: Mapping, prefix: str = "") -> dict[str, object]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}"""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_digest(flat: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


def meet(store: Store, penv: ProcessEnv, config: Mapping, timeout_s: float) -> None:
    """Every rank announces itself; rank 0 waits for all of them (parallel.timeout_s) and compares world sizes and
    config hashes, then posts its verdict, which every other rank waits for. Each rank also checks rank 0's world
    size itself, so that a mismatch fails both sides at once. Raises LaunchError with the same line everywhere."""
    flat = json.loads(json.dumps(flatten(config), default=str))  # as every rank reads it: tuples are lists
    me = {"world_size": penv.world_size, "digest": config_digest(flat), "config": flat,
          "host": socket.gethostname(), "pid": os.getpid()}
    prefix = f"{MEET_PREFIX}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{prefix}{penv.rank}", json.dumps(me, default=str))
    store.add(f"{prefix}arrived", 1)
    deadline = time.monotonic() + timeout_s
    try:
        if penv.rank == 0:
            verdict = _judge(store, prefix, me, penv, deadline, timeout_s)
            store.set(f"{prefix}verdict", verdict)
            if verdict != "ok":
                _until_read(store, prefix, penv.world_size)
        else:
            verdict = _await_verdict(store, prefix, me, penv, deadline, timeout_s)
            store.add(f"{prefix}read", 1)
    except (RuntimeError, OSError) as e:  # torch's DistNetworkError and DistStoreError are RuntimeErrors
        raise LaunchError(f"rank {penv.rank}: the rendezvous store at {penv.master_addr}:{penv.master_port} went away "
                          f"while the ranks met (rank 0 stopped: see its error) [{_first_line(e)}]") from None
    if verdict != "ok":
        raise LaunchError(verdict)


def _judge(store: Store, prefix: str, me: dict, penv: ProcessEnv, deadline: float, timeout_s: float) -> str:
    pending, seen = set(range(1, penv.world_size)), 1
    while pending:
        arrived = store.add(f"{prefix}arrived", 0)
        if arrived > seen:  # someone new: read the records not read yet
            seen = arrived
            for rank in sorted(pending):
                if store.check([f"{prefix}{rank}"]):
                    pending.discard(rank)
                    problem = _disagreement(me, 0, json.loads(store.get(f"{prefix}{rank}")), rank)
                    if problem:
                        return problem
            if arrived > penv.world_size:
                return (f"{arrived} processes joined the rendezvous at {penv.master_addr}:{penv.master_port} for a "
                        f"world of {penv.world_size}: some were started with a larger WORLD_SIZE, or twice; start "
                        "exactly WORLD_SIZE ranks numbered 0..WORLD_SIZE-1")
        if pending and time.monotonic() > deadline:
            return (f"{penv.world_size - len(pending)}/{penv.world_size} ranks arrived at the rendezvous "
                    f"{penv.master_addr}:{penv.master_port} within parallel.timeout_s={timeout_s:g} s; missing: "
                    f"rank{'s' if len(pending) > 1 else ''} {', '.join(map(str, sorted(pending)))}: start them "
                    f"(same MASTER_ADDR, MASTER_PORT, WORLD_SIZE={penv.world_size}) or raise parallel.timeout_s")
        if pending:
            time.sleep(MEET_POLL_S)
    return "ok"


def _until_read(store: Store, prefix: str, world_size: int, wait_s: float = 5.0) -> None:
    """Rank 0's store lives in its process: keep it up until the others have read a bad verdict (or briefly)."""
    end = time.monotonic() + wait_s
    while store.add(f"{prefix}read", 0) < store.add(f"{prefix}arrived", 0) - 1 and time.monotonic() < end:
        time.sleep(MEET_POLL_S)


def _await_verdict(store: Store, prefix: str, me: dict, penv: ProcessEnv, deadline: float, timeout_s: float) -> str:
    checked = False
    while True:
        if not checked and store.check([f"{prefix}0"]):
            checked = True
            problem = _disagreement(json.loads(store.get(f"{prefix}0")), 0, me, penv.rank)
            if problem and "WORLD_SIZE" in problem:
                return problem  # rank 0 may wait for a rank that never comes: do not wait for its verdict
        if store.check([f"{prefix}verdict"]):
            return store.get(f"{prefix}verdict").decode()
        # Rank 0 posts its verdict by the same deadline; the margin covers the clocks' start-up skew.
        if time.monotonic() > deadline + 10:
            return (f"rank {penv.rank}: rank 0 did not confirm within parallel.timeout_s={timeout_s:g} s that every "
                    f"rank arrived at {penv.master_addr}:{penv.master_port}: check rank 0's output")
        time.sleep(MEET_POLL_S)


def _disagreement(zero: dict, zero_rank: int, other: dict, rank: int) -> str:
    """'' when rank `rank` agrees with rank 0, else the line that says how they differ."""
    where = f"rank {rank} ({other['host']}, pid {other['pid']})"
    if other["world_size"] != zero["world_size"]:
        return (f"{where} has WORLD_SIZE={other['world_size']} but rank {zero_rank} has WORLD_SIZE="
                f"{zero['world_size']}: start every rank with the same world size")
    if other["digest"] != zero["digest"]:
        a, b = zero["config"], other["config"]
        keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
        shown = ", ".join(f"{k}={b.get(k, '<unset>')!r} (rank {zero_rank}: {a.get(k, '<unset>')!r})" for k in keys[:5])
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        return (f"{where} runs another config than rank {zero_rank} (config hash {other['digest']} vs "
                f"{zero['digest']}): {shown}{more}; start every rank with the same config file and --set options")
    return ""


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port, host being an address or a name (bound to the address it resolves
    to here, the first one, as clients on this host try it first; every interface if a name resolves to a
    loopback address)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise LaunchError(f"MASTER_ADDR={host!r} does not resolve on rank 0's host ({e.strerror}): set it to "
                          "rank 0's IP address") from None
    if ipaddress.ip_address(addr[0]).is_loopback and not is_loopback(host):
        # A host name that resolves to loopback here only (Debian's "127.0.1.1 <hostname>" line) may be the
        # LAN address other nodes reach: listen on every interface, as torch itself would.
        addr = ("", *addr[1:])
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does: a restart rebinds at once
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)  # every rank connects at once
    except OSError as e:
        sock.close()
        raise LaunchError(_bind_error(host, addr[0], port, e)) from None
    return sock


def _bind_error(host: str, ip: str, port: int, e: OSError) -> str:
    where = host if host == ip else f"{host} ({ip})"
    if e.errno == errno.EADDRINUSE:
        return (f"rank 0 cannot serve the rendezvous on {where} port {port}: the port is in use; set MASTER_PORT "
                "to a free port")
    if e.errno == errno.EADDRNOTAVAIL:
        return (f"rank 0 cannot serve the rendezvous on {where}: not an address of this host; set MASTER_ADDR to "
                "an address of rank 0's host that the other ranks reach")
    return f"rank 0 cannot serve the rendezvous on {where} port {port}: {e.strerror}"
