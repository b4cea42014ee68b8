"""Faults injected for real (real processes, signals, files) and what the trainer promises about each.

    rank death       SIGKILL of one rank under torchrun --max-restarts: the job restarts, resumes from the
                     newest complete checkpoint, and ends bitwise equal to an uninterrupted run
    hangs            a SIGSTOPped rank: the others fail within parallel.timeout_s naming the operation and
                     the rank; routing metadata that does not add up is refused before the all-to-all
    numerics         nan/inf loss or gradients: `stop` saves the last good state, `skip` leaves the update
                     out (weights, Adam moments and lr schedule untouched) and stops after M in a row;
                     router collapse is warned about with the layer and iteration
    checkpoints      truncated files are named, old checkpoints go only once a new one is complete
See docs/reliability.md. Runs here are 2-rank gloo jobs of the tiny config, 6 steps of 16 x 128 tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coe_dist import faults
from coe_dist.train import checkpoint, guards

from trainrun import ROOT, TINY, free_port, losses, metrics, run_train

FAST = ("train.dtype=fp32", "log.log_interval=1", "data.num_documents=400", "log.sample_log=true",
        "log.eval_batches=0", "log.tensorboard=false", "moe.ep_size=2", "train.steps=6", "log.keep_last=10")
TIMEOUT = 300  # seconds, per training job


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.pt")):
        out.update({f"{f.name}:{k}": v for k, v in torch.load(f, weights_only=True).items()})
    return out


def assert_same_state(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and ta
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


def sample_records(run_dir: Path, rank: int) -> list[tuple[int, list[int]]]:
    lines = (run_dir / "samples" / f"rank{rank}.jsonl").read_text().splitlines()
    return [(r["step"], r["samples"]) for r in map(json.loads, lines)]


def meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: 6 steps at world 2, ep 2, a checkpoint after every step."""
    run_dir = tmp_path_factory.mktemp("straight")
    proc = run_train(2, run_dir, *FAST, "log.save_interval=1", "log.collapse_share=0.01", "log.collapse_steps=3",
                     timeout=TIMEOUT)
    return run_dir, proc


# ---------------------------------------------------------------- rank death

def test_killed_rank_restarts_and_matches_uninterrupted_run(tmp_path, straight):
    """SIGKILL rank 1 at the start of step 5 (first attempt only): torchrun restarts both ranks, they resume
    from step_4 by themselves, and steps 5-6 (losses, samples, final weights and moments) equal the
    uninterrupted run bit for bit."""
    ref, _ = straight
    args = ["--config", str(TINY), "--set", f"log.run_dir={tmp_path}"]
    for o in (*FAST, "log.save_interval=1", "log.collapse_share=0.01", "log.collapse_steps=3"):
        args += ["--set", o]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "coe_dist.train", *args]
    # Without it the restarted ranks can read the first attempt's gloo addresses (pytorch/pytorch#135712).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COE_DIST_FAULT": "train.step@step5@rank1@restart0:kill",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "restart 1 of this job" in proc.stdout, proc.stdout[-3000:]
    assert f"resumed from {tmp_path}/checkpoints/step_4 (step 4" in proc.stdout
    # Lost work: the kill came before step 5 finished, the resume point is step 4: nothing completed was lost.
    got, want = losses(tmp_path), losses(ref)
    assert [got[s] for s in (5, 6)] == [want[s] for s in (5, 6)]  # bitwise: the same floats
    assert_same_state(tmp_path / "checkpoints" / "step_6", ref / "checkpoints" / "step_6")
    for rank in (0, 1):
        records = sample_records(tmp_path, rank)
        assert [s for s, _ in records] == [1, 2, 3, 4, 5, 6]  # none repeated, none skipped
        assert records == sample_records(ref, rank)


# ---------------------------------------------------------------- cancellation

def test_sigterm_to_the_whole_job_saves_then_stops(tmp_path):
    """What scancel does under Slurm's process tracking (and `kill -- -PGID`): SIGTERM to torchrun and to every
    trainer at once; torchrun passes its copy on, so each trainer sees SIGTERM twice within moments. That is one
    request to stop: the trainers finish the step, save a complete checkpoint and exit 143."""
    args = ["--config", str(TINY), "--set", f"log.run_dir={tmp_path}"]
    for o in (*FAST, "train.steps=400"):
        args += ["--set", o]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "coe_dist.train", *args]
    # The save pauses 3 s before its rename, so that torchrun's copy arrives while the trainers are at work.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGUSR1",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "COE_DIST_FAULT": "checkpoint.before_rename:sleep=3"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (tmp_path / "metrics.jsonl").is_file() or len(losses(tmp_path)) < 2:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.2)
        trainers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(trainers) == 2, trainers
        for pid in trainers:  # Slurm reaches them directly (torchrun starts each in a session of its own) ...
            os.kill(int(pid), signal.SIGTERM)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)  # ... and torchrun, which passes SIGTERM on to them again
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "stopped by signal at step" in out, out[-4000:]
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    step = int(checkpoint.verify(tmp_path / "checkpoints" / latest)["step"])
    assert 2 <= step < 400
    assert f"stopped by signal at step {step};" in out


def test_a_repeated_sigterm_later_ends_the_process(monkeypatch):
    """Duplicates within the grace window are one request; one after it means "now" (a rank stuck in a
    collective would otherwise wait for its launcher's SIGKILL)."""
    from coe_dist.train import loop

    now, killed = [100.0], []
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(loop.os, "kill", lambda pid, sig: killed.append(sig))
    monkeypatch.setattr(loop.signal, "signal", lambda sig, handler: None)
    stop = loop.StopSignal()
    stop._handle(signal.SIGTERM, None)
    now[0] += 1.0
    stop._handle(signal.SIGTERM, None)  # torchrun's forwarded copy
    assert stop.signum == signal.SIGTERM and killed == []
    now[0] += loop.StopSignal.REPEAT_AFTER_S
    stop._handle(signal.SIGTERM, None)
    assert killed == [signal.SIGTERM]


# ---------------------------------------------------------------- hangs and bad routing metadata

def spawn(run_dir: Path, fault: str, *overrides: str) -> list[subprocess.Popen]:
    """Two ranks started directly (no torchrun, so nothing restarts or cleans up behind the test)."""
    port = free_port()
    args = ["--config", str(TINY), "--set", f"log.run_dir={run_dir}"]
    for o in (*FAST, *overrides):
        args += ["--set", o]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "COE_DIST_FAULT": fault}
        procs.append(subprocess.Popen([sys.executable, "-m", "coe_dist.train", *args], env=env, cwd=ROOT,
                                      stdout=open(run_dir.parent / f"{run_dir.name}.rank{rank}.out", "w"),
                                      stderr=open(run_dir.parent / f"{run_dir.name}.rank{rank}.err", "w")))
    return procs


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _error_lines(run_dir: Path, rank: int) -> list[str]:
    text = (run_dir.parent / f"{run_dir.name}.rank{rank}.err").read_text()
    return [line for line in text.splitlines() if line.startswith("coe-dist: error")]


def test_stopped_rank_becomes_an_error_naming_it(tmp_path):
    """Rank 1 SIGSTOPs itself at the start of step 3. Rank 0 waits in the expert all-to-all (a DeepSpeed
    expert group, which torch would give a 30-minute timeout) and fails within parallel.timeout_s."""
    run_dir, timeout_s = tmp_path / "run", 8
    procs = spawn(run_dir, "train.step@step3@rank1:stop", f"parallel.timeout_s={timeout_s}")
    try:
        deadline, stopped_at = time.time() + TIMEOUT, None
        while procs[0].poll() is None and time.time() < deadline:
            if stopped_at is None and _state(procs[1].pid) == "T":
                stopped_at = time.time()
            time.sleep(0.1)
        assert procs[0].poll() == 1, "rank 0 did not fail"
        assert stopped_at is not None
        waited = time.time() - stopped_at
        assert waited < timeout_s + 15, waited  # the timeout, then a few seconds to report and exit
        assert _state(procs[1].pid) == "T"  # rank 1 is still stopped: the error came from rank 0's timeout
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=60)
    lines = _error_lines(run_dir, 0)
    assert len(lines) == 1, lines
    line = lines[0]
    for words in ("rank 0:", "all_to_all_single in the forward", f"timed out after {timeout_s} s", "at step 3",
                  "rank 1 last started step 2"):
        assert words in line, line


def test_mismatched_routing_metadata_is_refused(tmp_path):
    """Rank 1 sends rank 0 expert counts that do not add up to the total it announces (step 2): rank 0 refuses
    the all-to-all, naming layer, iteration and sender; rank 1 then loses its peer at once instead of hanging."""
    run_dir = tmp_path / "run"
    procs = spawn(run_dir, "dispatch.counts@step2@rank1:corrupt", "parallel.timeout_s=120", "train.steps=3")
    try:
        codes = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [1, 1]
    (line,) = _error_lines(run_dir, 0)
    assert "routing metadata mismatch in layer 0 iteration 0 on expert-parallel rank 0: rank 1" in line, line
    assert "refusing the all-to-all" in line
    (line,) = _error_lines(run_dir, 1)
    assert "lost a peer at step 2" in line and "timed out" not in line, line
    assert not (run_dir / "checkpoints" / "step_2").exists()


# ---------------------------------------------------------------- numerics

def test_nan_stop_saves_the_last_good_state(tmp_path, straight):
    """nan_policy=stop (the default): a nan loss on rank 1 at step 4 leaves the update out on every rank,
    saves the state after step 3 (bitwise the uninterrupted run's) and exits 1 naming the step."""
    ref, _ = straight
    proc = run_train(2, tmp_path, *FAST, "log.save_interval=2", check=False, timeout=TIMEOUT,
                     env={"COE_DIST_FAULT": "train.loss@step4@rank1:nan"})
    assert proc.returncode != 0
    # Each rank prints the same one line (torchrun may stop the second before it does).
    errors = [line for line in proc.stderr.splitlines() if line.startswith("coe-dist: error")]
    assert errors and all(e == errors[0] for e in errors), errors
    assert "stopped at step 4: non-finite loss (lm nan" in errors[0] and "on 1 of 2 ranks;" in errors[0]
    assert "last good state (after step 3)" in errors[0] and "step_3" in errors[0]
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_3" and not (root / "step_4").exists()
    saved = meta(root / "step_3")
    assert saved["stopped"]["step"] == 4 and saved["optimizer_step"] == 3
    assert saved["data"] == meta(ref / "checkpoints" / "step_3")["data"]  # step 4's batch is replayed on resume
    assert_same_state(root / "step_3", ref / "checkpoints" / "step_3")
    assert json.loads((tmp_path / "stopped.json").read_text())["step"] == 4


def test_nan_skip_leaves_updates_out_and_stops_after_a_streak(tmp_path, straight):
    """nan_policy=skip, max_consecutive_nan=2: a nan loss (step 2, rank 1), then an infinite gradient with a
    finite loss (step 4, rank 0) and a nan loss (step 5, rank 0). Skipped steps change no weight, Adam moment
    or learning rate; two in a row stop the run with the state saved."""
    ref, _ = straight
    fault = "train.loss@step2@rank1:nan,train.grad@step4@rank0:inf,train.loss@step5@rank0:nan"
    proc = run_train(2, tmp_path, *FAST, "log.save_interval=1", "train.nan_policy=skip",
                     "train.max_consecutive_nan=2", check=False, timeout=TIMEOUT, env={"COE_DIST_FAULT": fault})
    assert proc.returncode != 0
    assert "step 2: non-finite loss (lm nan, aux" in proc.stdout
    assert "update skipped (1 in a row, 1 in all" in proc.stdout
    assert "step 4: non-finite gradient norm (loss finite): update skipped (1 in a row, 2 in all" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("coe-dist: error")]
    assert errors and "stopped at step 5" in errors[0] and "2 steps in a row skipped (4..5)" in errors[0], errors
    root = tmp_path / "checkpoints"
    assert_same_state(root / "step_1", root / "step_2")  # step 2 left out
    assert_same_state(root / "step_1", ref / "checkpoints" / "step_1")
    assert_same_state(root / "step_3", root / "step_5")  # steps 4 and 5 left out
    assert (meta(root / "step_5")["optimizer_step"], meta(root / "step_5")["skipped_steps"]) == (2, 3)
    lr = {m["step"]: m["lr"] for m in metrics(tmp_path) if "lr" in m}
    lr_ref = {m["step"]: m["lr"] for m in metrics(ref) if "lr" in m}
    assert lr[2] == lr_ref[1] and lr[3] == lr_ref[2]  # the schedule did not advance on the skipped step
    skipped = {m["step"]: m["skipped_steps"] for m in metrics(tmp_path) if "skipped_steps" in m}
    assert skipped[3] == 1 and skipped[4] == 2


def test_router_collapse_is_warned_about(straight):
    """log.collapse_share=0.01 makes every (layer, iteration) 'collapsed': one warning each, after 3 steps."""
    _, proc = straight
    warnings = [line for line in proc.stdout.splitlines() if "router collapse" in line]
    where = sorted(line.split(": expert")[0].split("collapse in ")[1] for line in warnings)
    assert where == ["layer 0 iteration 0", "layer 0 iteration 1", "layer 1 iteration 0", "layer 1 iteration 1"]
    assert all("on 3 logging steps in a row (steps 1..3)" in line for line in warnings), warnings


def test_collapse_watch_counts_runs():
    watch = guards.CollapseWatch(share=0.5, steps=2, top_k=2)
    balanced = torch.tensor([10.0, 10, 10, 10])  # each expert: 25% of the copies, 50% of the tokens
    collapsed = torch.tensor([19.0, 9, 6, 6])  # 20 tokens x 2 copies: expert 0 got 19 of the 20 tokens
    tag = "moe/layer3/iter1/expert_load"
    assert watch.update(1, {tag: balanced})[1] == []  # share 0.5 is not more than 0.5
    scalars, warnings = watch.update(2, {tag: collapsed})
    assert scalars["moe/layer3/iter1/max_token_share"] == pytest.approx(19 / 20) and not warnings
    _, warnings = watch.update(3, {tag: collapsed})
    assert len(warnings) == 1 and "layer 3 iteration 1: expert 0" in warnings[0] and "steps 2..3" in warnings[0]
    assert watch.update(4, {tag: collapsed})[1] == []  # once per run
    watch.update(5, {tag: balanced})
    watch.update(6, {tag: collapsed})
    assert len(watch.update(7, {tag: collapsed})[1]) == 1  # a new run warns again
    # The threshold runs from the even split (2 of 4: 50% of tokens) to all tokens: 0.5 of the way is 75%.
    # 70% of the tokens is below it however long it lasts, though above log.collapse_share as a raw share.
    watch = guards.CollapseWatch(share=0.5, steps=1, top_k=2)
    assert all(watch.update(s, {tag: torch.tensor([14.0, 10, 8, 8])})[1] == [] for s in range(5))
    assert len(watch.update(6, {tag: torch.tensor([16.0, 10, 8, 6])})[1]) == 1  # 80%
    # A dense control (top_k = num_experts): every expert takes every token, which is no collapse.
    dense = guards.CollapseWatch(share=0.5, steps=1, top_k=4)
    scalars, warnings = dense.update(1, {tag: torch.tensor([10.0, 10, 10, 10])})
    assert scalars["moe/layer3/iter1/max_token_share"] == 1.0 and warnings == []


def test_nonfinite_guard_policies():
    stop = guards.NonFiniteGuard("stop", 5)
    assert stop.record(1, False) == "ok" and stop.record(2, True) == "stop"
    skip = guards.NonFiniteGuard("skip", 2)
    assert [skip.record(s, bad) for s, bad in [(1, True), (2, False), (3, True), (4, True)]] == \
        ["skip", "ok", "skip", "stop"]
    assert skip.skipped_total == 3 and skip.streak == [3, 4]


def test_restart_does_not_replay_a_numerics_stop(tmp_path, monkeypatch):
    from coe_dist.train import loop

    (tmp_path / loop.STOPPED).write_text(json.dumps({"step": 4, "reason": "non-finite loss at step 4"}))
    ckpt = tmp_path / "checkpoints" / "step_3"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(guards.NumericsError, match="not restarting automatically: the run stopped at step 4"):
        loop._refuse_to_repeat_a_stop(tmp_path, ckpt)
    (ckpt.parent / "step_5").mkdir()
    (ckpt.parent / "step_5" / "meta.json").write_text(json.dumps({"step": 5}))
    loop._refuse_to_repeat_a_stop(tmp_path, ckpt.parent / "step_5")  # past the stop: a restart is fine


# ---------------------------------------------------------------- fault specs, heartbeats, error text

def test_fault_filters(monkeypatch):
    monkeypatch.setenv("COE_DIST_FAULT", "p@step3@rank1@restart0:nan,q:corrupt")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert faults.fault_point("p", 3) == "nan" and faults.fault_point("p", 2) is None
    faults.set_step(3)
    assert faults.fault_point("p") == "nan" and faults.fault_point("q") == "corrupt"
    faults.set_step(None)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert faults.fault_point("p", 3) is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert faults.fault_point("p", 3) is None
    monkeypatch.setenv("COE_DIST_FAULT", "p:raise=ENOSPC")
    with pytest.raises(OSError, match="No space left on device"):
        faults.fault_point("p", 1)
    for bad in ("p", "p@stp3:kill", "p:boom", "p:raise=ENOPE", ":kill"):
        with pytest.raises(faults.FaultSpecError):
            faults.parse(bad)


def test_heartbeat_names_the_rank_behind():
    from torch.distributed import HashStore

    beats = [guards.Heartbeat(r, 3, restart=0) for r in range(3)]
    store = HashStore()
    for b in beats:
        b.store = store
    beats[0].beat(7)
    beats[1].beat(6)
    said = beats[0].laggards(7)
    assert "rank 1 last started step 6" in said and "rank 2 never started a step" in said
    beats[1].beat(7)
    beats[2].beat(7)
    assert beats[0].laggards(7) == "every rank started step 7"


def test_collective_failure_text():
    err = RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 8000ms for recv operation "
                       "to complete")
    out = guards.collective_failure(err, "step all-reduce", 9, 2, 8, None)
    assert str(out).startswith("rank 2: a collective in the step all-reduce timed out after 8 s (parallel.timeout_s)"
                               " at step 9 [Timed out waiting 8000ms for recv operation to complete]")
    assert guards.collective_failure(ValueError("timed out"), "x", 1, 0, 1, None) is None
    assert guards.collective_failure(RuntimeError("shape mismatch"), "x", 1, 0, 1, None) is None
    assert guards.collective_failure(RuntimeError("gloo does not support bf16 here"), "x", 1, 0, 1, None) is None
    lost = guards.collective_failure(RuntimeError("[pair.cc:534] Read error [10.0.0.2]:4411: Connection reset by "
                                                  "peer"), "backward", 4, 0, 60, None)
    assert "lost a peer at step 4 [Read error [10.0.0.2]:4411: Connection reset by peer]" in str(lost)


def test_async_all_to_all_failure_is_named():
    """The expert all-to-all is waited for outside torch.distributed's frames: its failure is still named."""
    from types import SimpleNamespace

    from coe_dist.parallel import dispatch

    class FailingWork:
        def wait(self):
            raise RuntimeError("[/x/gloo/transport/tcp/pair.cc:534] Timed out waiting 8000ms for recv operation")

    owner = SimpleNamespace(_timed=lambda *a: contextlib.nullcontext())
    flight = dispatch._InFlight(owner, 0, "dispatch", [1], [1])
    flight.work = FailingWork()
    with pytest.raises(RuntimeError) as info:
        flight.wait(torch.zeros(1, 2), "fwd")
    out = guards.collective_failure(info.value, "forward (expert all-to-all)", 3, 1, 8, None)
    assert str(out).startswith("rank 1: all_to_all_single in the forward (expert all-to-all) timed out after 8 s")


# ---------------------------------------------------------------- checkpoint safety (in process)

def _tiny():
    from types import SimpleNamespace

    from coe_dist.config import ModelConfig, MoEConfig
    from coe_dist.model import CoETransformer

    model = CoETransformer(ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2,
                                       ffn_hidden_size=32, max_seq_len=8),
                           MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8), seed=0)
    return model, SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters()))


def test_old_checkpoints_go_only_after_a_new_one_is_complete(tmp_path, monkeypatch):
    model, engine = _tiny()
    root = tmp_path / "checkpoints"
    checkpoint.save(tmp_path, 1, model, engine, {"optimizer_step": 1}, keep_last=1)
    # A full disk while saving step 2: step 1 stays, complete and `latest`.
    monkeypatch.setenv("COE_DIST_FAULT", "checkpoint.before_rename@step2:raise=ENOSPC")
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        checkpoint.save(tmp_path, 2, model, engine, {"optimizer_step": 2}, keep_last=1)
    assert checkpoint.newest_verified(tmp_path, warn=lambda m: None)[0] == root / "step_1"
    assert (root / "latest").read_text().strip() == "step_1" and not (root / "step_2").exists()
    # Step 3: at the moment it is complete but not yet renamed, step 1 still exists; afterwards it is pruned.
    monkeypatch.delenv("COE_DIST_FAULT")
    seen = []
    real = checkpoint.fault_point
    monkeypatch.setattr(checkpoint, "fault_point", lambda name, step=None: seen.append(
        (name, step, (root / "step_1" / "meta.json").is_file())) or real(name, step))
    checkpoint.save(tmp_path, 3, model, engine, {"optimizer_step": 3}, keep_last=1)
    assert seen == [("checkpoint.before_rename", 3, True)]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_3"]
    assert (root / "latest").read_text().strip() == "step_3"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta"])
def test_damaged_checkpoint_is_named_and_skipped(tmp_path, damage):
    model, engine = _tiny()
    for step in (1, 2):
        checkpoint.save(tmp_path, step, model, engine, {"optimizer_step": step}, keep_last=5)
    newest = tmp_path / "checkpoints" / "step_2"
    bad = newest / ("meta.json" if damage == "meta" else "experts-0.pt")
    data = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(data[: len(data) // 3])
    elif damage == "flip":
        bad.write_bytes(data[:100] + bytes([data[100] ^ 0x10]) + data[101:])
    elif damage == "delete":
        bad.unlink()
    else:
        bad.write_bytes(data[: len(data) // 2])
    warnings: list[str] = []
    assert checkpoint.newest_verified(tmp_path, warn=warnings.append)[0] == tmp_path / "checkpoints" / "step_1"
    expected = {"truncate": "checksum mismatch", "flip": "checksum mismatch", "delete": "missing",
                "meta": "not valid JSON"}[damage]
    assert any(str(bad) in w and expected in w for w in warnings), warnings
    assert any("'latest' names step_2 but the newest good checkpoint is step_1" in w for w in warnings), warnings
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        checkpoint.verify(newest)


def test_atomic_write_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    from coe_dist.atomic_file import write_atomic

    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "stats.bin"
    target.write_bytes(b"old")
    link = tmp_path / "stats.bin"
    link.symlink_to(target)
    write_atomic(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary file went next to target
    write_atomic(tmp_path / "plain.txt", "text")
    assert (tmp_path / "plain.txt").read_text() == "text"
