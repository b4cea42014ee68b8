"""Items `versions` and `kernels`: what software and devices every rank runs on, and which kernels it uses.

    every rank: package versions, CUDA/NCCL, its device -> gather -> one line (ranks that disagree fail)
    every rank: kernels.probe(device), expert GEMM path -> gather -> one line (the reason for each choice)
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

from coe_dist import kernels
from coe_dist.check.verdict import FAIL, PASS, WARN, Context, Verdict, gather, rank_list

# (distribution name, shown as, needed): a missing needed package fails, a missing optional one warns.
PACKAGES = (("torch", "torch", True), ("deepspeed", "DeepSpeed", True), ("megatron-core", "megatron-core", True),
            ("apex", "apex", False), ("mpi4py", "mpi4py", False))


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def local_versions(device: torch.device) -> dict[str, Any]:
    """This rank's package versions, CUDA and NCCL versions and device."""
    out: dict[str, Any] = {shown: _version(name) for name, shown, _ in PACKAGES}
    out["CUDA"] = torch.version.cuda
    out["NCCL"] = ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None
    out["device"] = str(device)
    out["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return out


def check_versions(ctx: Context) -> Verdict:
    mine = local_versions(ctx.device)
    everyone = gather(ctx, mine)
    keys = [shown for _, shown, _ in PACKAGES] + ["CUDA", "NCCL"]
    differ = [k for k in keys if len({str(v[k]) for v in everyone}) > 1]
    missing = [shown for _, shown, needed in PACKAGES if needed and any(v[shown] is None for v in everyone)]
    optional = [shown for _, shown, needed in PACKAGES if not needed and mine[shown] is None]
    taken: dict[tuple[str, str], int] = {}
    clash = []
    for r, v in enumerate(everyone):
        if v["device"] != "cpu":
            other = taken.setdefault((ctx.hosts[r], v["device"]), r)
            if other != r:
                clash.append(f"ranks {other} and {r} share {v['device']} on {ctx.hosts[r]}")
    devices = "; ".join(f"{r}:{v['device']}" + (f" {v['device_name']}" if v["device"] != "cpu" else "")
                        for r, v in enumerate(everyone))
    text = (", ".join(f"{k} {mine[k] or 'missing'}" for k in keys if mine[k] or k not in ("CUDA", "NCCL"))
            + f"; devices per rank {devices}")
    data = {"per_rank": everyone}
    if differ:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {v[k]}" for r, v in enumerate(everyone)) for k in differ)
        return Verdict("versions", FAIL, f"{text}; ranks disagree on {detail}: install one environment (or "
                                         "one container image) on every node", data)
    if missing:
        return Verdict("versions", FAIL, f"{text}; missing {', '.join(missing)}: pip install -e '.[test]'", data)
    if clash:
        return Verdict("versions", FAIL, f"{text}; {'; '.join(clash)}: start one process per GPU "
                                         "(--procs-per-node = GPUs per node)", data)
    status = WARN if optional and ctx.device.type == "cuda" else PASS
    return Verdict("versions", status, text + (f" (optional: {', '.join(optional)} not installed)" if optional
                                               else ""), data)


def check_kernels(ctx: Context) -> Verdict:
    from coe_dist.model.experts import GroupedExperts

    experts = GroupedExperts(1, ctx.cfg.model.hidden_size, ctx.cfg.moe.expert_hidden_size, impl=ctx.cfg.moe.expert_impl)
    grouped = ("torch._grouped_mm" if experts.use_grouped_mm else
               f"per-expert loop (moe.expert_impl={ctx.cfg.moe.expert_impl}, hidden sizes multiples of 8: "
               f"{ctx.cfg.model.hidden_size % 8 == 0 and ctx.cfg.moe.expert_hidden_size % 8 == 0})")
    choice = kernels.probe(ctx.device.type)
    mine = {"rms_norm": choice.reason, "experts": grouped}
    everyone = gather(ctx, mine)
    differ = [r for r, v in enumerate(everyone) if v != everyone[0]]
    text = f"rms_norm={choice.reason}; experts={grouped}"
    if differ:
        return Verdict("kernels", FAIL, f"{text}; {rank_list(differ, ctx.hosts)} chose otherwise "
                                        f"({everyone[differ[0]]}): the nodes' software differs", {"per_rank": everyone})
    # apex is worth having on GPUs only (its fused RMSNorm is a CUDA kernel).
    status = WARN if ctx.device.type == "cuda" and choice.fused_rms_norm is None else PASS
    return Verdict("kernels", status, text, {"per_rank": everyone})
