"""Item `train`: a few real training steps of the config at its layout, a checkpoint, a resume, bit for bit.

    run A: S steps of the config (the trainer of `coe-dist train`, this process group), checkpoints after
           step S-1 and step S                                              -> <out>/train
    run B: resume from A's step S-1 checkpoint, run step S                  -> <out>/resume
    -> step S's loss of B == A's, and every tensor of B's step-S checkpoint == A's (torch.equal): saving and
       loading lose nothing, and the step after a resume is the step without one. Also: step time, checkpoint
       size on disk. The trainer's log goes to <out>/train.log; both runs are removed when the item passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from coe_dist.check.verdict import FAIL, PASS, Context, Verdict, gather


def _run_config(ctx: Context, run_dir: Path):
    cfg = ctx.cfg
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=ctx.steps),
        log=dataclasses.replace(cfg.log, run_dir=str(run_dir), save_interval=ctx.steps - 1, keep_last=2,
                                log_interval=1, eval_batches=0, tensorboard=False, sample_log=False))


def _train(ctx: Context, run_dir: Path, resume: str | None, log):
    from coe_dist.launcher import discover
    from coe_dist.train.loop import train

    with contextlib.redirect_stdout(log):
        return train(_run_config(ctx, run_dir), discover(), resume=resume)


def _differences(a: Path, b: Path) -> list[str]:
    """Tensors (file:key) that differ between two checkpoint directories, or files one of them lacks."""
    out = []
    for fa in sorted(a.glob("*.pt")):
        fb = b / fa.name
        if not fb.is_file():
            out.append(f"{fa.name} missing after resume")
            continue
        ta, tb = torch.load(fa, weights_only=True), torch.load(fb, weights_only=True)
        out += [f"{fa.name}:{k}" for k in ta if k not in tb or not torch.equal(ta[k], tb[k])]
    return out


def check_training(ctx: Context) -> Verdict:
    S = ctx.steps
    first, second = ctx.out_dir / "train", ctx.out_dir / "resume"
    if ctx.rank == 0:
        for d in (first, second):
            shutil.rmtree(d, ignore_errors=True)
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    log_path = ctx.out_dir / ("train.log" if ctx.rank == 0 else f"train-rank{ctx.rank}.log")
    start = time.perf_counter()
    with log_path.open("w") as log:
        a = _train(ctx, first, None, log)
        b = _train(ctx, second, str(first / "checkpoints" / f"step_{S - 1}"), log)
    seconds = time.perf_counter() - start
    cfg = ctx.cfg.train
    step_s = cfg.micro_batch_size * cfg.grad_accum * ctx.world * cfg.seq_len / a.tokens_per_s
    ctx.found["step_s"] = step_s
    ckpt = first / "checkpoints" / f"step_{S}"
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    text = (f"{S} steps at world {ctx.world}, ep {ctx.ep_size}, zero {ctx.cfg.parallel.zero_stage}"
            f": loss {a.losses[0]:.4f} -> {a.losses[-1]:.4f}, {step_s * 1e3:.0f} ms/step; checkpoint "
            f"{size / 2 ** 20:.1f} MiB; resumed step {S} loss {b.losses[-1]:.6f} vs {a.losses[-1]:.6f}")
    data = {"losses": a.losses, "resumed_loss": b.losses[-1], "step_s": step_s, "checkpoint_bytes": size,
            "seconds": seconds}
    if b.losses[-1] != a.losses[-1]:
        return Verdict("train", FAIL, f"{text}: resuming changes the step (logs in {log_path})", data)
    # Rank 0 reads both checkpoints (a shared run directory); every rank gets its answer.
    diff = gather(ctx, _differences(ckpt, second / "checkpoints" / f"step_{S}") if ctx.rank == 0 else [])[0]
    if diff:
        return Verdict("train", FAIL, f"{text}; {len(diff)} tensors differ after save, load and one step "
                                      f"(first {diff[0]}): checkpoints in {ctx.out_dir}", data)
    if ctx.rank == 0:
        for d in (first, second):
            shutil.rmtree(d, ignore_errors=True)
    return Verdict("train", PASS, text + ", bitwise equal", data)

