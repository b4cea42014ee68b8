"""Aux-loss-free balancing (DeepSeek-V3), the trainer's half: after each optimizer step, the loads every
router saw on this rank are summed over all ranks (the expert-parallel x data-parallel group is the world),
and each router nudges its expert bias against the global load.

    routers count chosen experts in training forwards -> all-reduce [routers of all layers, N] ->
    CoELayer.update_expert_biases (bias += rate * sign(mean load - load)) -> counts reset

One small all-reduce per step, only when moe.expert_bias_rate > 0. Every rank applies the same update to the
same counts, so the biases stay identical across ranks without being communicated.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from coe_dist.model.coe import CoELayer


def _balanced_layers(layers: list[CoELayer]) -> list[CoELayer]:
    return [layer for layer in layers if layer.config.expert_bias_rate > 0]


def update_expert_biases(layers: list[CoELayer], world_size: int) -> None:
    """Collective when world_size > 1 and balancing is on: every rank calls it after the same step."""
    layers = _balanced_layers(layers)
    if not layers:
        return
    loads = [layer.pending_expert_load() for layer in layers]
    load_XN = torch.cat(loads)  # X = routers of all layers
    if world_size > 1:
        dist.all_reduce(load_XN)
    for layer, load_RN in zip(layers, load_XN.split([len(x) for x in loads]), strict=True):
        layer.update_expert_biases(load_RN)


def discard_pending_loads(layers: list[CoELayer]) -> None:
    """A step whose update was left out (non-finite numbers) does not move the biases either."""
    for layer in _balanced_layers(layers):
        for router in layer.routers:
            router.load_N.zero_()
