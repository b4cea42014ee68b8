"""Generate docs/scaling.md and docs/scaling/*.png from the bench runs in benchmarks/results/ and the profiles.

    python -m coe_dist.bench.scaling_doc [--run2 benchmarks/results/scaling-2ranks]
        [--run4 benchmarks/results/scaling-4ranks] [--out docs/scaling.md]

Everything numeric on the page comes from the runs' summary.json, the cost model and configs/profiles/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from coe_dist.bench import outputs, plots, project, validate
from coe_dist.bench.model import distinct_ranks_per_token, load_profile
from coe_dist.bench.report import meta_lines
from coe_dist.config import load_config

ROOT = Path(__file__).resolve().parents[2]
MS = 1e3


COMM_KEYS = ('counts_fwd', 'dispatch_fwd', 'combine_fwd', 'dispatch_bwd', 'combine_bwd')


def _tag(run: dict[str, Any]) -> list[dict]:
    return [dict(s, world=run["meta"]["world"]) for s in run["cases"]]


def _forced(summaries: list[dict]) -> list[dict]:
    return [s for s in summaries if s["config"]["routing"] == "forced-balanced"]


def share_table(summaries: list[dict]) -> str:
    """Rows: (ranks, P, d, T); columns: C = 1, 2, 4 at C*K = 4: slowest-rank share, fastest-rank share."""
    rows: dict[tuple, dict[int, dict]] = {}
    for s in _forced(summaries):
        c = s["config"]
        rows.setdefault((s["world"], c["ep_size"], c["hidden"], c["tokens"]), {})[c["iterations"]] = s
    cs = sorted({c for r in rows.values() for c in r})
    head = "| ranks | P | d | T | " + " | ".join(f"C={c} (K={4 // c}): step ms, a2a share slowest / fastest rank"
                                                  for c in cs) + " |"
    lines = [head, "|" + "---|" * (4 + len(cs))]
    for (world, P, d, T), by_c in sorted(rows.items()):
        cells = []
        for c in cs:
            s = by_c.get(c)
            cells.append("-" if s is None else
                         f"{s['step']['median'] * MS:.1f}, {s['comm_share']['median'] * 100:.0f}% / "
                         f"{s['comm_share_min_rank']['median'] * 100:.0f}%")
        lines.append(f"| {world} | {P} | {d} | {T} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ep_table(run4: list[dict]) -> str:
    """The 4-rank run's shapes at ep 2 and ep 4 side by side (same run: same load on the machine)."""
    by: dict[tuple, dict[int, dict]] = {}
    for s in _forced(run4):
        c = s["config"]
        by.setdefault((c["iterations"], c["top_k"], c["hidden"], c["tokens"]), {})[c["ep_size"]] = s
    lines = ["| C | K | d | T | a2a ms, fastest rank (P=2 -> P=4) | a2a share slowest rank (P=2 -> P=4) | "
             "MiB/rank/step (P=2 -> P=4) |", "|---|---|---|---|---|---|---|"]
    for (C, K, d, T), ps in sorted(by.items()):
        if 2 not in ps or 4 not in ps:
            continue
        a, b = ps[2], ps[4]
        mib = [max(max(v) for v in x["bytes"]["data_per_step_per_rank"].values()) / 2 ** 20 for x in (a, b)]
        lines.append(f"| {C} | {K} | {d} | {T} | {a['comm_min_rank']['median'] * MS:.1f} -> "
                     f"{b['comm_min_rank']['median'] * MS:.1f} | {a['comm_share']['median'] * 100:.0f}% -> "
                     f"{b['comm_share']['median'] * 100:.0f}% | {mib[0]:.2f} -> {mib[1]:.2f} |")
    return "\n".join(lines)


def skew_table(summaries: list[dict]) -> str:
    rows = [s for s in summaries if s["config"]["iterations"] == 2 and s["config"]["hidden"] == 256
            and s["config"]["tokens"] == 1024]
    lines = ["| ranks | P | routing | busiest rank's load / mean | step ms | a2a ms (slowest rank) | "
             "a2a ms (fastest rank) | experts fwd+bwd ms |", "|---|---|---|---|---|---|---|---|"]
    order = {"forced-balanced": 0, "learned-random": 1, "skewed": 2}
    for s in sorted(rows, key=lambda s: (s["world"], s["config"]["ep_size"], order[s["config"]["routing"]],
                                         s["config"]["zipf"])):
        c = s["config"]
        exp = (s["phases"]["experts_fwd"]["median"] + s["phases"]["experts_bwd"]["median"]) * MS
        lines.append(f"| {s['world']} | {c['ep_size']} | {plots.routing_label(c)} | {s['rows_max_over_mean']:.2f} | "
                     f"{s['step']['median'] * MS:.1f} | {s['comm']['median'] * MS:.1f} | "
                     f"{s['comm_min_rank']['median'] * MS:.1f} | {exp:.1f} |")
    return "\n".join(lines)


def profile_table(names: list[str]) -> str:
    lines = ["| profile | link | latency | per peer | bandwidth | source |", "|---|---|---|---|---|---|"]
    for n in names:
        p = load_profile(n)
        for k, link in p.links.items():
            bw = link.bandwidth_Bps
            lines.append(f"| {p.name} | {k} | {link.latency_s * 1e6:.1f} us | {link.latency_per_peer_s * 1e6:.1f} us | "
                         f"{bw / 1e9:.3g} GB/s | {' '.join(link.source.split())} |")
    lines += ["", "| profile | number | value | source |", "|---|---|---|---|"]
    for n in names:
        p = load_profile(n)
        for dt, g in p.gemm.items():
            lines.append(f"| {p.name} | GEMM {dt} | {1 / g.per_unit_s / 1e12:.3g} TFLOP/s effective, "
                         f"{g.fixed_s * 1e6:.0f} us per call | {' '.join(g.source.split())} |")
        if p.memory_Bps:
            lines.append(f"| {p.name} | memory | {p.memory_Bps / 1e12:.3g} TB/s effective | "
                         f"{p.sources.get('memory_Bps', '')} |")
        if p.launch_overhead_s:
            lines.append(f"| {p.name} | launch overhead per phase | {p.launch_overhead_s * 1e6:.0f} us | "
                         f"{p.sources.get('launch_overhead_s', '')} |")
        lines.append(f"| {p.name} | host sync per iteration | {p.host_sync_s * 1e6:.0f} us | "
                     f"{p.sources.get('host_sync_s', '')} |")
    return "\n".join(lines)


def summary_errors(data: dict[str, Any]) -> dict[str, float]:
    """Largest per-phase median error in each held-out set."""
    out: dict[str, float] = {}
    for per_set in data.values():
        for name, e in per_set.items():
            if "train" in name:
                continue
            out[name] = max(out.get(name, 0.0), e["median_abs"])
    return out


def _show(p: Path) -> str:
    try:
        return Path(p).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return Path(p).as_posix()


def over_25(errors: dict[str, Any]) -> str:
    items = [(name, key, e["median_abs"]) for key, per_set in errors.items() for name, e in per_set.items()
             if "train" not in name and "across" not in name and e["median_abs"] >= 0.245]
    return ", ".join(f"{key} in '{name}' ({v * 100:.0f}%)" for name, key, v in sorted(items))


def signed(val: dict[str, Any], held_out: str, keys) -> str:
    """'key +N%' per phase key: the signed median error in a held-out set (positive: predicted too slow)."""
    return ", ".join(f"{k} {val['errors'][k][held_out]['median_signed'] * 100:+.0f}%" for k in keys)


def generate(run2_dir: Path, run4_dir: Path, out_md: Path, *, train_hidden: tuple[int, ...] = (128, 512),
             train_tokens: tuple[int, ...] = (256, 1024)) -> Path:
    fig_dir = out_md.parent / "scaling"
    fig_dir.mkdir(parents=True, exist_ok=True)
    run2, run4 = outputs.load_run(run2_dir), outputs.load_run(run4_dir)
    s2, s4 = _tag(run2), _tag(run4)
    both = s2 + s4
    rel = lambda p: p.relative_to(out_md.parent).as_posix()  # noqa: E731

    figs = {
        "share_2": plots.share_vs_c([s for s in s2 if s["config"]["tokens"] in (256, 1024)],
                                    fig_dir / "share_vs_c_2ranks.png"),
        "share_4": plots.share_vs_c([s for s in s4 if s["config"]["tokens"] == 1024 or
                                     (s["config"]["tokens"] == 256 and s["config"]["hidden"] == 128)],
                                    fig_dir / "share_vs_c_4ranks.png"),
        "breakdown": plots.breakdown_vs_ep([s for s in both if s["config"]["tokens"] == 1024
                                            and s["config"]["hidden"] == 256],
                                           fig_dir / "breakdown_vs_ep.png", max_groups=3),
        "bytes": plots.bytes_rounds([s for s in s2 if s["config"]["tokens"] == 1024], fig_dir / "bytes_rounds.png"),
        "skew": plots.skew_effect(s2, fig_dir / "skew.png"),
    }

    val = validate.validate(run2_dir, run4_dir, train_hidden=train_hidden, train_tokens=train_tokens)
    val25 = validate.validate(run2_dir, run4_dir, train_hidden=train_hidden, train_tokens=train_tokens,
                              quantile="p25")
    alt = validate.validate(run2_dir, None, train_hidden=train_hidden, train_tokens=(256, 512))
    (fig_dir / "validation.json").write_text(json.dumps(
        {"errors_median": val["errors"], "errors_p25": val25["errors"], "cases": val["cases"],
         "extrapolation_in_T_median": alt["errors"],
         "profiles_median": {k: p.to_dict() for k, p in val["profiles"].items()},
         "profiles_p25": {k: p.to_dict() for k, p in val25["profiles"].items()}}, indent=1) + "\n")
    fit2_link = val["profiles"]["fit 2"].links["intra"]
    worst = summary_errors(val["errors"])
    worst25 = summary_errors(val25["errors"])
    loads = f"{run2['meta']['load_average'][0]:.0f}-{run4['meta']['load_average'][0]:.0f}"

    coe = load_config(ROOT / "configs/paper/coe-2-4of64.yaml")
    moe = load_config(ROOT / "configs/paper/moe-8of64.yaml")
    gpus = [8, 64, 512, 4096]
    projections = {}
    for prof_name in ("h100-nvlink-ib400", "h200-nvlink-ib400"):
        prof = load_profile(prof_name)
        for ep in ("max", "node"):
            rows = project.project(prof, [coe, moe], gpus, ep_mode=ep)
            projections[(prof_name, ep)] = rows
    h100 = projections[("h100-nvlink-ib400", "max")]
    project.plot(h100, fig_dir / "projection_h100.png",
                 "CoE-2(4/64) vs MoE(8/64), H100 profile, ep = min(GPUs, 63), 4096 tokens/GPU")
    project.plot(projections[("h100-nvlink-ib400", "node")], fig_dir / "projection_h100_ep8.png",
                 "CoE-2(4/64) vs MoE(8/64), H100 profile, ep = 8 (one NVLink node), 4096 tokens/GPU")
    modes = {ep: dispatch_projections(load_profile("h100-nvlink-ib400"), coe, moe, gpus, ep) for ep in ("max", "node")}
    (fig_dir / "projection.json").write_text(json.dumps(
        {f"{k[0]}/ep-{k[1]}": v for k, v in projections.items()}
        | {f"h100-nvlink-ib400/ep-{ep}/{mode}": rows
           for ep, by_mode in modes.items() for mode, rows in by_mode.items()},
        indent=1) + "\n")
    cpu = load_profile("cpu-local")
    h100_prof = load_profile("h100-nvlink-ib400")
    h100_lat = h100_prof.links["intra"].latency_s + h100_prof.host_sync_s / 5  # per call; one sync per 5 calls

    n_routed = coe.moe.num_experts
    modes_k = {name: (cfg.moe.top_k, distinct_ranks_per_token(n_routed, cfg.moe.top_k, 8))
               for name, cfg in (("coe", coe), ("moe", moe))}

    def row(rows, g, m):
        return next(r for r in rows if r["gpus"] == g and r["model"].startswith(m))

    c8, m8 = row(h100, 8, "CoE"), row(h100, 8, "MoE")
    node_gain = {m: row(modes["max"]["node_dedup"], 64, m)["tokens_per_s_per_gpu"]
                 / row(modes["max"]["copies"], 64, m)["tokens_per_s_per_gpu"] - 1 for m in ("CoE", "MoE")}
    c64, m64 = row(h100, 64, "CoE"), row(h100, 64, "MoE")
    cs2 = [s for s in _forced(s2) if s["config"]["hidden"] == 256 and s["config"]["tokens"] == 1024]
    by_c = {s["config"]["iterations"]: s for s in cs2}
    n = {k: len(v) for k, v in val["cases"].items()}
    n1, n_t, n_d = n.get("fit 1 (train)", 0), n.get("other T", 0), n.get("other d", 0)
    n2, n4 = n.get("fit 2 (train)", 0), n.get("ep 4 from ep 2", 0)
    tk = ", ".join(map(str, train_tokens))
    dk = ", ".join(map(str, train_hidden))
    mib8 = f"{c8['a2a_mib_per_step']:.0f} vs {m8['a2a_mib_per_step']:.0f}"
    share64 = f"{c64['a2a_share'] * 100:.0f}% vs {m64['a2a_share'] * 100:.0f}%"
    tps64 = f"{c64['tokens_per_s_per_gpu']:,.0f} vs {m64['tokens_per_s_per_gpu']:,.0f}"
    extra_rounds = c8["a2a_rounds_per_step"] - m8["a2a_rounds_per_step"]
    m2, m4 = run2["meta"], run4["meta"]

    md = f"""# Communication scaling of expert-parallel CoE: measure, model, project

*Generated by `python -m coe_dist.bench.scaling_doc` from the bench runs in `{_show(run2_dir)}` and
`{_show(run4_dir)}` and the profiles in `configs/profiles/`. Do not edit by hand: rerun the commands below.*

CoE-C(K/N) routes every token C times, K experts each time; MoE(CK/N) routes it once to C*K experts. Both move
the same token copies, so the same bytes, but CoE needs a full round trip (count exchange, dispatch, combine,
and the two backward all-to-alls) per iteration: **C times as many all-to-all rounds per layer and step**.
This page measures what that costs here, models it, and projects it to GPU clusters.

## Reproduce

```bash
# 1. measure on 2 ranks (+ all-to-all and GEMM microbenchmarks -> the cpu-local profile), ~3 min
coe-dist bench comm --nproc 2 --grid configs/bench/scaling.yaml --calibrate \\
    --profile-name cpu-local --profile-out configs/profiles/cpu-local.yaml \\
    --out benchmarks/results/scaling-2ranks --report
# 2. measure on 4 ranks, ep 2 and ep 4 interleaved in one run (+ the link sweep at 2, 3 and 4 ranks), ~6 min
coe-dist bench comm --nproc 4 --grid configs/bench/scaling.yaml --ep-size 2,4 --calibrate \\
    --out benchmarks/results/scaling-4ranks --report
# 3. project the paper configs on GPU clusters
coe-dist bench project --profile h100-nvlink-ib400 --gpus 8,64,512,4096 --model configs/paper/coe-2-4of64.yaml
# 4. this page (plots in docs/scaling/, validation errors in docs/scaling/validation.json)
python -m coe_dist.bench.scaling_doc
```

On a cluster, `slurm/bench.sbatch` runs step 1 on every GPU (`coe-dist bench comm` under srun/torchrun;
NCCL, CUDA-event timing) and `--calibrate` writes that cluster's profile.

## What is measured, and how

`coe-dist bench comm` builds one CoE layer per case from the project's own pieces (`Router`, `permute`,
`unpermute`, the dispatchers' exchange `_InFlight`, `GroupedExperts`, `SwiGLU`) inside
`coe_dist/bench/layer.py`, so the model code stays untouched, and times every phase of every (layer, iteration)
on every rank: route, permute, counts (the `[P, E+1]` count all-to-all, per-expert counts and the sender's total as the
dispatcher sends them, and the one `.tolist()` of the split sizes with the dispatcher's check), dispatch
all-to-all, regroup (received rows to expert order), experts (one grouped GEMM pass), ungroup, combine
all-to-all, (shared experts), unpermute (weight by g, sum, residual), and the backward of each.

* **Forward**: the phases run one after the other on detached copies of their inputs that require grad (the
  graph is cut at every phase boundary), each bracketed by the timer.
* **Backward**: run explicitly, phase by phase in reverse order, with `torch.autograd.grad` on each phase's
  saved outputs, handing it the gradients of its outputs and collecting those of its inputs (a tensor used by
  several phases, like the iteration's input h, sums the gradients of all its consumers). Each phase's
  backward is exactly the work autograd would run for it (the all-to-all backward is the all-to-all with
  swapped splits), timed on its own, with no hooks in the model. We chose this over autograd hooks because a
  hook only sees when a node starts or ends, not which phase a kernel belongs to, and on CUDA it would need a
  synchronisation per hook.
* **Synchronisation**: a barrier (a one-element all-reduce in the expert-parallel group) precedes every
  all-to-all, forward and backward, so an all-to-all's time is the transfer, not the wait for a slower rank.
  CPU: wall clock (every op, gloo included, is synchronous). CUDA: `torch.cuda.Event` pairs on the current
  stream, read after one synchronisation per step, so timing adds no host syncs beyond the protocol's own.
* **Statistics**: warm-up rounds, then {m2['repeats']} timed rounds; the cases run round-robin (the order rotates
  every round), so drift of this shared machine hits all cases alike. Per (repeat, layer, iteration, phase) we
  keep the slowest rank (what the step pays) and the fastest rank (the intrinsic cost: for a local phase a
  rank that had a core to itself, for an all-to-all the transfer without the wait for a late partner); we quote
  medians over repeats, with quartiles in `summary.json`.
* **Bytes**: counted per rank and call from the split sizes (rows to other ranks x d x element size). Under
  forced-balanced routing they equal the analytic `T*K*(P-1)/P*d*bytes` exactly (checked by
  `tests/test_bench.py` for every call on every rank).
* **Routing**: `forced-balanced` (every rank sends exactly T*K/N copies to each expert: constructed expert
  ids), `learned-random` (random router weights, real top-k), `skewed` (Zipf exponent s: expert e drawn with
  weight (e+1)^-s, K distinct per token; expert 0 lives on rank 0).

Outputs per run: `measurements.csv` (every phase of every rank, repeat, layer and iteration; gzipped in
`benchmarks/results/` to keep the repository small),
`summary.json`/`summary.csv` (medians, quartiles, bytes, rounds), TensorBoard scalars, PNG plots and, with
`--report`, a markdown page.

### The machine

This is a shared VM with 2 cores; other jobs ran during the measurements (load average in the lines below), so
absolute times drift and ranks are descheduled. Compare ratios within one run; the 4-rank run puts 2 ranks on
each core.

{meta_lines(m2)}
{meta_lines(m4)}

## Results on this machine

### All-to-all share vs C at fixed C*K = 4 (N = 8 experts, f = 256, bf16)

Same bytes per step for C = 1, 2, 4 (K = 4, 2, 1), 1x, 2x, 4x the rounds:

![share vs C, 2 ranks]({rel(figs['share_2'])})

![share vs C, 4 ranks]({rel(figs['share_4'])})

{share_table(_forced(s2) + _forced(s4))}

At d = 256, T = 1024 on 2 ranks the all-to-all time (slowest rank) goes
{' -> '.join(f"{by_c[c]['comm']['median'] * MS:.1f}" for c in sorted(by_c))} ms for C =
{', '.join(str(c) for c in sorted(by_c))} while the bytes stay at
{max(by_c[1]['bytes']['data_per_step_per_rank']['0']) / 2 ** 20:.1f} MiB per rank and step: the extra cost of
CoE is the per-round latency (about {cpu.links['intra'].latency_per_peer_s * 1e3:.2f} ms per peer per call
here, {cpu.links['intra'].bandwidth_Bps / 1e9:.2f} GB/s; see the cpu-local profile), and its share of the step
grows with C and shrinks with T and d (more compute per round).

### Bytes and rounds per step

![bytes and rounds]({rel(figs['bytes'])})

### Step time by phase vs ep size

![breakdown vs ep]({rel(figs['breakdown'])})

ep 2 vs ep 4 in the same 4-rank run (same machine load; at ep 2 the 4 ranks form two groups that run at the
same time):

{ep_table(s4)}

At ep 4 every rank sends 3/4 of its copies off-rank instead of 1/2 and talks to 3 peers instead of 1, so the
all-to-all time grows with P even at fixed bytes per token.

### Routing skew

![routing skew]({rel(figs['skew'])})

{skew_table(both)}

Under Zipf skew the rank holding the hot experts receives more rows: its expert GEMMs and its all-to-all
volume grow with the skew, and every other rank waits for it at the next all-to-all.

## Cost model (`coe_dist/bench/model.py`)

Per layer-iteration and rank (T tokens, K, N experts, P ranks per expert-parallel group, g ranks per node,
B = T*K*(P-1)/P*d*bytes sent off-rank per data all-to-all):

* all-to-all on one node: `a(P-1) + B / bw_intra`; across nodes (P > g), hierarchical in two stages as DeepEP's
  normal kernels (RDMA between nodes, then NVLink forwarding):
  `a_inter(n-1) + B_inter / bw_inter + a_intra(g-1) + (B_intra + B_inter*(g-1)/g) / bw_intra`,
  B_inter = B(P-g)/(P-1), B_intra = B(g-1)/(P-1), n = ceil(P/g); `a(k) = latency + k * latency_per_peer`
  (GPU profiles: fixed; `--calibrate` fits both from its all-to-all sweep over every group size of a node,
  all per peer when the node has 2 ranks: gloo exchanges pairwise);
* count exchange: the same with (P-1)*E*8 bytes, plus the host sync of the split sizes; each data all-to-all
  call site may add a measured software overhead (autograd, allocation) beyond the link;
* experts: `fixed + FLOPs / GEMM rate (+ weight bytes / memory bandwidth)`, FLOPs = 6 R d f forward, 12 R d f
  backward for R token copies on the rank;
* route, permute, regroup, ungroup, unpermute: affine in their size (T N d, T K d, R d); measured profiles fit
  them, GPU profiles derive them from HBM bandwidth and a launch overhead;
* CPU profiles multiply every phase by the oversubscription max(1, ranks x threads / cores) when predicting
  the slowest rank of a run whose ranks share cores.

Nothing here overlaps communication with compute (blocking collectives and one host sync per iteration), so
all communication is exposed: share = (counts + dispatch + combine, forward and backward) / step.

### Profiles

{profile_table(["cpu-local", "h100-nvlink-ib400", "h200-nvlink-ib400"])}

The CPU profile (`configs/profiles/cpu-local.yaml`) is measured by `--calibrate`: the link from an all-to-all
sweep ({', '.join(str(r['bytes_offrank']) for r in run2.get('calibration', {}).get('a2a', []))} bytes
off-rank), the expert GEMM from a grouped-GEMM sweep, the other phases from the grid. The GPU profiles are not
measured here (this task had no GPU): every number names its datasheet or published benchmark, "assumed" marks
those we could not source.

## Validation: fit on part of the local measurements, predict the rest

Fit 1: the 2-rank run at d in {{{dk}}}, T in {{{tk}}} ({n1} cases); held out: T = 512 at the same d
({n_t} cases) and d = 256 at every T ({n_d} cases). Fit 2: the 4-rank run's ep-2 cases ({n2}) and its all-to-all
sweep at 2 and 3 ranks (the link: two group sizes tell a per-call latency from a per-peer one); held out: its
ep-4 cases ({n4}), and, for information only (two runs at different times and loads, which the rest of this
page never compares), the same ep-4 cases predicted from fit 1 ("ep 4 across runs"). Fastest-rank
times (the intrinsic cost: 4 ranks time-sharing 2 cores, plus the other jobs on the machine, make the slowest
rank's times a property of the scheduler, not of the layer). Cell: median |predicted - measured| / measured
over the held-out cases (worst case in brackets), per layer-iteration.

Medians over the repeats (as everywhere on this page):

{val['markdown']}

Largest per-phase error in each held-out set: {', '.join(f"{k} {v * 100:.0f}%" for k, v in worst.items())}.
At or over 25% (leaving out the informational across-runs column): {over_25(val['errors']) or 'none'}.

The same with the lower quartile over the repeats instead of the median, as a check of how much the
statistic matters. With the load average at {loads} on 2 cores, a phase's times over the repeats are bimodal
(the rank kept its core, or waited a scheduler time slice of a few ms); where the error moves a lot between
the two tables, scheduling noise, not the model, dominates that phase:

{val25['markdown']}

Largest per-phase error in each held-out set: {', '.join(f"{k} {v * 100:.0f}%" for k, v in worst25.items())}.
At or over 25% (same): {over_25(val25['errors']) or 'none'}.

Where the remaining errors come from (fitted coefficients and case lists: `docs/scaling/validation.json`):

* the expert GEMMs on this CPU get slower per FLOP once a rank's activations leave the 1 MiB L2 (T = 1024 at
  C = 1 is 4096 rows); the affine model averages over the training range, so extrapolating in T is worse than
  interpolating: trained on T in {{256, 512}} and predicting T = 1024 the median errors are
  {', '.join(f"{k} {v['other T']['median_abs'] * 100:.0f}%" for k, v in alt['errors'].items()
             if 'other T' in v and v['other T']['median_abs'] > 0.25) or 'all under 25%'};
* the all-to-all phases (counts, dispatch, combine) last about a millisecond here, the length of a scheduling
  delay: the bimodality above is their main source of error;
* the small local phases (route, ungroup) are a few hundred microseconds, where a descheduled rank or a cache
  miss is a large fraction. Fit 1 spans two hidden sizes, so the phases with two size terms (the router: its
  T N d multiply-adds and its T N softmax and top-k) get both fitted; one hidden size cannot tell them apart;
* unpermute is K multiply-adds per token (`_WeightedSum` in `coe_dist/parallel/dispatch.py`), linear in T K d.
  One [1, K] x [K, D] product per token (torch.bmm) took a slow path on this CPU for K D < 512, so K = 1 cost
  more than K = 2 and no affine model fitted it;
* ep 4 from ep 2 (the all-to-alls): at ep 2 every exchange has one peer, so the grid alone cannot tell a
  per-call latency from a per-peer one. Fit 2 takes the link from the `--calibrate` all-to-all sweep at 2 and
  3 ranks ({fit2_link.latency_s * 1e6:.0f} us per call + {fit2_link.latency_per_peer_s * 1e6:.0f} us per peer, \
{fit2_link.bandwidth_Bps / 1e9:.2f} GB/s) and from the ep-2 cases only what
  each call site adds to it, per call; the signed median errors at ep 4 are {signed(val, "ep 4 from ep 2", COMM_KEYS)}
  (positive: predicted too slow). Fit 1 (2 ranks, one group size) charges all latency per peer, which
  over-predicts the count exchange at ep 4 across runs ({signed(val, "ep 4 across runs", ["counts_fwd"])});
* across runs (fit 1 -> the 4-rank run) the long phases suffer most: an expert backward of 10-90 ms is longer
  than a scheduler time slice, so with 4 ranks on 2 cores even the fastest rank shares its core for part of
  it, which a model of a rank with a core to itself does not include.

## Projection: CoE-2(4/64) vs MoE(8/64) on H100-class clusters

`coe-dist bench project --profile h100-nvlink-ib400 --gpus 8,64,512,4096 --model configs/paper/coe-2-4of64.yaml`
(the equal-FLOP MoE is derived: C = 1, K' = C(K+S) - S = 7 routed + 1 shared, the same as
`configs/paper/moe-8of64.yaml`). Paper model: d = 1024, 4 layers, 63 routed experts of width 704 + 1 shared,
4096 tokens per GPU (8 x 512), bf16. Expert parallelism over min(GPUs, 63) ranks (beyond 63 GPUs the rest is
expert-data parallelism: the all-to-all group, and so the per-GPU step, stops changing; tokens/s grows
linearly). The rest of the transformer is counted as GEMM FLOPs; gradient reduction (ZeRO, overlapped) is left
out.

{project.markdown_table(h100)}

![projection H100]({rel(fig_dir / 'projection_h100.png')})

With the expert-parallel group kept inside one NVLink node (`--ep-size node`, ep = 8):

{project.markdown_table(projections[("h100-nvlink-ib400", "node")])}

![projection H100 ep 8]({rel(fig_dir / 'projection_h100_ep8.png')})

H200 nodes (same compute and links, faster HBM: only the memory-bound phases change):

{project.markdown_table(projections[("h200-nvlink-ib400", "max")])}

Reading: on 8 GPUs (one NVLink node) CoE-2(4/64) spends {c8['a2a_ms']:.2f} ms per step in all-to-alls vs
{m8['a2a_ms']:.2f} ms for MoE(8/64): it sends {mib8} MiB per GPU (6 routed copies per token instead of 7) in
{c8['a2a_rounds_per_step']} rounds instead of {m8['a2a_rounds_per_step']}. Once the expert-parallel group spans
nodes (64 GPUs and up), the all-to-all is InfiniBand-bound: {c64['a2a_ms']:.1f} vs {m64['a2a_ms']:.1f} ms, {share64}
of the step, and CoE's fewer bytes outweigh its extra latency ({tps64} tokens/s per GPU). CoE's {extra_rounds}
extra rounds cost about {extra_rounds * h100_lat * 1e3:.1f} ms of latency per step inside a node
(plus the host syncs); they would dominate only at much smaller T per GPU (inference-like batches), where
B / bandwidth is small.

## Deduplicated dispatch: before and after

`moe.dispatch: dedup` sends a token once to each rank that holds any of its K experts (with a slot of gate and
local expert id per copy, 8 bytes each) and gets one pre-summed row back per rank, instead of one row per copy
each way; `moe.dispatch_dtype: fp8` sends the forward dispatch rows as e4m3 + a float32 scale (d + 4 bytes
instead of 2d). Under uniform routing a token reaches P * (1 - C(N - N/P, K) / C(N, K)) distinct ranks
(`coe_dist.bench.model.distinct_ranks_per_token`): with the paper's {n_routed} routed experts at ep 8 (8 experts on
the busiest rank), {modes_k['coe'][1]:.2f} rows instead of {modes_k['coe'][0]} routed copies for CoE-2(4/64) and
{modes_k['moe'][1]:.2f} instead of {modes_k['moe'][0]} for MoE(8/64) (the shared expert is local; with 64 routed
experts and K = 4 or 8: 3.38 and 5.43). The slots travel in the rows' own all-to-all call. Columns: copies
(the first table's numbers), dedup, dedup + fp8, dedup + placement: the distinct ranks per token measured
under learned routing with experts placed by co-selection (`benchmarks/learned_bytes.py` on the repro runs'
recorded choices, 64 routed experts, the same K as here; `docs/performance.md`), and dedup + devlim: the same
measured on runs trained with device-limited routing (`moe.routing_groups=8 moe.routing_group_topk=2`: each
token's experts in its best 2 of 8 groups, so on at most 2 ranks), no placement. Both are used where such a
measurement exists for that ep (ep 8 and below); elsewhere the column repeats dedup. They carry the small
models' routing statistics over to the paper's width: an assumption, not a measurement at that scale.

Expert-parallel group inside one NVLink node (`--ep-size node`, ep = 8):

{dispatch_table(modes["node"])}

ep = min(GPUs, 63), as the first projection table: from 64 GPUs on every rank holds one expert, so every copy
has its own rank and dedup cannot merge rows (it only adds its 8-byte slot per row); fp8 still halves the
forward dispatch:

{dispatch_table(modes["max"])}

The last column, `moe.dispatch: node_dedup` (`coe_dist/parallel/node_dedup.py`), sends a token once to each
other node holding any of its experts (to the rank there with its own local rank), which forwards it to the
node's ranks holding them, as DeepEP's normal kernels do: fewer rows cross InfiniBand, more cross NVLink, and
every call pays both hops' latency. Inside one node (the first table) it is dedup with an extra hop to itself.
Its MiB column counts both hops' bytes. Under uniform routing a token sends (n - 1) * p(G E) rows to the other
nodes, with p(x) = 1 - C(N - x, K) / C(N, K) the chance that x given experts hold one of its K, G ranks per node
and E experts per rank (module doc of `coe_dist/bench/model.py`); at ep 63 (8 nodes of 8, one expert a rank)
that is 7 * p(8) rows instead of the K * 55/62 copies bound for other nodes. Tokens/s per GPU from 64 GPUs up:
{node_gain['CoE'] * 100:+.0f}% for CoE-2(4/64), {node_gain['MoE'] * 100:+.0f}% for MoE(8/64) against copies; a
larger K has more copies per node to merge. Uniform routing only: no placement measurement is carried over to it.

## Limits

* The local numbers come from gloo on 2 shared CPU cores; they validate the model's structure (latency per
  round, bytes / bandwidth, compute from FLOPs) and the bench, not GPU speeds. The GPU profiles' link numbers
  are published all-to-all measurements (DeepEP), their latencies and GEMM efficiency are assumptions.
* The projection ignores overlap of communication with compute (the bench and the model time blocking
  all-to-alls; `moe.overlap` and `moe.a2a_chunks` hide part of them, measured by `benchmarks/overlap.py`), gradient
  reduction, attention kernels' real efficiency and load imbalance (uniform routing: pass measured skew
  through `Workload.imbalance`).
* The dedup fan-out and per-row sums are counted as the copies mode's regroup and unpermute phases; node_dedup's
  relay work (fan-out and sums of forwarded rows) is not counted beyond its second all-to-all.
"""
    out_md.write_text(md)
    return out_md


DISPATCH_MODES = {"copies": ("copies", "bf16"), "dedup": ("dedup", "bf16"), "dedup+fp8": ("dedup", "fp8"),
                  "dedup+placement": ("dedup", "bf16"), "dedup+devlim": ("dedup", "bf16"),
                  "node_dedup": ("node_dedup", "bf16")}
LEARNED = ROOT / "benchmarks" / "results" / "learned_bytes.json"
# The measured runs behind the modes that take distinct ranks from learned routing: (learned_bytes mode, the
# variant named after the model label in learned_bytes' NAME=RUN_DIR, "" for the plain run)
MEASURED_MODES = {"dedup+placement": ("dedup+placement", ""), "dedup+devlim": ("dedup", "devlim 2 of 8")}


def learned_distinct_ranks(path: Path = LEARNED, mode: str = "dedup+placement",
                           variant: str = "") -> dict[tuple[str, int], float]:
    """(model label, ep) -> distinct ranks per token measured under learned routing (benchmarks/learned_bytes.py:
    rows to other ranks x P / (P - 1)) in `mode`, of the runs named "<label> <variant>"; empty without the file."""
    if not path.is_file():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {(r["model"].partition(" ")[0], r["ep"]): r["rows_per_token_iteration"] * r["ep"] / (r["ep"] - 1)
            for r in rows if r["mode"] == mode and r["model"].partition(" ")[2] == variant}


def dispatch_projections(profile, coe, moe, gpus: list[int], ep_mode: str) -> dict[str, list[dict]]:
    """The projection of both models under each dispatch mode (moe.dispatch, moe.dispatch_dtype). The placement
    and device-limited modes take the measured distinct ranks where there is a measurement for that model and
    ep (else uniform routing's, i.e. the dedup column)."""
    out = {}
    for mode, (dispatch, wire) in DISPATCH_MODES.items():
        models = [dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=dispatch, dispatch_dtype=wire))
                  for cfg in (coe, moe)]
        measured = learned_distinct_ranks(LEARNED, *MEASURED_MODES[mode]) if mode in MEASURED_MODES else None
        out[mode] = project.project(profile, models, gpus, ep_mode=ep_mode, distinct_ranks=measured)
    return out


def dispatch_table(modes: dict[str, list[dict]]) -> str:
    """Before (copies) / after (the other modes): exposed all-to-all ms, MiB sent and tokens/s per GPU."""
    names = list(modes)
    lines = ["| GPUs | model | ep | " + " | ".join(f"a2a ms {m}" for m in names) + " | "
             + " | ".join(f"MiB/GPU/step {m}" for m in names) + " | "
             + " | ".join(f"tokens/s/GPU {m}" for m in names) + " |", "|" + "---|" * (3 + 3 * len(names))]
    for i, base in enumerate(modes["copies"]):
        rows = [modes[m][i] for m in names]
        lines.append(f"| {base['gpus']} | {base['model']} | {base['ep_size']} | "
                     + " | ".join(f"{r['a2a_ms']:.2f}" for r in rows) + " | "
                     + " | ".join(f"{r['a2a_mib_per_step']:.0f}" for r in rows) + " | "
                     + " | ".join(f"{r['tokens_per_s_per_gpu']:,.0f}" for r in rows) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run2", default=str(ROOT / "benchmarks/results/scaling-2ranks"))
    ap.add_argument("--run4", default=str(ROOT / "benchmarks/results/scaling-4ranks"))
    ap.add_argument("--out", default=str(ROOT / "docs/scaling.md"))
    args = ap.parse_args(argv)
    out = generate(Path(args.run2), Path(args.run4), Path(args.out))
    print(f"wrote {out} and {out.parent / 'scaling'}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

