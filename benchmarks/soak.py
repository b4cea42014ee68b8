"""Soak: the tiny config on 4 ranks under torchrun --max-restarts, a random rank SIGKILLed every few minutes,
against an uninterrupted run of the same steps. Not part of CI (it takes a bit over 2 x --minutes).

    .venv/bin/python benchmarks/soak.py                      # 30 minutes of killing, the issue's soak
    .venv/bin/python benchmarks/soak.py --minutes 4 --kill-every 1 --out runs/soak-4min

1. calibrate: a 12-step run measures the step time, which fixes train.steps at --minutes of uninterrupted
   training (or give --steps); the killed run lasts that plus its restarts;
2. reference: the same steps without faults;
3. killed: torchrun --max-restarts=100 --rdzv-backend=c10d; every --kill-every minutes (x0.5..1.5, at random)
   one random worker process gets SIGKILL; each restart resumes from the newest complete checkpoint by itself.

Reported (stdout and <out>/soak.json): kills, restarts, per restart the steps lost (completed steps that had to
be redone: must be <= log.save_interval) and the seconds from the kill to the first step after it; the final
loss of both runs and whether the final checkpoints are bitwise equal (same layout on CPU: they must be).
Requires TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (set here): see docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

try:
    from benchmarks.common import rank_of, torchrun_workers
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import rank_of, torchrun_workers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEP_LINE = re.compile(r"^step\s+(\d+)/(\d+)\s+loss ([0-9.]+)")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, run_dir: Path, steps: int, max_restarts: int) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           "-m", "coe_dist.train", "--config", str(TINY), "--resume", "auto"]
    sets = [f"log.run_dir={run_dir}", f"train.steps={steps}", f"moe.ep_size={args.ep}", "log.log_interval=1",
            f"log.save_interval={args.save_interval}", "log.keep_last=3", "log.tensorboard=false",
            f"parallel.timeout_s={args.timeout_s}", *args.set]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env(), cwd=ROOT,
                            start_new_session=True)


def wait(proc: subprocess.Popen, limit_s: float) -> int:
    try:
        return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: torchrun and its workers
        proc.wait()
        return -9


def _stamped(log: Path):
    stamps = log.with_suffix(".steps")
    if stamps.exists():
        for line in stamps.read_text().splitlines():
            t, s = line.split()
            yield float(t), int(s)


class StepWatch:
    """Tails a run's log and stamps each `step N/M` line with the time it appeared."""

    def __init__(self, log: Path) -> None:
        self.log, self.pos, self.last = log, 0, 0
        self.stamps = log.with_suffix(".steps").open("w")

    def poll(self) -> int:
        try:
            with self.log.open() as f:
                f.seek(self.pos)
                chunk = f.read()
        except OSError:
            return self.last
        end = chunk.rfind("\n") + 1
        self.pos += len(chunk[:end].encode())
        for line in chunk[:end].splitlines():
            m = STEP_LINE.match(line)
            if m:
                self.last = int(m.group(1))
                self.stamps.write(f"{time.time():.3f} {self.last}\n")
                self.stamps.flush()
        return self.last


def calibrate(args, out: Path) -> tuple[int, float, float]:
    run_dir = out / "calibrate"
    shutil.rmtree(run_dir, ignore_errors=True)
    log = out / "calibrate.log"
    t0 = time.time()
    proc = start(torchrun(args, run_dir, 12, 0), log)
    watch = StepWatch(log)
    while proc.poll() is None:
        watch.poll()
        time.sleep(0.5)
    watch.poll()
    stamps = list(_stamped(log))
    if proc.returncode != 0 or len(stamps) < 12:
        sys.exit(f"soak: calibration run failed; see {log}")
    startup = stamps[0][0] - t0
    per_step = (stamps[-1][0] - stamps[1][0]) / (len(stamps) - 2)
    # Steps for --minutes of training without faults: the killed run lasts that plus its restarts.
    steps = int(args.minutes * 60 / per_step)
    return max(steps, 2 * args.save_interval), startup, per_step


def final_loss(log: Path) -> tuple[int, float] | None:
    last = None
    for line in log.read_text().splitlines():
        m = STEP_LINE.match(line)
        if m:
            last = (int(m.group(1)), float(m.group(3)))
    return last


def metrics_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "lm_loss" in rec:
            out[rec["step"]] = rec["lm_loss"]
    return out


def same_checkpoint(a: Path, b: Path) -> bool:
    import torch

    files = sorted(p.name for p in a.glob("*.pt"))
    if files != sorted(p.name for p in b.glob("*.pt")):
        return False
    for name in files:
        ta, tb = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def restarts_from_log(log: Path) -> list[dict]:
    """Per restart: the newest step completed before it and the step it resumed from (rank 0's view)."""
    out, last_done = [], 0
    for line in log.read_text().splitlines():
        m = STEP_LINE.match(line)
        if m:
            last_done = int(m.group(1))
        m = re.search(r"coe-dist: resumed from \S+ \(step (\d+)", line)
        if m and out:
            out[-1].update(resumed_from=int(m.group(1)), lost_steps=out[-1]["last_completed"] - int(m.group(1)))
        m = re.search(r"coe-dist: restart (\d+) of this job", line)
        if m:
            out.append({"restart": int(m.group(1)), "last_completed": last_done,
                        "resumed_from": 0, "lost_steps": last_done})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="length of the killed run (default 30)")
    p.add_argument("--kill-every", type=float, default=4.0, help="minutes between kills, on average (default 4)")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--ep", type=int, default=2, help="moe.ep_size (default 2: 2 expert-data-parallel replicas)")
    p.add_argument("--save-interval", type=int, default=10)
    p.add_argument("--timeout-s", type=float, default=120.0, help="parallel.timeout_s")
    p.add_argument("--steps", type=int, help="train.steps (default: calibrated from --minutes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="more config overrides")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "soak")
    args = p.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    started = time.time()

    startup = per_step = None
    steps = args.steps
    if steps is None:
        steps, startup, per_step = calibrate(args, out)
        print(f"soak: calibration: start-up {startup:.0f} s, {per_step:.2f} s/step -> train.steps={steps}", flush=True)

    # The uninterrupted reference.
    ref_dir, ref_log = out / "reference", out / "reference.log"
    shutil.rmtree(ref_dir, ignore_errors=True)
    t0 = time.time()
    rc = wait(start(torchrun(args, ref_dir, steps, 0), ref_log), 6 * args.minutes * 60 + 600)
    ref_seconds = time.time() - t0
    if rc != 0:
        sys.exit(f"soak: the reference run failed (exit {rc}); see {ref_log}")
    print(f"soak: reference: {steps} steps in {ref_seconds:.0f} s", flush=True)

    # The killed run.
    run_dir, log = out / "killed", out / "killed.log"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.time()
    proc = start(torchrun(args, run_dir, steps, 100), log)
    watch = StepWatch(log)
    kills: list[dict] = []
    next_kill = t0 + args.kill_every * 60 * rng.uniform(0.5, 1.5)
    deadline = t0 + 6 * args.minutes * 60 + 600
    while proc.poll() is None and time.time() < deadline:
        done = watch.poll()
        if time.time() >= next_kill and done < steps - 1:
            pids = torchrun_workers(proc.pid)
            if pids:
                victim = rng.choice(pids)
                rank = rank_of(victim)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append({"t": round(time.time() - t0, 1), "pid": victim, "rank": rank, "after_step": done})
                    print(f"soak: {time.time() - t0:6.0f} s: SIGKILL rank {rank} (pid {victim}) after step {done}",
                          flush=True)
                except ProcessLookupError:
                    pass
            next_kill = time.time() + args.kill_every * 60 * rng.uniform(0.5, 1.5)
        time.sleep(0.5)
    rc = wait(proc, 1) if proc.poll() is None else proc.returncode
    watch.poll()
    killed_seconds = time.time() - t0

    restarts = restarts_from_log(log)
    stamps = list(_stamped(log))
    for kill, restart in zip(kills, restarts, strict=False):  # downtime: the kill to the first step after resuming
        after = [t for t, s in stamps if t - t0 > kill["t"] and s == restart["resumed_from"] + 1]
        restart["seconds_to_next_step"] = round(after[0] - t0 - kill["t"], 1) if after else None
    ref_losses, got_losses = metrics_losses(ref_dir), metrics_losses(run_dir) if rc == 0 else {}
    ckpt = f"checkpoints/step_{steps}"
    report = {
        "minutes_requested": args.minutes, "nproc": args.nproc, "ep_size": args.ep, "train_steps": steps,
        "save_interval": args.save_interval, "calibration": {"startup_s": startup, "s_per_step": per_step},
        "reference_seconds": round(ref_seconds, 1), "killed_seconds": round(killed_seconds, 1),
        "killed_exit_code": rc, "kills": kills, "restarts": restarts,
        "max_seconds_to_next_step": max((r.get("seconds_to_next_step") or 0 for r in restarts), default=0),
        "max_lost_steps": max((r["lost_steps"] for r in restarts), default=0),
        "lost_steps_ok": all(r["lost_steps"] <= args.save_interval for r in restarts),
        "final_loss_reference": ref_losses.get(steps), "final_loss_killed": got_losses.get(steps),
        "losses_equal_after_every_resume": bool(got_losses) and all(
            got_losses[s] == ref_losses[s] for s in got_losses),
        "final_checkpoint_bitwise_equal": rc == 0 and same_checkpoint(ref_dir / ckpt, run_dir / ckpt),
        "wall_seconds": round(time.time() - started, 1),
    }
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    ok = rc == 0 and report["lost_steps_ok"] and report["final_checkpoint_bitwise_equal"]
    print(f"soak: {'PASS' if ok else 'FAIL'}: {len(kills)} kills, {len(restarts)} restarts, at most "
          f"{report['max_lost_steps']} steps lost per restart (save_interval {args.save_interval}), final loss "
          f"{report['final_loss_killed']} vs {report['final_loss_reference']} uninterrupted")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
