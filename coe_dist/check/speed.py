"""Items `gemm` and `a2a`: this machine's expert GEMM rate and expert-parallel all-to-all against the profile.

    gemm: every rank, at once: grouped SwiGLU experts forward + backward at the config's shapes
          (N/P local experts, T*K token copies of d -> f -> d, the config's dtype), median of repeats
          -> FLOP/s per rank vs the profile's cost model for the same call -> ranks far below are named
    a2a:  every expert-parallel group, at once: even all-to-all of a small message (latency) and of one
          dispatch of the config (T*K rows of d in the wire dtype), median of repeats per rank
          -> latency, bandwidth vs the profile's link (intra- or inter-node) -> the slowest rank is named

COE_DIST_FAULT=check.gemm@rankR:sleep=S slows rank R's GEMMs (the tests' slow rank).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from coe_dist.bench.model import Workload, a2a_time
from coe_dist.check.verdict import FAIL, PASS, WARN, Context, Verdict, compare_rates, gather, rank_list
from coe_dist.faults import fault_point

WARMUP, REPEATS = 2, 7


def workload(ctx: Context) -> Workload:
    """One CoE layer-iteration of the config on one rank (uniform routing)."""
    cfg, m = ctx.cfg, ctx.cfg.moe
    return Workload(iterations=m.iterations, top_k=m.top_k, num_experts=m.num_experts,
                    hidden=cfg.model.hidden_size, expert_hidden=m.expert_hidden_size,
                    tokens=cfg.train.micro_batch_size * cfg.train.seq_len, ep_size=m.ep_size,
                    num_shared_experts=m.num_shared_experts, layers=cfg.model.num_layers - cfg.model.first_k_dense,
                    dtype=cfg.train.dtype, wire_bytes=2 if cfg.train.dtype == "bf16" else 4,
                    ranks_per_node=ctx.ranks_per_node)


def _time_experts(ctx: Context, w: Workload) -> float:
    """Median seconds of one forward + backward of this rank's grouped experts at the workload's shape."""
    from coe_dist.model.experts import GroupedExperts

    ex = GroupedExperts(w.local_experts, w.hidden, w.expert_hidden, impl=ctx.cfg.moe.expert_impl)
    ex = ex.to(device=ctx.device, dtype=ctx.dtype)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.02)
    rows = int(w.rows) // w.local_experts * w.local_experts
    counts = torch.full((w.local_experts,), rows // w.local_experts, dtype=torch.int64, device=ctx.device)
    x = torch.randn(rows, w.hidden, device=ctx.device, dtype=ctx.dtype).requires_grad_(True)
    g = torch.randn(rows, w.hidden, device=ctx.device, dtype=ctx.dtype)
    times = []
    for i in range(WARMUP + REPEATS):
        dist.barrier()  # all ranks at once, as in training (CPU ranks share the node's cores)
        ctx.sync()
        t0 = time.perf_counter()
        fault_point("check.gemm")
        y = ex(x, counts)
        torch.autograd.grad(y, [x, *ex.parameters()], g)
        ctx.sync()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_gemm(ctx: Context) -> Verdict:
    w = workload(ctx)
    flops = w.units("experts", "fwd") + w.units("experts", "bwd")
    per_rank = gather(ctx, _time_experts(ctx, w))
    rates = [flops / t for t in per_rank]
    shape = (f"{w.local_experts} experts x {int(w.rows)} rows, d={w.hidden} f={w.expert_hidden} "
             f"{ctx.cfg.train.dtype}")
    text = f"{shape}: " + ", ".join(f"rank {r} {v / 1e12:.3g}" for r, v in enumerate(rates)) + " TFLOP/s"
    data = {"flops": flops, "seconds_per_rank": per_rank, "tflops_per_rank": [r / 1e12 for r in rates]}
    ctx.found["gemm_seconds"] = max(per_rank)
    if ctx.profile is None:
        return Verdict("gemm", WARN, text + "; no profile in configs/profiles/ matches this device to compare "
                                            "with (pass --profile)", data)
    over = ctx.profile.oversubscription(ctx.ranks_per_node)
    expected_s = over * sum(ctx.profile.phase(f"experts_{d}", w.dtype).time(w.units("experts", d), w.units2("experts"))
                            for d in ("fwd", "bwd"))
    ctx.found["gemm_expected_seconds"] = expected_s
    expected = flops / expected_s
    data["profile_tflops"] = expected / 1e12
    status, slow, why = compare_rates(ctx, rates, expected)
    text += f" vs {expected / 1e12:.3g} in profile {ctx.profile.name}"
    if slow:
        text += f"; {rank_list(slow, ctx.hosts)} {why}"
        if status == FAIL:
            text += ": look for another job, a throttled GPU or a CPU limit on that node"
    return Verdict("gemm", status, text, data)


def _time_a2a(ctx: Context, rows_per_peer: int, hidden: int) -> float:
    from coe_dist.parallel.dispatch import _all_to_all

    P = ctx.ep_size
    x = torch.randn(rows_per_peer * P, hidden, device=ctx.device).to(ctx.dtype)
    splits = [rows_per_peer] * P
    times = []
    for i in range(WARMUP + REPEATS):
        dist.barrier(group=ctx.ep_group)
        ctx.sync()
        t0 = time.perf_counter()
        _all_to_all(x, splits, splits, ctx.ep_group)
        ctx.sync()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_a2a(ctx: Context) -> Verdict:
    P = ctx.ep_size
    if P == 1:
        return Verdict("a2a", PASS, "moe.ep_size=1: no expert all-to-all in this layout")
    w = workload(ctx)
    el = 2 if ctx.cfg.train.dtype == "bf16" else 4
    small_rows, small_hidden = 1, 64  # latency: one 64-element row to every peer
    big_rows = max(1, int(w.copies) // P)  # one dispatch of the config: T*K rows spread evenly
    small = gather(ctx, _time_a2a(ctx, small_rows, small_hidden))
    big = gather(ctx, _time_a2a(ctx, big_rows, w.hidden))
    small_b = small_rows * small_hidden * el * (P - 1)
    big_b = big_rows * w.hidden * el * (P - 1)
    bw = [big_b / t for t in big]  # effective: latency included, as a dispatch of the config sees it
    nodes = len({ctx.hosts[r] for r in range(ctx.world)}) if ctx.ranks_per_node < P else 1
    link = "intra-node" if P <= ctx.ranks_per_node else f"inter-node ({nodes} nodes per group)"
    text = (f"ep {P} ({link}): latency " + ", ".join(f"rank {r} {t * 1e6:.0f} us" for r, t in enumerate(small))
            + f"; {big_b / 2 ** 20:.2f} MiB sent per dispatch: "
            + ", ".join(f"rank {r} {t * 1e3:.2f} ms ({v / 1e9:.2f} GB/s)" for r, (t, v) in enumerate(zip(big, bw,
                                                                                                       strict=True))))
    data = {"latency_s_per_rank": small, "dispatch_s_per_rank": big, "bytes_offrank": big_b,
            "bandwidth_Bps_per_rank": bw}
    ctx.found["a2a"] = {"latency_s": statistics.median(small), "bandwidth_Bps": statistics.median(bw)}
    if ctx.profile is None:
        return Verdict("a2a", WARN, text + "; no profile in configs/profiles/ matches this device", data)
    over = ctx.profile.oversubscription(ctx.ranks_per_node)
    rpn = ctx.ranks_per_node if ctx.profile.kind == "cpu" else None
    exp_small = over * a2a_time(ctx.profile, P, small_b, rpn)
    exp_big = over * a2a_time(ctx.profile, P, big_b, rpn)
    data.update({"profile_latency_s": exp_small, "profile_dispatch_s": exp_big})
    text += f" vs profile {ctx.profile.name}: {exp_small * 1e6:.0f} us, {exp_big * 1e3:.2f} ms"
    judged = [compare_rates(ctx, [1 / t for t in big], 1 / exp_big),
              compare_rates(ctx, [1 / t for t in small], 1 / exp_small)]
    status = next((s for s in (FAIL, WARN) if any(j[0] == s for j in judged)), PASS)
    slow = sorted({r for j in judged for r in j[1]})
    if slow:
        slowest = max(slow, key=lambda r: big[r] / exp_big)
        text += f"; the {link} link is slow at {rank_list(slow, ctx.hosts)} (slowest rank {slowest}), "
        text += ", ".join(sorted({j[2] for j in judged if j[1]}))
        if status == FAIL:
            text += ": check NCCL_SOCKET_IFNAME/NCCL_IB_HCA and the fabric with nccl-tests"
    return Verdict("a2a", status, text, data)
