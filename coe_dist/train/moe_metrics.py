"""CoE-specific metrics for the logger, per layer and iteration: expert load (histogram and max/mean
imbalance), router entropy, dropped tokens, all-to-all time and bytes, and chain diversity.

Expert loads are summed over all ranks (one small all-reduce on logging steps); entropy and chain
diversity are rank 0's last micro-batch; communication figures are rank 0's, per logging interval.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from coe_dist.model import CoETransformer


def start_recording(model: CoETransformer, on: bool, coselection: bool = True) -> None:
    for layer in model.coe_layers():
        layer.record_routing = on
        layer.record_coselection = coselection
        if on:
            layer.routing_record = {}


def routing_metrics(model: CoETransformer, world_size: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """(scalars, histograms) from the routing records of the last forward. Collective when world_size > 1."""
    layers = [layer for layer in model.coe_layers() if layer.routing_record]
    if not layers:
        return {}, {}
    keys = [(layer, t) for layer in layers for t in range(layer.config.iterations)]
    counts = torch.stack([layer.routing_record[f"iter{t}/counts"].double().cpu() for layer, t in keys])
    if world_size > 1:
        dist.all_reduce(counts)
    scalars: dict[str, float] = {}
    hists: dict[str, torch.Tensor] = {}
    for (layer, t), c in zip(keys, counts, strict=True):
        prefix = f"moe/layer{layer.layer}/iter{t}"
        scalars[f"{prefix}/load_imbalance"] = float(c.max() / c.mean().clamp_min(1e-12))
        scalars[f"{prefix}/router_entropy"] = layer.routing_record[f"iter{t}/entropy"]
        hists[f"{prefix}/expert_load"] = c
    for layer in layers:
        rec = layer.routing_record
        scalars[f"moe/layer{layer.layer}/distinct_chains"] = float(rec["chains"])
        scalars[f"moe/layer{layer.layer}/chain_diversity"] = rec["chains"] / rec["tokens"]
    return scalars, hists


def comm_totals(model: CoETransformer) -> dict[str, float]:
    """Every CoE layer's dispatcher counters since this process started, per (layer, iteration, direction):
    all-to-all calls, seconds and bytes, and dropped token copies (see CommStats.summary)."""
    totals: dict[str, float] = {}
    for layer in model.coe_layers():
        totals.update(layer.dispatcher.stats.summary())
    return totals


class CommDelta:
    """All-to-all and drop counters per logging interval (the dispatchers' counters only ever grow)."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def __call__(self, model: CoETransformer) -> dict[str, float]:
        now = comm_totals(model)
        delta = {k: v - self.last.get(k, 0.0) for k, v in now.items() if not k.endswith("/calls")}
        self.last = now
        return delta
