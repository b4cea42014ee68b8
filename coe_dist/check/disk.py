"""Item `disk`: can every rank write the run directory, and does it hold log.keep_last checkpoints?

    checkpoint bytes = 12 x every parameter of the model (fp32 value + two Adam moments; coe_dist/train/
                       checkpoint.py), counted for the whole model (all experts) from the config alone
    every rank: write + remove a probe file in log.run_dir; free bytes of its file system
    -> FAIL when a rank cannot write, or free < (log.keep_last + 1) x checkpoint bytes (a new checkpoint is
       written before the oldest is removed)
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from coe_dist.check.verdict import FAIL, PASS, Context, Verdict, gather, rank_list
from coe_dist.config import RunConfig

BYTES_PER_PARAM = 12  # float32 value, exp_avg, exp_avg_sq


def model_params(cfg: RunConfig) -> int:
    """Parameters of the whole model (every expert once), counted from the config as coe_dist/model builds
    them (building the paper model only to count it takes longer than the rest of the check on a CPU)."""
    md, m = cfg.model, cfg.moe
    d = md.hidden_size
    per_layer = 2 * d + 4 * d * d  # two RMSNorms, qkv and output projections
    coe = ((m.iterations if m.independent_gating else 1) * m.num_experts * d  # routers
           + 3 * m.num_experts * d * m.expert_hidden_size  # routed experts (gate, up, down)
           + 3 * d * m.num_shared_experts * m.expert_hidden_size)  # shared experts, one SwiGLU
    dense = 3 * d * md.ffn_hidden_size
    layers = md.num_layers * per_layer + md.first_k_dense * dense + (md.num_layers - md.first_k_dense) * coe
    return 2 * md.vocab_size * d + d + layers  # embedding, LM head, final norm


def checkpoint_bytes(cfg: RunConfig) -> int:
    return BYTES_PER_PARAM * model_params(cfg)


def _probe(run_dir: Path) -> tuple[str | None, int]:
    """(error or None, free bytes) for this rank."""
    probe = run_dir / f".check-write-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        return f"{e.strerror or e}", _free(run_dir)
    return None, _free(run_dir)


def _free(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(ctx: Context) -> Verdict:
    run_dir = Path(ctx.cfg.log.run_dir)
    need_one = checkpoint_bytes(ctx.cfg)
    keep = ctx.cfg.log.keep_last
    need = (keep + 1) * need_one
    everyone = gather(ctx, _probe(run_dir))
    free = [f for _, f in everyone]
    text = (f"run dir {run_dir}: free {min(free) / 2 ** 30:.2f} GiB, need {need / 2 ** 30:.2f} GiB "
            f"((log.keep_last {keep} + 1) x {need_one / 2 ** 20:.1f} MiB per checkpoint)")
    data = {"run_dir": str(run_dir), "free_bytes_per_rank": free, "checkpoint_bytes": need_one,
            "needed_bytes": need}
    cannot = [r for r, (err, _) in enumerate(everyone) if err]
    if cannot:
        return Verdict("disk", FAIL, f"{text}; {rank_list(cannot, ctx.hosts)} cannot write it "
                                     f"({everyone[cannot[0]][0]}): set log.run_dir to a writable directory "
                                     "(one that every node sees)", data)
    short = [r for r, f in enumerate(free) if f < need]
    if short:
        return Verdict("disk", FAIL, f"{text}; not enough space on {rank_list(short, ctx.hosts)}: free space, "
                                     "lower log.keep_last or move log.run_dir", data)
    return Verdict("disk", PASS, text, data)
