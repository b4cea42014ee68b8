"""Item `layer`: the CoE layer on this device, at the config's ep size, against float64 on one CPU process.

    every rank of an expert-parallel group of P ranks:
        u_GLD, gout_GLD <- one seeded batch of the group (B_rank sequences per rank, G = P * B_rank)
        reference: float64 layer with ep_size 1 on CPU over the whole group batch (same weights: the layer
                   seeds every expert by its global id), loss = sum(out * gout) + aux * B_rank / G
        device:    the config's layer (ep_size P, its dtype under autocast) on this rank's slice
        -> outputs and input gradients of the slice, gradients of the local experts, and the router and
           shared-expert gradients summed over the group, each as a relative error ||x - ref|| / ||ref||
           against the device dtype's tolerance

Tokens whose top-K choice is a near tie in the reference (a gap between the K-th and (K+1)-th router logit
under TIE_GAP, at any iteration) could route differently at the device dtype: their output gradient is zero
and their outputs are left out of the comparison.

COE_DIST_FAULT=check.layer@rankR:corrupt doubles one of rank R's expert weights (the tests' wrong layer).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from coe_dist.check.verdict import FAIL, PASS, Context, Verdict, gather, rank_list
from coe_dist.faults import fault_point
from coe_dist.model.coe import CoELayer

TOLERANCE = {"bf16": 3e-2, "fp32": 1e-4}  # relative error of a tensor (Frobenius norms)
TIE_GAP = {"bf16": 0.05, "fp32": 1e-4}  # router-logit gap below which a token's routing may flip
SEQUENCES_PER_RANK, SEQ_LEN = 2, 32
INIT_STD = 0.1  # decisive routing: few near ties
SEED = 20260


def _batch(ctx: Context, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The expert-parallel group's batch, the same on all of its ranks."""
    gen = torch.Generator().manual_seed(SEED)
    shape = (group_size * SEQUENCES_PER_RANK, min(SEQ_LEN, ctx.cfg.train.seq_len), ctx.cfg.model.hidden_size)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen,
                                                                               dtype=torch.float64)


def _near_ties(layer: CoELayer, u_GLD: torch.Tensor) -> torch.Tensor:
    """[G, L] True where some iteration's top-K choice is within TIE_GAP of the next expert (reference run)."""
    gaps: list[torch.Tensor] = []

    def hook(_module, _inputs, routing) -> None:
        top = routing.logits_TN.topk(layer.config.top_k + 1, dim=-1).values
        gaps.append(top[:, -2] - top[:, -1])

    handles = [r.register_forward_hook(hook) for r in layer.routers]
    try:
        with torch.no_grad():
            layer(u_GLD)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(gaps).min(0).values.view(u_GLD.shape[:2])


def _run(layer: CoELayer, u: torch.Tensor, gout: torch.Tensor, aux_scale: float, autocast_dtype=None):
    layer.zero_grad(set_to_none=True)
    u = u.clone().requires_grad_(True)
    with torch.autocast(u.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out, aux = layer(u)
        ((out.float() * gout).sum() + aux_scale * aux).backward()
    return out.detach(), u.grad.detach()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def check_layer(ctx: Context) -> Verdict:
    cfg, tol_key = ctx.cfg, ctx.cfg.train.dtype
    moe = cfg.moe
    P = moe.ep_size
    group_rank = dist.get_rank(ctx.ep_group) if P > 1 else 0
    u_GLD, gout_GLD = _batch(ctx, P)
    G = u_GLD.shape[0]
    rows = slice(group_rank * SEQUENCES_PER_RANK, (group_rank + 1) * SEQUENCES_PER_RANK)

    ref = CoELayer(dataclasses.replace(moe, ep_size=1), cfg.model.hidden_size, seed=SEED,
                   init_std=INIT_STD).double()
    ties = _near_ties(ref, u_GLD) < TIE_GAP[tol_key]
    gout_GLD = gout_GLD.masked_fill(ties[..., None], 0.0)
    ref_out, ref_du = _run(ref, u_GLD, gout_GLD, 1.0)

    dev = CoELayer(moe, cfg.model.hidden_size, seed=SEED, init_std=INIT_STD).to(ctx.device)
    if fault_point("check.layer") == "corrupt":
        with torch.no_grad():
            dev.experts.w_down_EDF[0].mul_(2.0)
    autocast = torch.bfloat16 if tol_key == "bf16" else None
    u = u_GLD[rows].float().to(ctx.device)
    out, du = _run(dev, u, gout_GLD[rows].float().to(ctx.device), SEQUENCES_PER_RANK / G, autocast)

    keep = ~ties[rows]
    errors = {"output": _rel(out[keep.to(out.device)], ref_out[rows][keep]), "input grad": _rel(du, ref_du[rows])}
    errors.update(_grad_errors(ctx, ref, dev, P))
    tol = TOLERANCE[tol_key]
    everyone = gather(ctx, errors)
    worst = {k: max(e[k] for e in everyone) for k in errors}
    bad = [r for r, e in enumerate(everyone) if max(e.values()) > tol]
    text = (f"ep {P}, {G}x{u_GLD.shape[1]} tokens per group ({int(ties.sum())} near ties left out) on "
            f"{ctx.device} {tol_key} vs float64 on CPU: worst relative errors "
            + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + f" (tolerance {tol:.0e})")
    data = {"errors_per_rank": everyone, "tolerance": tol, "near_ties": int(ties.sum())}
    if bad:
        which = max(everyone[bad[0]], key=everyone[bad[0]].get)
        return Verdict("layer", FAIL, f"{text}; {rank_list(bad, ctx.hosts)} compute a different layer ({which} "
                                      f"{everyone[bad[0]][which]:.1e}): run `pytest -m cuda tests/` on that node",
                       data)
    return Verdict("layer", PASS, text, data)


def _grad_errors(ctx: Context, ref: CoELayer, dev: CoELayer, P: int) -> dict[str, float]:
    """Relative errors of the routed experts' gradients (this rank's experts) and of the routers' and shared
    experts' (summed over the expert-parallel group: every rank saw part of the batch)."""
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}
    local = slice(dev.first_expert, dev.first_expert + dev.num_local_experts)
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"expert grads": [], "router+shared grads": []}
    for name, p in dev.named_parameters():
        g = p.grad.detach().double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
        if name.startswith("experts."):
            pairs["expert grads"].append((g, ref_grads[name][local]))
            continue
        if P > 1:
            dist.all_reduce(g, group=ctx.ep_group)
        pairs["router+shared grads"].append((g, ref_grads[name]))
    return {key: _rel(torch.cat([g.flatten().cpu() for g, _ in both]), torch.cat([r.flatten() for _, r in both]))
            for key, both in pairs.items() if both}
