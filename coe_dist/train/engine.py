"""DeepSpeed engine set-up: ZeRO, optimizer, schedule, and the markers DeepSpeed's MoE bookkeeping reads.

All DeepSpeed knowledge of the project lives here. DeepSpeed hands expert groups to ZeRO only when the
model contains an instance of `deepspeed.moe.layer.MoE`, and it treats a parameter as an expert
parameter when `p.allreduce is False` and `p.group_name` names the expert groups. `mark_expert_parallel`
sets both for every CoE layer; ZeRO then averages expert gradients over the expert-data-parallel group
(ranks holding the same experts) and dense gradients over the whole world.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from coe_dist.config import RunConfig
from coe_dist.model.coe import CoELayer
from coe_dist.parallel.groups import group_name


class ExpertGroupMarker(DeepSpeedMoE):
    """A parameter-free stand-in that makes DeepSpeed see a CoE layer as one of its MoE layers.

    `MoE.__init__` is skipped on purpose: it would build DeepSpeed's own gate and experts. The expert
    groups already exist (the CoE layer created them through DeepSpeed's groups module).
    """

    def __init__(self, layer: CoELayer) -> None:
        nn.Module.__init__(self)
        self.num_experts = layer.config.num_experts
        self.num_local_experts = layer.num_local_experts
        self.ep_size = layer.config.ep_size
        self.expert_group_name = group_name(self.ep_size)
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        from deepspeed.utils import groups

        assert self.expert_group_name in groups._get_expert_parallel_group_dict(), self.expert_group_name

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("ExpertGroupMarker is bookkeeping for DeepSpeed, not a layer to call")


def mark_expert_parallel(model: nn.Module) -> int:
    """Tag expert parameters and attach one marker per CoE layer. Returns the number of layers marked."""
    layers = [m for m in model.modules() if isinstance(m, CoELayer) and m.config.ep_size > 1]
    for layer in layers:
        for p in layer.experts.parameters():
            p.allreduce = False
            p.group_name = group_name(layer.config.ep_size)
    if layers:
        model.deepspeed_moe_markers = nn.ModuleList(ExpertGroupMarker(layer) for layer in layers)
    return len(layers)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not norms; then split expert parameters into their own groups for ZeRO."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    if any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def lr_lambda(cfg: RunConfig):
    """Linear warm-up over warmup_fraction of the steps, then cosine decay to min_lr (as the paper)."""
    steps, o = cfg.train.steps, cfg.optim
    warmup = int(o.warmup_fraction * steps)
    floor = o.min_lr / o.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    t = cfg.train
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        # bf16 runs through torch.autocast with fp32 master weights, so DeepSpeed itself stays fp32.
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.deepspeed_config:
        ds = _merge(ds, json.loads(Path(cfg.parallel.deepspeed_config).read_text()))
    return ds


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_engine(model: nn.Module, cfg: RunConfig, world_size: int):
    """Wrap the model in a DeepSpeed engine with AdamW and the warm-up + cosine schedule."""
    mark_expert_parallel(model)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                  weight_decay=o.weight_decay, foreach=True)

    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world_size))
    return engine
