"""PNG plots of bench runs (matplotlib, Agg backend): phase breakdown vs ep size, exposed all-to-all share vs C
at fixed C*K, bytes and rounds per step, effect of routing skew.

Every function takes case summaries (outputs.summarise), each optionally tagged with `world` (the run's
number of ranks), and writes one PNG; it returns None when the summaries hold nothing to plot.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from coe_dist.bench.model import ALL_PHASES, COMM_PHASES  # noqa: E402

PHASE_COLORS = {
    "route": "#c7e9c0", "permute": "#74c476", "regroup": "#9e9ac8", "experts": "#08519c", "ungroup": "#6a51a3",
    "shared": "#6baed6", "unpermute": "#238b45",
    "counts": "#fdae6b", "dispatch": "#fb6a4a", "combine": "#cb181d",
}
MS = 1e3


def _cfg(s: dict) -> dict:
    return s["config"]


def save_png(fig, path: Path) -> Path:
    """Lay out, write and close a figure (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _phase_totals(s: dict) -> dict[str, float]:
    """Median seconds per phase per step, forward + backward."""
    out: dict[str, float] = defaultdict(float)
    for pk, st in s["phases"].items():
        out[pk.rsplit("_", 1)[0]] += st["median"]
    return out


def dispatch_label(c: dict) -> str:
    """A case's dispatch mode: copies, dedup, copies+fp8 or dedup+fp8 (runs from before the modes: copies)."""
    return c.get("dispatch", "copies") + ("+fp8" if c.get("dispatch_dtype", "bf16") == "fp8" else "")


def _mode(c: dict) -> str:
    """' dedup+fp8' etc. for a plot label; '' for the default mode, so labels of copies runs stay as they were."""
    mode = dispatch_label(c)
    return "" if mode == "copies" else f" {mode}"


def _label(c: dict, skip: tuple[str, ...] = ()) -> str:
    parts = []
    if "iterations" not in skip:
        parts.append(f"C{c['iterations']}K{c['top_k']}")
    if "num_experts" not in skip:
        parts.append(f"N{c['num_experts']}")
    if "hidden" not in skip:
        parts.append(f"d{c['hidden']}")
    if "tokens" not in skip:
        parts.append(f"T{c['tokens']}")
    if "ep_size" not in skip:
        parts.append(f"P{c['ep_size']}")
    return " ".join(parts) + _mode(c)


def breakdown_vs_ep(summaries: list[dict], path: Path, *, max_groups: int = 6) -> Path | None:
    """Stacked bars: median step time per phase (fwd + bwd) for each ep size (and run), per layer config."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        c = _cfg(s)
        if c["routing"] != "forced-balanced":
            continue
        key = (c["iterations"], c["top_k"], c["num_experts"], c["hidden"], c["expert_hidden"], c["tokens"],
               dispatch_label(c))
        groups[key].append(s)
    if not groups:
        return None
    # Prefer configs measured at several ep sizes, then the largest.
    keys = sorted(groups, key=lambda k: (-len({(_cfg(s)["ep_size"], s.get("world")) for s in groups[k]}),
                                         -k[5], -k[3], k[0]))[:max_groups]
    keys.sort()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * sum(len(groups[k]) for k in keys) + 2), 4.6))
    x, ticks, labels = 0, [], []
    seen = set()
    for k in keys:
        entries = sorted(groups[k], key=lambda s: (s.get("world", 0), _cfg(s)["ep_size"]))
        for s in entries:
            totals = _phase_totals(s)
            bottom = 0.0
            for phase in ALL_PHASES:
                v = totals.get(phase, 0.0) * MS
                if v <= 0:
                    continue
                ax.bar(x, v, bottom=bottom, color=PHASE_COLORS[phase], edgecolor="white", linewidth=0.3,
                       label=phase if phase not in seen else None)
                seen.add(phase)
                bottom += v
            world = f"/{s['world']}r" if "world" in s else ""
            ticks.append(x)
            labels.append(f"P{_cfg(s)['ep_size']}{world}\n{_label(_cfg(s), ('ep_size', 'num_experts'))}")
            x += 1
        x += 0.6
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel("median step time per phase (ms, fwd + bwd)")
    ax.set_title("Step time by phase vs expert-parallel size (forced-balanced routing)")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return save_png(fig, path)


def share_vs_c(summaries: list[dict], path: Path) -> Path | None:
    """All-to-all share of the step (median, quartiles) vs C at fixed C*K, one line per setting: left the
    slowest rank's all-to-all time (what the step pays, waits for late partners included), right the
    fastest rank's (the transfers themselves)."""
    lines: dict[tuple, list[tuple[int, dict]]] = defaultdict(list)
    for s in summaries:
        c = _cfg(s)
        if c["routing"] != "forced-balanced":
            continue
        key = (s.get("world") or 0, c["ep_size"], c["iterations"] * c["top_k"], c["hidden"], c["tokens"],
               _mode(c))
        lines[key].append((c["iterations"], s))
    lines = {k: v for k, v in lines.items() if len({c for c, _ in v}) > 1}
    if not lines:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    cmap = plt.get_cmap("tab10")
    for i, ((world, P, ck, d, T, mode), pts) in enumerate(sorted(lines.items())):
        pts.sort(key=lambda p: p[0])
        cs = [p[0] for p in pts]
        w = f"{world} ranks, " if world else ""
        for ax, key in zip(axes, ("comm_share", "comm_share_min_rank"), strict=True):
            if key not in pts[0][1]:
                continue
            med = [p[1][key]["median"] * 100 for p in pts]
            lo = [m - p[1][key]["p25"] * 100 for m, p in zip(med, pts, strict=True)]
            hi = [p[1][key]["p75"] * 100 - m for m, p in zip(med, pts, strict=True)]
            ax.errorbar(cs, med, yerr=[lo, hi], marker="o", capsize=3, color=cmap(i % 10),
                        linestyle="-" if P == 2 else "--", label=f"{w}P={P} d={d} T={T} (C*K={ck}){mode}")
    for ax, title in zip(axes, ("slowest rank (what the step pays)", "fastest rank (the transfers)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c for v in lines.values() for c, _ in v}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("iterations C (K = C*K / C)")
        ax.set_title(f"All-to-all share of the step: {title}", fontsize=9)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("all-to-all time / step time (%)")
    axes[0].legend(fontsize=6.5)
    return save_png(fig, path)


def bytes_rounds(summaries: list[dict], path: Path) -> Path | None:
    """Bytes sent per rank per step (measured) and all-to-all rounds per step vs C at fixed C*K."""
    pts: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for s in summaries:
        c = _cfg(s)
        if c["routing"] != "forced-balanced":
            continue
        pts[(c["iterations"] * c["top_k"], c["hidden"], c["tokens"], c["ep_size"], _mode(c))][c["iterations"]] = s
    pts = {k: v for k, v in pts.items() if len(v) > 1}
    if not pts:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    n = len(pts)
    width = 0.8 / n
    allc = sorted({c for v in pts.values() for c in v})
    for i, (key, by_c) in enumerate(sorted(pts.items())):
        ck, d, T, P, mode = key
        xs = [allc.index(c) + (i - (n - 1) / 2) * width for c in sorted(by_c)]
        mib = [max(by_c[c]["bytes"]["data_per_step_per_rank"]["0"] or [0]) / 2 ** 20 for c in sorted(by_c)]
        a1.bar(xs, mib, width=width, label=f"C*K={ck} d={d} T={T} P={P}{mode}")
        rounds = [by_c[c]["rounds_per_step"]["total"] for c in sorted(by_c)]
        a2.plot(sorted(by_c), rounds, marker="o", label=f"C*K={ck} P={P}{mode}")
    a1.set_xticks(range(len(allc)), [str(c) for c in allc])
    a1.set_xlabel("iterations C")
    a1.set_ylabel("MiB sent per rank per step (data all-to-alls)")
    a1.set_title("Bytes per step: the same at fixed C*K")
    a1.legend(fontsize=7)
    a2.set_xlabel("iterations C")
    a2.set_ylabel("all-to-all calls per step (fwd + bwd, incl. counts)")
    a2.set_title("Rounds per step: grow with C")
    a2.set_xticks(allc)
    a2.legend(fontsize=7)
    return save_png(fig, path)


def routing_label(c: dict) -> str:
    return f"zipf {c['zipf']:g}" if c["routing"] == "skewed" else c["routing"]


def skew_effect(summaries: list[dict], path: Path) -> Path | None:
    """Step time split into all-to-all and the rest, and the busiest rank's load, per routing mode."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in summaries:
        c = _cfg(s)
        key = (c["iterations"], c["top_k"], c["num_experts"], c["hidden"], c["tokens"], c["ep_size"], s.get("world"),
               dispatch_label(c))
        groups[key].append(s)
    groups = {k: v for k, v in groups.items() if len({routing_label(_cfg(s)) for s in v}) > 1
              and any(_cfg(s)["routing"] == "skewed" for s in v)}
    if not groups:
        return None
    key = max(groups, key=lambda k: len(groups[k]))
    entries = sorted(groups[key], key=lambda s: (s["config"]["routing"] != "forced-balanced",
                                                 s["config"]["routing"] != "learned-random", s["config"]["zipf"]))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = []
    for i, s in enumerate(entries):
        comm = s["comm"]["median"] * MS
        rest = s["step"]["median"] * MS - comm
        ax.bar(i, rest, color="#3182bd", label="compute + local phases" if i == 0 else None)
        ax.bar(i, comm, bottom=rest, color="#cb181d",
               label="all-to-all (counts, dispatch, combine)" if i == 0 else None)
        ax.text(i, rest + comm, f"load x{s['rows_max_over_mean']:.2f}", ha="center", va="bottom", fontsize=7)
        labels.append(routing_label(s["config"]))
    ax.set_xticks(range(len(entries)), labels, fontsize=8)
    ax.set_ylabel("median step time (ms)")
    c = entries[0]["config"]
    ax.set_title(f"Routing skew: C{c['iterations']}K{c['top_k']} N{c['num_experts']} d{c['hidden']} "
                 f"T{c['tokens']} P{c['ep_size']} (load = busiest rank / mean)", fontsize=9)
    ax.legend(fontsize=7)
    return save_png(fig, path)


def run_plots(data: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """All plots of one run that its cases allow."""
    summaries = [dict(s, world=data["meta"]["world"]) for s in data["cases"]]
    made = {}
    for name, fn in (("breakdown_vs_ep", breakdown_vs_ep), ("share_vs_c", share_vs_c),
                     ("bytes_rounds", bytes_rounds), ("skew", skew_effect)):
        p = fn(summaries, out_dir / f"{name}.png")
        if p is not None:
            made[f"plot_{name}"] = p
    return made


__all__ = ["breakdown_vs_ep", "share_vs_c", "bytes_rounds", "skew_effect", "run_plots", "save_png", "COMM_PHASES"]
