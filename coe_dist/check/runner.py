"""The check on one rank: join the job, run the items in order, print rank 0's verdict lines, write the JSON.

    config -> check_world (before any process group) -> device, backend, process group, expert-parallel group
    -> items: versions, kernels, disk, gemm, a2a, layer, train, cost (each on every rank, all collectives in
       the same order) -> rank 0: one line per item as it finishes, <out>/check.json -> exit code (1 if an
       item failed) on every rank
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from coe_dist.bench.model import Profile, load_profile
from coe_dist.check.cost import check_cost
from coe_dist.check.disk import check_disk
from coe_dist.check.layer import check_layer
from coe_dist.check.speed import check_a2a, check_gemm
from coe_dist.check.training import check_training
from coe_dist.check.verdict import FAIL, Context, Verdict, gather, machine_busy
from coe_dist.check.versions import check_kernels, check_versions
from coe_dist.config import ConfigError, RunConfig, check_world

ITEMS: dict[str, Callable[[Context], Verdict]] = {
    "versions": check_versions, "kernels": check_kernels, "disk": check_disk, "gemm": check_gemm,
    "a2a": check_a2a, "layer": check_layer, "train": check_training, "cost": check_cost,
}
# Device name fragment -> profile in configs/profiles/ (the first that matches).
PROFILE_FOR_DEVICE = (("H200", "h200-nvlink-ib400"), ("H100", "h100-nvlink-ib400"))


def parse_items(text: str | None) -> list[str]:
    """'gemm,layer' -> those items in the check's order; ConfigError for an unknown one."""
    if not text:
        return list(ITEMS)
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in ITEMS]
    if unknown:
        raise ConfigError(f"--items {text!r}: unknown item {unknown[0]!r}; choose from {', '.join(ITEMS)}")
    return [name for name in ITEMS if name in wanted]


def matching_profile(device: torch.device, requested: str | None) -> Profile | None:
    if requested:
        return load_profile(requested)
    if device.type == "cpu":
        return load_profile("cpu-local")
    name = torch.cuda.get_device_name(device)
    return next((load_profile(p) for key, p in PROFILE_FOR_DEVICE if key in name), None)


def _context(cfg: RunConfig, *, profile: str | None, out_dir: Path, steps: int) -> Context:
    from coe_dist.bench.comm import node_layout
    from coe_dist.launcher import discover, init_distributed, pick_backend
    from coe_dist.train.loop import pick_device, with_dtype_for

    penv = discover()
    check_world(cfg, penv.world_size)  # before any process group
    device = pick_device(cfg.train.device, penv.local_rank)
    cfg = with_dtype_for(cfg, device)
    backend = pick_backend(cfg.parallel.backend, device.type)
    init_distributed(penv, backend, cfg.parallel.timeout_s)
    hosts, ranks_per_node = node_layout()
    ctx = Context(cfg, penv.rank, penv.world_size, penv.local_rank, device, backend,
                  matching_profile(device, profile), out_dir, steps=steps, hosts=hosts,
                  ranks_per_node=ranks_per_node)
    loads = gather(ctx, os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    ctx.busy = machine_busy(hosts, loads, gather(ctx, os.cpu_count() or 1))
    if cfg.moe.ep_size > 1:
        from coe_dist.parallel.groups import expert_parallel_group

        ctx.ep_group = expert_parallel_group(cfg.moe.ep_size, cfg.moe.num_experts)
    return ctx


def _run_item(ctx: Context, name: str) -> Verdict:
    """One item on this rank; an exception on any rank is that item's failure, named by rank."""
    try:
        verdict, error = ITEMS[name](ctx), None
    except Exception as e:  # any failure of the machine under test is a verdict, not a crash of the check
        verdict, error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    errors = gather(ctx, error)
    failed = [r for r, e in enumerate(errors) if e]
    if failed:
        return Verdict(name, FAIL, f"rank {failed[0]} ({ctx.hosts[failed[0]]}) failed: {errors[failed[0]]}",
                       {"errors_per_rank": errors})
    return verdict


def run(cfg: RunConfig, *, items: list[str], out_dir: Path, json_path: Path, profile: str | None = None,
        steps: int = 3) -> int:
    """The check on this rank; returns the exit code (the same on every rank)."""
    ctx = _context(cfg, profile=profile, out_dir=out_dir, steps=steps)
    say = (lambda line: print(line, flush=True)) if ctx.rank == 0 else (lambda line: None)
    say(f"check: world {ctx.world} ({len(set(ctx.hosts))} node(s)), ep {ctx.ep_size}, {ctx.backend} on "
        f"{ctx.device}, {ctx.cfg.train.dtype}; profile {ctx.profile.name if ctx.profile else 'none'}"
        + (f"; {ctx.busy}: speed below the profile only warns" if ctx.busy else ""))
    verdicts = []
    for name in items:
        start = time.perf_counter()
        v = _run_item(ctx, name)
        v.data["seconds"] = time.perf_counter() - start
        verdicts.append(v)
        say(v.line())
    failed = [v.item for v in verdicts if v.status == FAIL]
    if ctx.rank == 0:
        target = json_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"world": ctx.world, "ep_size": ctx.ep_size, "device": str(ctx.device),
                                      "backend": ctx.backend, "profile": ctx.profile.name if ctx.profile else None,
                                      "items": [v.__dict__ for v in verdicts], "failed": failed},
                                     indent=1, default=str) + "\n")
        say(f"check: {'FAILED: ' + ', '.join(failed) if failed else 'all items passed'} ({target})")
    return 1 if failed else 0


def finish(rc: int) -> None:
    """Leave a rank of a launched job without static destructors: gloo groups that carried all-to-alls abort
    in them about one exit in three (see coe_dist/bench/cli.py)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
