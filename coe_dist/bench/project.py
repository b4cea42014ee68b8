"""`coe-dist bench project`: step time, exposed all-to-all share and tokens/s of a CoE model and its
equal-FLOP MoE at several GPU counts, from a cluster profile.

Per GPU count G (weak scaling: T = micro_batch_size * seq_len tokens per GPU):
  - expert-parallel size P = min(G, N) by default (`--ep-size node`: one node; a number: that, capped at G);
    the remaining factor G/P is expert-data parallelism, which adds no all-to-all traffic. N need not be a
    multiple of P in the projection (ceil(N/P) experts on the busiest rank; uniform routing).
  - per CoE layer: the model's phases (model.py) for C iterations of top-K routing plus S shared experts;
  - the rest of the transformer as GEMM FLOPs at the profile's GEMM rate: attention projections 8*d^2 and
    causal attention 2*L*d per token per layer, dense FFN layers 6*d*F, the LM head 2*d*V; backward = 2x
    forward. Norms, softmax, optimizer and gradient reduction (ZeRO, overlapped by DeepSpeed) are left out.
  - equal-FLOP MoE: C=1, K' = C*(K+S) - S routed experts, same N, S, f (CoE-2(4/64) <-> MoE(8/64)).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from coe_dist.bench.model import Profile, Workload, load_profile, predict_step
from coe_dist.bench.outputs import write_csv, write_json
from coe_dist.config import RunConfig, load_config
from coe_dist.errors import UserError


def equal_flop_moe(cfg: RunConfig) -> RunConfig:
    """The MoE with the same expert FFNs per token: C=1, K' = C*(K+S) - S."""
    m = cfg.moe
    k = m.iterations * (m.top_k + m.num_shared_experts) - m.num_shared_experts
    if k > m.num_experts:
        raise UserError(f"equal-FLOP MoE needs top_k={k} > num_experts={m.num_experts}: pass --moe-model")
    run_dir = cfg.log.run_dir + "-moe"
    return dataclasses.replace(cfg, moe=dataclasses.replace(m, iterations=1, top_k=k),
                               log=dataclasses.replace(cfg.log, run_dir=run_dir))


def ep_size_for(gpus: int, num_experts: int, mode: str, gpus_per_node: int) -> int:
    if mode == "max":
        return max(1, min(gpus, num_experts))
    if mode == "node":
        return max(1, min(gpus, gpus_per_node, num_experts))
    try:
        return max(1, min(int(mode), gpus, num_experts))
    except ValueError:
        raise UserError(f"--ep-size {mode!r}: use max, node or a number") from None


def label(cfg: RunConfig) -> str:
    m = cfg.moe
    s = m.num_shared_experts
    total = m.num_experts + s
    per_token = m.top_k + s
    return (f"CoE-{m.iterations}({per_token}/{total})" if m.iterations > 1 else f"MoE({per_token}/{total})")


def dense_flops_per_token(cfg: RunConfig) -> float:
    """Forward FLOPs per token outside the CoE blocks (see module doc)."""
    md = cfg.model
    d, L = md.hidden_size, cfg.train.seq_len
    attn = md.num_layers * (8.0 * d * d + 2.0 * L * d)
    dense_ffn = md.first_k_dense * 6.0 * d * md.ffn_hidden_size
    head = 2.0 * d * md.vocab_size
    return attn + dense_ffn + head


def workload(cfg: RunConfig, ep: int, tokens: int, distinct_ranks: float | None = None,
             node_ranks: int = 8) -> Workload:
    m = cfg.moe
    dtype = "bf16" if cfg.train.dtype == "auto" else cfg.train.dtype  # auto: what a GPU trains in
    return Workload(iterations=m.iterations, top_k=m.top_k, num_experts=m.num_experts, hidden=cfg.model.hidden_size,
                    expert_hidden=m.expert_hidden_size, tokens=tokens, ep_size=ep,
                    num_shared_experts=m.num_shared_experts, layers=cfg.model.num_layers - cfg.model.first_k_dense,
                    dtype=dtype, wire_bytes=2 if dtype == "bf16" else 4, dispatch=m.dispatch,
                    dispatch_dtype=m.dispatch_dtype, distinct_ranks=distinct_ranks, node_ranks=node_ranks)


def project(profile: Profile, models: list[RunConfig], gpus: list[int], *, ep_mode: str = "max",
            tokens_per_gpu: int | None = None,
            distinct_ranks: dict[tuple[str, int], float] | None = None) -> list[dict[str, Any]]:
    """`distinct_ranks`: (model label, ep) -> measured distinct ranks per token for dedup (else uniform)."""
    rows = []
    for G in gpus:
        for cfg in models:
            T = tokens_per_gpu or cfg.train.micro_batch_size * cfg.train.seq_len
            P = ep_size_for(G, cfg.moe.num_experts, ep_mode, profile.ranks_per_node)
            w = workload(cfg, P, T, (distinct_ranks or {}).get((label(cfg), P)), profile.ranks_per_node)
            rate = profile.gemm_rate(w.dtype)
            extra = 3.0 * T * dense_flops_per_token(cfg) * rate.per_unit_s
            pred = predict_step(profile, w, extra_compute_s=extra)
            step = pred["step_s"]
            rows.append({
                "gpus": G, "model": label(cfg), "C": cfg.moe.iterations, "K": cfg.moe.top_k,
                "S": cfg.moe.num_shared_experts, "N": cfg.moe.num_experts, "ep_size": P,
                "nodes_per_ep_group": math.ceil(P / profile.ranks_per_node), "tokens_per_gpu": T,
                "step_ms": step * 1e3, "moe_layers_ms": (step - extra) * 1e3, "dense_ms": extra * 1e3,
                "a2a_ms": pred["comm_s"] * 1e3, "a2a_share": pred["comm_share"],
                "a2a_rounds_per_step": 5 * w.iterations * w.layers if P > 1 else 0,
                "a2a_mib_per_step": w.bytes_per_step / 2 ** 20,
                "tokens_per_s": G * T / step, "tokens_per_s_per_gpu": T / step,
                "phases_ms": {k: v * 1e3 for k, v in pred["phases"].items()},
            })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'GPUs':>5} {'model':<13} {'ep':>3} {'nodes':>5} {'step ms':>9} {'a2a ms':>8} {'a2a %':>6} "
            f"{'rounds':>6} {'MiB/GPU':>8} {'tokens/s':>12} {'tok/s/GPU':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['gpus']:>5} {r['model']:<13} {r['ep_size']:>3} {r['nodes_per_ep_group']:>5} "
                     f"{r['step_ms']:>9.2f} {r['a2a_ms']:>8.2f} {r['a2a_share'] * 100:>5.1f}% "
                     f"{r['a2a_rounds_per_step']:>6} {r['a2a_mib_per_step']:>8.1f} {r['tokens_per_s']:>12,.0f} "
                     f"{r['tokens_per_s_per_gpu']:>10,.0f}")
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| GPUs | model | ep | nodes/ep group | step ms | all-to-all ms | a2a share | a2a rounds/step | "
             "MiB sent/GPU/step | tokens/s | tokens/s/GPU |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['model']} | {r['ep_size']} | {r['nodes_per_ep_group']} | "
                     f"{r['step_ms']:.2f} | {r['a2a_ms']:.2f} | {r['a2a_share'] * 100:.1f}% | "
                     f"{r['a2a_rounds_per_step']} | {r['a2a_mib_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    from coe_dist.bench.plots import plt, save_png  # importing plots selects the Agg backend

    models = list(dict.fromkeys(r["model"] for r in rows))
    gpus = sorted({r["gpus"] for r in rows})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.3))
    width = 0.8 / len(models)
    colors = ["#08519c", "#74a9cf", "#31a354", "#a1d99b"]
    for i, m in enumerate(models):
        rs = {r["gpus"]: r for r in rows if r["model"] == m}
        xs = [gpus.index(g) + (i - (len(models) - 1) / 2) * width for g in gpus]
        comp = [rs[g]["step_ms"] - rs[g]["a2a_ms"] for g in gpus]
        comm = [rs[g]["a2a_ms"] for g in gpus]
        a1.bar(xs, comp, width=width, color=colors[i % 4], label=f"{m}: compute")
        a1.bar(xs, comm, width=width, bottom=comp, color="#cb181d", alpha=0.55 + 0.35 * (i % 2),
               label=f"{m}: all-to-all")
        a2.plot(gpus, [rs[g]["a2a_share"] * 100 for g in gpus], marker="o", label=m, color=colors[i % 4])
    a1.set_xticks(range(len(gpus)), [str(g) for g in gpus])
    a1.set_xlabel("GPUs")
    a1.set_ylabel("predicted step time (ms)")
    a1.legend(fontsize=7)
    a1.set_title("Step time: compute + exposed all-to-all")
    a2.set_xscale("log", base=2)
    a2.set_xticks(gpus)
    a2.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    a2.set_xlabel("GPUs")
    a2.set_ylabel("exposed all-to-all share (%)")
    a2.set_ylim(bottom=0)
    a2.legend(fontsize=8)
    a2.set_title("Exposed communication share")
    fig.suptitle(title, fontsize=10)
    return save_png(fig, path)


def run(args) -> int:
    profile = load_profile(args.profile)
    try:
        gpus = [int(g) for g in str(args.gpus).split(",") if g.strip()]
    except ValueError:
        raise UserError(f"--gpus {args.gpus!r}: expected comma-separated numbers, e.g. 8,64,512,4096") from None
    if not gpus or min(gpus) < 1:
        raise UserError(f"--gpus {args.gpus!r}: give at least one GPU count >= 1")
    coe = load_config(args.model)
    moe = load_config(args.moe_model) if args.moe_model else equal_flop_moe(coe)
    rows = project(profile, [coe, moe], gpus, ep_mode=args.ep_size, tokens_per_gpu=args.tokens_per_gpu)
    out = Path(args.out or f"runs/bench/project-{profile.name}")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"profile": profile.name, "profile_description": profile.description, "model": args.model,
            "moe_model": args.moe_model or "derived equal-FLOP MoE", "ep_size": args.ep_size, "gpus": gpus}
    write_json(out / "projection.json", {"meta": meta, "rows": rows})
    write_csv(out / "projection.csv", [k for k in rows[0] if k != "phases_ms"], rows)
    png = plot(rows, out / "projection.png", f"{label(coe)} vs {label(moe)} on {profile.name} "
                                            f"(T={rows[0]['tokens_per_gpu']} tokens/GPU, ep {args.ep_size})")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"profile {profile.name}: {profile.description}")
        print(format_table(rows))
        print(f"wrote {out / 'projection.csv'}, {out / 'projection.json'}, {png}")
    return 0
