"""Markdown pages from bench runs: `coe-dist bench comm --report` (one run) and the tables docs/scaling.md uses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from coe_dist.bench.plots import dispatch_label, routing_label

MS = 1e3


def _rel(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


def case_table(summaries: list[dict], *, world_column: bool = False) -> str:
    """One row per case: config (dispatch: copies | dedup, +fp8 for fp8 dispatch rows), median step /
    all-to-all time (quartiles), share, bytes and rounds."""
    head = ("| " + ("ranks | " if world_column else "") + "C | K | N | d | f | T | P | routing | dispatch | "
            "step ms (p25-p75) | all-to-all ms | a2a share | MiB/step/rank | rounds/step |")
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    for s in summaries:
        c = s["config"]
        st, cm, sh = s["step"], s["comm"], s["comm_share"]
        mib = max(max(v) if v else 0 for v in s["bytes"]["data_per_step_per_rank"].values()) / 2 ** 20
        lines.append("| " + (f"{s.get('world', '')} | " if world_column else "")
                     + f"{c['iterations']} | {c['top_k']} | {c['num_experts']} | {c['hidden']} | "
                     f"{c['expert_hidden']} | {c['tokens']} | {c['ep_size']} | {routing_label(c)} | "
                     f"{dispatch_label(c)} | "
                     f"{st['median'] * MS:.2f} ({st['p25'] * MS:.2f}-{st['p75'] * MS:.2f}) | "
                     f"{cm['median'] * MS:.2f} | {sh['median'] * 100:.1f}% | {mib:.2f} | "
                     f"{s['rounds_per_step']['total']} |")
    return "\n".join(lines)


def phase_table(summary: dict) -> str:
    lines = ["| phase | fwd ms | bwd ms |", "|---|---|---|"]
    from coe_dist.bench.model import ALL_PHASES

    for phase in ALL_PHASES:
        f = summary["phases"].get(f"{phase}_fwd")
        b = summary["phases"].get(f"{phase}_bwd")
        if f is None and b is None:
            continue
        fm = f"{f['median'] * MS:.3f}" if f else "-"
        bm = f"{b['median'] * MS:.3f}" if b else "-"
        lines.append(f"| {phase} | {fm} | {bm} |")
    return "\n".join(lines)


def meta_lines(meta: dict[str, Any]) -> str:
    load = meta.get("load_average")
    load_end = meta.get("load_average_end")
    return (f"- {meta['date']}: {meta['world']} ranks on {meta['nodes']} node(s) ({', '.join(meta['hosts'])}), "
            f"{meta['backend']} on {meta['device']}, {meta['threads_per_rank']} thread(s) per rank, "
            f"{meta['cores_per_node']} cores; {meta.get('cpu', '')}; torch {meta['torch']}\n"
            f"- {meta.get('warmup')} warm-up + {meta.get('repeats')} timed rounds per case, round-robin; "
            f"medians over the rounds of the slowest (and of the fastest) rank per phase"
            + (f"; load average {load[0]:.1f} at start, {load_end[0]:.1f} at end" if load and load_end else ""))


def write_run_report(data: dict[str, Any], run_dir: Path, target: Path) -> Path:
    """A markdown page for one run: environment, per-case table, the first case's phases, the plots."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    parts = ["# CoE all-to-all benchmark", "", meta_lines(data["meta"]), "", "## Cases", "",
             case_table(data["cases"]), ""]
    if data["cases"]:
        s = data["cases"][-1]
        parts += [f"## Phases of {s['case']} (median per step)", "", phase_table(s), ""]
    plots_dir = Path(run_dir) / "plots"
    for name, title in (("breakdown_vs_ep", "Step time by phase vs ep size"),
                        ("share_vs_c", "All-to-all share vs C at fixed C*K"),
                        ("bytes_rounds", "Bytes and rounds per step"), ("skew", "Routing skew")):
        p = plots_dir / f"{name}.png"
        if p.is_file():
            parts += [f"## {title}", "", f"![{title}]({_rel(p, target.parent)})", ""]
    target.write_text("\n".join(parts))
    return target
