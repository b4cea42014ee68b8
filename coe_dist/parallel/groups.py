"""Expert-parallel and expert-data-parallel process groups, created through DeepSpeed's groups.

For world = P * D: expert-parallel groups are consecutive ranks ([0,1], [2,3] for P=2, world 4) and
expert-data-parallel groups are strided ([0,2], [1,3]). Creating them through `deepspeed.utils.groups`
is what makes ZeRO reduce expert gradients over the expert-data-parallel group only.
"""

from __future__ import annotations

import importlib
import os
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


# Launchers' ranks-per-node variables, first found wins: torchrun, Slurm (one number per node when uniform),
# Open MPI, MVAPICH.
RANKS_PER_NODE_VARS = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE",
                       "MV2_COMM_WORLD_LOCAL_SIZE")


def ranks_per_node(configured: int, env: dict[str, str] | None = None) -> int:
    """moe.ranks_per_node, or (0) what the launcher says; a clear error where neither says."""
    if configured:
        return configured
    env = os.environ if env is None else env
    for var in RANKS_PER_NODE_VARS:
        if env.get(var, "").isdigit() and int(env[var]) > 0:
            return int(env[var])
    raise ValueError(f"moe.dispatch=node_dedup needs the ranks per node and no launcher variable says it "
                     f"({', '.join(RANKS_PER_NODE_VARS)} unset): set moe.ranks_per_node")


def node_layout(ep_size: int, per_node: int) -> tuple[int, int]:
    """(nodes M, ranks G of the group per node) of an expert-parallel group of consecutive ranks. A group
    inside one node (ep_size divides per_node) has M = 1; one spanning nodes has G = per_node."""
    if per_node % ep_size == 0:
        return 1, ep_size
    if ep_size % per_node == 0:
        return ep_size // per_node, per_node
    raise ValueError(f"moe.ranks_per_node={per_node} and moe.ep_size={ep_size}: one must divide the other for "
                     "node_dedup (an expert-parallel group of whole nodes, or inside one node)")


_NODE_GROUPS: dict[tuple[int, int], tuple] = {}


def node_groups(ep_size: int, per_node: int):
    """(inter, intra) groups of this rank for node-level deduplication: inter = the ranks of its expert-parallel
    group with its local rank, one per node; intra = the ranks of its group on its node. Every rank creates
    every group, in the same order (new_group is collective over the world)."""
    key = (ep_size, per_node)
    if key not in _NODE_GROUPS:
        M, G = node_layout(ep_size, per_node)
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = None, None
        for start in range(0, world, ep_size):
            inter = [dist.new_group([start + m * G + g for m in range(M)]) for g in range(G)]
            intra = [dist.new_group([start + m * G + g for g in range(G)]) for m in range(M)]
            if start <= rank < start + ep_size:
                q = rank - start
                mine = inter[q % G], intra[q // G]
        _NODE_GROUPS[key] = mine
    return _NODE_GROUPS[key]
