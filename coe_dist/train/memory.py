"""Will the run fit in memory? A lower-bound estimate from the config, checked before start-up.

    parameters    counted on the model built on the meta device (no memory); experts / moe.ep_size per rank
    weights       fp32 master weights + fp32 gradients: 8 bytes a parameter
    optimizer     Adam's two fp32 moments: 8 bytes a parameter, split over the ranks under ZeRO 1/2/3
    activations   logits and their gradient (2 x B x L x vocab fp32) + per layer and CoE iteration the
                  hidden states and the routed experts' inputs (B x L x (d + top_k x f) fp32)
    available     cuda: the device's total memory; cpu: MemAvailable (or the cgroup's limit, if lower),
                  shared by this node's ranks (LOCAL_WORLD_SIZE)

Each term leaves things out (DeepSpeed's buffers, bf16 copies, attention), so the total is below what the
run will use: a run is refused only when even this does not fit, and the message gives both numbers.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from coe_dist.config import ConfigError, RunConfig
from coe_dist.launcher import ProcessEnv
from coe_dist.model import CoETransformer

GIB = 2**30


def parameters_per_rank(cfg: RunConfig) -> int:
    """Parameters one rank holds: all dense ones and 1/ep_size of the routed experts."""
    with torch.device("meta"):
        model = CoETransformer(cfg.model, dataclasses.replace(cfg.moe, ep_size=1), seed=cfg.train.seed)
    counts = model.num_params()
    return counts["dense"] + counts["expert_local"] // cfg.moe.ep_size


def estimate_bytes(cfg: RunConfig, world_size: int) -> dict[str, int]:
    params = parameters_per_rank(cfg)
    m, moe, t = cfg.model, cfg.moe, cfg.train
    tokens = t.micro_batch_size * t.seq_len
    per_layer = tokens * (m.hidden_size + moe.top_k * moe.expert_hidden_size) * moe.iterations * 4
    shards = world_size if cfg.parallel.zero_stage >= 1 else 1
    return {"weights": params * 8, "optimizer": params * 8 // shards,
            "activations": 2 * tokens * m.vocab_size * 4 + m.num_layers * per_layer}


def available_bytes(device: torch.device) -> int | None:
    """Memory this node's ranks can use, or None when it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    limit = Path("/sys/fs/cgroup/memory.max")
    try:
        text = limit.read_text().strip()
        if text.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(text) - used)
    except (OSError, ValueError):
        pass
    return available


def check_fits(cfg: RunConfig, penv: ProcessEnv, device: torch.device) -> None:
    """ConfigError with the estimate when the run cannot fit (before any process group or allocation)."""
    available = available_bytes(device)
    if available is None:
        return
    parts = estimate_bytes(cfg, penv.world_size)
    sharing = 1 if device.type == "cuda" else max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    need = sum(parts.values()) * sharing
    if need <= available:
        return
    detail = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items())
    where = f"{device.type} device {device}" if device.type == "cuda" else f"this host ({sharing} process(es))"
    raise ConfigError(
        f"the config needs at least {need / GIB:.1f} GiB ({detail} GiB per process) but {where} has "
        f"{available / GIB:.1f} GiB available: lower model.hidden_size, model.num_layers, moe.num_experts, "
        "model.vocab_size or train.micro_batch_size, or spread the experts with a larger moe.ep_size")
