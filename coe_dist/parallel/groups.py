"""Expert-parallel and expert-data-parallel process groups, created through DeepSpeed's groups.

For world = P * D: expert-parallel groups are consecutive ranks ([0,1], [2,3] for P=2, world 4) and
expert-data-parallel groups are strided ([0,2], [1,3]). Creating them through `deepspeed.utils.groups`
is what makes ZeRO reduce expert gradients over the expert-data-parallel group only.
"""

from __future__ import annotations

import importlib
from datetime import timedelta

import torch.distributed as dist


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the groups of one expert-parallel size (also the params' `group_name`)."""
    return f"ep_size_{ep_size}"


def check_ep_size(ep_size: int, num_experts: int, world_size: int) -> None:
    """Fail before any collective when the layout cannot work, naming both numbers."""
    if num_experts % ep_size:
        raise ValueError(f"moe.num_experts={num_experts} is not divisible by moe.ep_size={ep_size}: "
                         f"use an ep_size that divides {num_experts}")
    if world_size % ep_size:
        raise ValueError(f"moe.ep_size={ep_size} does not divide the world size {world_size}: launch a "
                         f"multiple of {ep_size} processes or set moe.ep_size to a divisor of {world_size}")


def init_deepspeed_comm(backend: str, timeout: timedelta | None = None) -> None:
    """DeepSpeed's comm wrapper over an initialised torch.distributed (its groups module needs it)."""
    import deepspeed

    if deepspeed.comm.is_initialized():
        return
    if backend == "gloo":
        # On CPU DeepSpeed JIT-builds a shared-memory all-reduce op at every start (~40 s on 2 cores, and
        # concurrent starts rebuild it); the project's collectives go through torch.distributed: skip it.
        # (`import deepspeed.comm.torch as m` would bind the torch package: deepspeed.comm re-exports it.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    kwargs = {"timeout": timeout} if timeout is not None else {}
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False, **kwargs)


def expert_parallel_group(ep_size: int, num_experts: int):
    """The expert-parallel group of this rank (created on first use, reused after)."""
    if not dist.is_initialized():
        raise RuntimeError(f"moe.ep_size={ep_size} needs torch.distributed: initialise the process group "
                           "before building the layer, or launch through `coe-dist train` / torchrun")
    check_ep_size(ep_size, num_experts, dist.get_world_size())
    from deepspeed.utils import groups

    init_deepspeed_comm(dist.get_backend())
    name = group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name)


def expert_data_parallel_group(ep_size: int):
    """Ranks holding the same experts: expert gradients are averaged over this group."""
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(group_name(ep_size))
