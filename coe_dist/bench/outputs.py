"""What a bench run writes: every measurement (CSV), the per-case summary (JSON + CSV), TensorBoard scalars.

Aggregation, per case: for each repeat, layer, iteration and phase, the slowest rank's time (the barrier
before the next communication phase waits for it); summed over layers and iterations per repeat (the
step's time in that phase); then median, quartiles and range over the repeats. Bytes are per rank.

`phases_min_rank` / `comm_min_rank` hold the same with the fastest rank: for a local phase, the cost on
a rank that had a core to itself (on an oversubscribed CPU host some ranks wait for a core); for an
all-to-all, the transfer itself (the rank that arrives last waits least), without the wait for a partner
that was late out of the barrier. The cost model is fitted and checked against these (intrinsic costs,
what carries over to a machine where every rank has its own device); step times and the exposed share
use the slowest rank (what the step pays on this host).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from coe_dist.bench.grid import (
    DATA_A2A_KEYS,
    BenchCase,
    analytic_bytes_per_a2a,
    counts_bytes,
    expected_bytes_per_step,
    rounds_per_step,
)
from coe_dist.bench.model import COMM_PHASES, Observation

MEASUREMENT_FIELDS = ("case", "rank", "repeat", "layer", "iteration", "phase", "direction", "seconds",
                      "bytes_sent", "bytes_received", "rows")


def stats(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    if not v:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "min": float("nan"),
                "max": float("nan"), "n": 0}
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0], v[0], v[0]]
    return {"median": statistics.median(v), "p25": q[0], "p75": q[2], "min": v[0], "max": v[-1], "n": len(v)}


def summarise(rows: list[dict], cases: list[BenchCase], step_walls: dict[str, list[float]] | None = None,
              ) -> list[dict[str, Any]]:
    """Per-case summaries from all ranks' measurement rows (see module doc)."""
    by_case: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_case[r["case"]].append(r)
    out = []
    for case in cases:
        rs = by_case.get(case.key, [])
        slowest: dict[tuple, float] = {}
        fastest: dict[tuple, float] = {}
        bytes_step: dict[tuple[int, int], int] = defaultdict(int)  # (rank, repeat) -> data bytes sent
        per_a2a: dict[int, set[int]] = defaultdict(set)  # rank -> distinct bytes per data all-to-all
        per_call_site: dict[str, int] = defaultdict(int)  # dispatch_fwd, ... -> max bytes over ranks and calls
        rows_exp: dict[tuple, int] = defaultdict(int)  # (repeat, layer, iteration) -> max rows (experts fwd)
        rows_sum: dict[tuple, list[int]] = defaultdict(list)
        ranks = set()
        for r in rs:
            ranks.add(r["rank"])
            k = (r["repeat"], r["layer"], r["iteration"], f"{r['phase']}_{r['direction']}")
            slowest[k] = max(slowest.get(k, 0.0), r["seconds"])
            fastest[k] = min(fastest.get(k, float("inf")), r["seconds"])
            if r["phase"] in ("dispatch", "combine"):
                bytes_step[(r["rank"], r["repeat"])] += r["bytes_sent"]
                per_a2a[r["rank"]].add(r["bytes_sent"])
                site = f"{r['phase']}_{r['direction']}"
                per_call_site[site] = max(per_call_site[site], r["bytes_sent"])
            if r["phase"] == "experts" and r["direction"] == "fwd":
                kk = (r["repeat"], r["layer"], r["iteration"])
                rows_exp[kk] = max(rows_exp[kk], r["rows"])
                rows_sum[kk].append(r["rows"])
        repeats = sorted({k[0] for k in slowest})
        phase_keys = sorted({k[3] for k in slowest}, key=_phase_order)
        per_step: dict[str, list[float]] = {pk: [] for pk in phase_keys}
        per_step_min: dict[str, list[float]] = {pk: [] for pk in phase_keys}
        step_tot, comm_tot, share, comm_min, share_min = [], [], [], [], []
        for rep in repeats:
            tot = comm = comm_fast = 0.0
            for pk in phase_keys:
                s = sum(v for (rp, _, _, p), v in slowest.items() if rp == rep and p == pk)
                s_min = sum(v for (rp, _, _, p), v in fastest.items() if rp == rep and p == pk)
                per_step[pk].append(s)
                per_step_min[pk].append(s_min)
                tot += s
                if pk.rsplit("_", 1)[0] in COMM_PHASES:
                    comm += s
                    comm_fast += s_min
            step_tot.append(tot)
            comm_tot.append(comm)
            share.append(comm / tot if tot else 0.0)
            comm_min.append(comm_fast)
            share_min.append(comm_fast / tot if tot else 0.0)
        per_iter = defaultdict(list)
        for (_, layer, it, pk), v in slowest.items():
            per_iter[f"L{layer}/I{it}/{pk}"].append(v)
        imbalance = [max(v) / (sum(v) / len(v)) for v in rows_sum.values() if v and sum(v)]
        n_per_rank = {rank: sorted({b for (rk, _), b in bytes_step.items() if rk == rank}) for rank in ranks}
        summary = {
            "case": case.key,
            "config": case.to_dict(),
            "ranks": len(ranks),
            "repeats": len(repeats),
            "phases": {pk: stats(v) for pk, v in per_step.items()},
            "phases_min_rank": {pk: stats(v) for pk, v in per_step_min.items()},
            "per_iteration_median": {k: statistics.median(v) for k, v in sorted(per_iter.items())},
            "step": stats(step_tot),
            "comm": stats(comm_tot),
            "comm_share": stats(share),
            "comm_min_rank": stats(comm_min),
            "comm_share_min_rank": stats(share_min),
            "bytes": {
                "data_per_step_per_rank": {str(k): v for k, v in sorted(n_per_rank.items())},
                "data_per_step_expected": expected_bytes_per_step(case),
                "per_a2a_per_rank": {str(k): sorted(v) for k, v in sorted(per_a2a.items())},
                "per_a2a_max_by_call_site": dict(sorted(per_call_site.items())),
                # copies only: dedup's rows depend on the table (analytic_bytes_per_a2a)
                "per_a2a_analytic_forced_balanced": (
                    {key: analytic_bytes_per_a2a(case, key) for key in DATA_A2A_KEYS}
                    if case.routing == "forced-balanced" and case.dispatch == "copies" else None),
                "counts_per_exchange": counts_bytes(case),
            },
            "rounds_per_step": rounds_per_step(case),
            "rows_max_over_mean": statistics.median(imbalance) if imbalance else 1.0,
            "rows_max": statistics.median(rows_exp.values()) if rows_exp else 0,
        }
        if step_walls and case.key in step_walls:
            summary["step_wall"] = stats(step_walls[case.key])
        out.append(summary)
    return out


def _phase_order(pk: str) -> tuple[int, int]:
    from coe_dist.bench.model import ALL_PHASES

    phase, direction = pk.rsplit("_", 1)
    i = ALL_PHASES.index(phase) if phase in ALL_PHASES else 99
    return (0, i) if direction == "fwd" else (1, -i)


def write_csv(path: Path, fields: Sequence[str], rows: Iterable[dict]) -> Path:
    """One line per row with the columns `fields` (a row's other keys are left out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in fields})
    return path


def write_measurements(path: Path, rows: list[dict]) -> Path:
    return write_csv(path, MEASUREMENT_FIELDS, rows)


def write_summary_csv(path: Path, summaries: list[dict]) -> Path:
    config_keys = list(BenchCase().to_dict())
    fields = ["case", *config_keys, "phase", "median_ms", "p25_ms", "p75_ms", "min_ms", "max_ms", "n"]
    rows = ({"case": s["case"], **s["config"], "phase": pk,
             **{f"{k}_ms": st[k] * 1e3 for k in ("median", "p25", "p75", "min", "max")}, "n": st["n"]}
            for s in summaries for pk, st in [*s["phases"].items(), ("step", s["step"]), ("comm", s["comm"])])
    return write_csv(path, fields, rows)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    return path


def write_tensorboard(log_dir: Path, summaries: list[dict], rows: list[dict]) -> Path | None:
    """Scalars per case: step time per repeat (x = repeat) and the median of every phase (x = 0)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the CSV/JSON still hold everything
        return None
    # The run directory holds one run: a rerun into it replaces the event files instead of adding a second run.
    for old in log_dir.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(log_dir=str(log_dir))
    steps: dict[tuple[str, int], dict[tuple, float]] = defaultdict(dict)
    for r in rows:
        k = (r["layer"], r["iteration"], r["phase"], r["direction"])
        d = steps[(r["case"], r["repeat"])]
        d[k] = max(d.get(k, 0.0), r["seconds"])
    for (case, rep), d in sorted(steps.items()):
        writer.add_scalar(f"{case}/step_ms", sum(d.values()) * 1e3, rep)
    for s in summaries:
        for pk, st in s["phases"].items():
            writer.add_scalar(f"{s['case']}/median_{pk}_ms", st["median"] * 1e3, 0)
        writer.add_scalar(f"{s['case']}/comm_share", s["comm_share"]["median"], 0)
    writer.close()
    return log_dir


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """summary.json of a run directory: {'meta': ..., 'cases': [...]}."""
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _mode_changes_rows(case: BenchCase) -> bool:
    return case.dispatch != "copies" or case.dispatch_dtype != "bf16"


def observations(run: dict[str, Any], stat: str = "min", quantile: str = "median") -> list[Observation]:
    """Per-layer-iteration phase times of a run, ready for fitting or checking the cost model. stat 'min':
    the fastest rank's phase times (the intrinsic cost: a rank that had a core to itself, and for an
    all-to-all the transfer without the wait for a late partner); 'max': the slowest rank's (what the step
    pays on this host, oversubscription included). quantile: which statistic over the repeats ('median',
    or 'p25': the lower quartile, less sensitive to repeats in which the rank was descheduled)."""
    meta = run["meta"]
    out = []
    for s in run["cases"]:
        case = BenchCase(**s["config"])
        n = case.layers * case.iterations
        data_bytes = [max(v) for v in s["bytes"]["per_a2a_per_rank"].values() if v]
        # fp8 and dedup's slots make the dispatch rows differ from the combine's: their bytes per call site. Copies
        # in the compute dtype keep the busiest call of any site (what the fits used before the modes).
        by_site = s["bytes"].get("per_a2a_max_by_call_site", {}) if _mode_changes_rows(case) else {}
        table = s["phases_min_rank"] if stat == "min" else s["phases"]
        for pk, st in table.items():
            phase = pk.rsplit("_", 1)[0]
            out.append(Observation(
                case=case, phase_key=pk, seconds=st[quantile] / n,
                bytes_offrank=(by_site.get(pk) or max(data_bytes)) if (phase in ("dispatch", "combine") and
                                                                       data_bytes) else 0.0,
                rows=float(s.get("rows_max") or 0.0),
                ranks_per_node=int(meta["ranks_per_node"]), threads_per_rank=int(meta["threads_per_rank"]),
                cores_per_node=int(meta["cores_per_node"]), stat=stat))
    return out
