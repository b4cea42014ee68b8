"""What every preflight item gets (`Context`) and gives back (`Verdict`), and the line a verdict prints as.

    Context (config, this rank's place, device, expert-parallel group, matching profile, scratch dir)
        -> item(ctx) on every rank -> Verdict (on rank 0: status, one line of numbers, data for the JSON)

Items put what later items need (the measured GEMM rate, link, step time) into `ctx.found`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from coe_dist.bench.model import Profile
from coe_dist.config import RunConfig

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
# Far below the profile: a rank or link under this fraction of the profile's rate fails; under WARN_FRACTION
# it is a warning. Generous on purpose: the profiles' GPU numbers are datasheet-derived, and CPU machines are
# shared.
FAIL_FRACTION = 0.25
WARN_FRACTION = 0.6


@dataclass
class Verdict:
    item: str
    status: str  # PASS | WARN | FAIL
    text: str  # the numbers, and for a failure which rank/link and what to do
    data: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"check: {self.status} {self.item:<9} {self.text}"


@dataclass
class Context:
    cfg: RunConfig
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str
    profile: Profile | None  # the matching profile in configs/profiles/ (None: none matches this device)
    out_dir: Path  # scratch space of the check: <run_dir>/check unless --out
    steps: int = 3  # training steps of the training item
    ep_group: Any = None  # this rank's expert-parallel group (None at ep_size 1)
    hosts: list[str] = field(default_factory=list)  # host of every rank
    ranks_per_node: int = 1
    found: dict[str, Any] = field(default_factory=dict)  # measurements later items use
    busy: str = ""  # why this machine's speed cannot be judged ("load average 22 on 2 cores on vm"), or ""

    @property
    def ep_size(self) -> int:
        return self.cfg.moe.ep_size

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.train.dtype == "bf16" else torch.float32

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def gather(ctx: Context, value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if ctx.world == 1:
        return [value]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, value)
    return out


def compare_rates(ctx: Context, per_rank: list[float], expected: float) -> tuple[str, list[int], str]:
    """Measured rates (higher is better) against the profile's and against the fastest rank: (status, the
    ranks named, why). A rank far below the fastest is a straggler and fails. A rank far below the profile
    fails, except on a machine busy with other work (load average above its cores) or against a CPU profile,
    where it only warns: such numbers describe the load or the CPU model, not a fault."""
    stragglers = [r for r, v in enumerate(per_rank) if v < FAIL_FRACTION * max(per_rank)]
    if stragglers:
        return FAIL, stragglers, "far below the fastest rank"
    slow = [r for r, v in enumerate(per_rank) if v < FAIL_FRACTION * expected]
    if slow and ctx.busy:
        return WARN, slow, f"far below the profile, but {ctx.busy}"
    if slow and ctx.profile is not None and ctx.profile.kind == "cpu":
        # A CPU profile is one measured machine (cpu-local: AMX bf16); CPUs of the same kind differ by ISA
        # ten-fold (AVX2 only), so a shortfall there says which CPU this is, not that it is broken.
        return WARN, slow, f"far below the profile (CPU profile {ctx.profile.name}: this CPU's ISA may differ)"
    if slow:
        return FAIL, slow, "far below the profile"
    below = [r for r, v in enumerate(per_rank) if v < WARN_FRACTION * expected]
    return (WARN, below, "below the profile") if below else (PASS, [], "")


def machine_busy(hosts: list[str], loads: list[float | None], cores: list[int]) -> str:
    """'load average L on C cores on HOST' for the first rank whose node runs more than it has cores, or ''."""
    for host, load, n in zip(hosts, loads, cores, strict=True):
        if load is not None and load > n:
            return f"load average {load:.1f} on {n} cores on {host}"
    return ""


def rank_list(ranks: list[int], hosts: list[str]) -> str:
    return ", ".join(f"rank {r} ({hosts[r]})" if hosts else f"rank {r}" for r in ranks)
