"""Validation of the cost model on local measurements: fit on part of the bench cases, predict the rest.

    python -m coe_dist.bench.validate RUN_2RANKS [RUN_4RANKS] [--train-hidden 128,512] [--train-tokens 256,512]

Fit 1, on the 2-rank run's forced-balanced cases at some hidden sizes and token counts; held out: the other
token counts (same d) and the other hidden sizes (all T). Fit 2, on the 4-rank run's ep-2 cases and its
all-to-all sweep at the group sizes below the largest ep (2 and 3 ranks: the second size separates a
per-call from a per-peer latency); held out: its ep-4 cases (same run, same load on the machine). Also
fit 1 -> the 4-rank run's ep-4 cases (across runs; fit 1 has one group size, so its latency is all per
peer). Times are the fastest rank's (outputs.observations, stat 'min'): the intrinsic cost of a phase,
without the time-sharing of 4 ranks on 2 cores. Error per phase: the median (and worst) over the held-out
cases of |predicted - measured| / measured, per layer-iteration, forward and backward separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from coe_dist.bench import outputs
from coe_dist.bench.model import (
    ALL_PHASES,
    COMM_PHASES,
    Observation,
    Profile,
    call_site_overheads,
    fit_link,
    fit_profile,
    predict_observation,
)


def _select(obs: list[Observation], **want) -> list[Observation]:
    out = []
    for o in obs:
        c = o.case
        if c.routing != "forced-balanced":
            continue
        if all((getattr(c, k) in v if isinstance(v, (set, list, tuple)) else getattr(c, k) == v)
               for k, v in want.items()):
            out.append(o)
    return out


def split(run2: dict, run4: dict | None, train_hidden: list[int], train_tokens: list[int],
          quantile: str = "median") -> list[tuple[str, str, list[Observation]]]:
    """(fit name, set name, observations): the training sets first, then the held-out ones."""
    o2 = outputs.observations(run2, "min", quantile)
    tokens = sorted({o.case.tokens for o in o2})
    sets = [
        ("fit 1", TRAIN_1, _select(o2, hidden=set(train_hidden), tokens=set(train_tokens))),
        ("fit 1", "other T", _select(o2, hidden=set(train_hidden), tokens=set(tokens) - set(train_tokens))),
        ("fit 1", "other d", _select(o2, hidden={o.case.hidden for o in o2} - set(train_hidden))),
    ]
    if run4 is not None:
        o4 = outputs.observations(run4, "min", quantile)
        sets += [("fit 2", TRAIN_2, _select(o4, ep_size=2)),
                 ("fit 2", "ep 4 from ep 2", _select(o4, ep_size=4)),
                 ("fit 1", "ep 4 across runs", _select(o4, ep_size=4))]
    return sets


TRAIN_1 = "fit 1 (train)"
TRAIN_2 = "fit 2 (train)"


def fit(train: list[Observation], name: str = "fit", sweep: list[dict] | None = None) -> Profile:
    """A profile fitted on the training observations. Without a sweep, the link comes from the grid's own
    all-to-alls with all latency per peer (gloo; at one group size a per-call cost looks like a per-peer
    one). With an all-to-all sweep (calibration rows) at two or more group sizes, the link is the sweep's
    (fixed + per-peer latency, bandwidth) and each call site adds its overhead over it, per call."""
    o = train[0]
    source = "fitted on the training cases of the validation"
    prof = fit_profile(train, name=name, latency_model="per_peer", cores_per_node=o.cores_per_node,
                       threads_per_rank=o.threads_per_rank, ranks_per_node=o.ranks_per_node, source=source)
    if sweep:
        link = fit_link([(r["P"] - 1, r["bytes_offrank"], r["seconds"]) for r in sweep], latency_model="both",
                        source=f"all-to-all sweep at {sorted({r['P'] for r in sweep})} ranks")
        overheads, prof.host_sync_s = call_site_overheads(link, train, "both", source)
        prof.links["intra"] = link
        prof.phases = {k: v for k, v in prof.phases.items() if k.rsplit("_", 1)[0] not in COMM_PHASES}
        prof.phases.update(overheads)
    return prof


def training_sweep(run4: dict | None) -> list[dict] | None:
    """The 4-rank run's calibration rows at group sizes below its largest ep (the held-out one: fit 2 never sees it),
    when they span two or more sizes."""
    if run4 is None or not run4.get("calibration"):
        return None
    largest = max(c["config"]["ep_size"] for c in run4["cases"])
    rows = [r for r in run4["calibration"]["a2a"] if r["P"] < largest]
    return rows if len({r["P"] for r in rows}) >= 2 else None


def errors(profile: Profile, obs: list[Observation]) -> dict[str, list[float]]:
    """Relative errors per phase key over the observations (per layer-iteration times)."""
    out: dict[str, list[float]] = defaultdict(list)
    for o in obs:
        pred = predict_observation(profile, o)
        if o.seconds > 0:
            out[o.phase_key].append((pred - o.seconds) / o.seconds)
    return out


def table(results: dict[str, dict[str, list[float]]]) -> tuple[str, dict[str, Any]]:
    """Markdown: one row per phase key, per held-out set median |error| (worst in brackets)."""
    sets = list(results)
    keys = [f"{p}_{d}" for d in ("fwd", "bwd") for p in ALL_PHASES
            if any(f"{p}_{d}" in results[s] for s in sets)]
    lines = ["| phase | " + " | ".join(sets) + " |", "|---|" + "---|" * len(sets)]
    data: dict[str, Any] = {}
    for k in keys:
        cells = []
        for s in sets:
            errs = results[s].get(k)
            if not errs:
                cells.append("-")
                continue
            med = statistics.median(abs(e) for e in errs)
            worst = max(abs(e) for e in errs)
            data.setdefault(k, {})[s] = {"median_abs": med, "max_abs": worst, "n": len(errs),
                                        "median_signed": statistics.median(errs)}
            cells.append(f"{med * 100:.0f}% ({worst * 100:.0f}%)")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines), data


def validate(run2_dir: str | Path, run4_dir: str | Path | None = None, *, train_hidden: tuple[int, ...] = (128, 512),
             train_tokens: tuple[int, ...] = (256, 512), quantile: str = "median") -> dict[str, Any]:
    run2 = outputs.load_run(run2_dir)
    run4 = outputs.load_run(run4_dir) if run4_dir else None
    sets = split(run2, run4, list(train_hidden), list(train_tokens), quantile)
    sweeps = {"fit 1": None, "fit 2": training_sweep(run4)}
    profiles = {}
    for name, fit_name in ((TRAIN_1, "fit 1"), (TRAIN_2, "fit 2")):
        obs = next((o for f, n, o in sets if n == name), None)
        if obs:
            profiles[fit_name] = fit(obs, name=f"validation-{fit_name.replace(' ', '')}", sweep=sweeps[fit_name])
    if "fit 1" not in profiles:
        raise ValueError("no training cases: check --train-hidden / --train-tokens against the run's grid")
    results = {name: errors(profiles[f], obs) for f, name, obs in sets if obs and f in profiles}
    md, data = table(results)
    return {"profiles": profiles, "markdown": md, "errors": data,
            "cases": {name: sorted({o.case.key for o in obs}) for _, name, obs in sets}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run2")
    ap.add_argument("run4", nargs="?")
    ap.add_argument("--train-hidden", default="128,512")
    ap.add_argument("--train-tokens", default="256,512")
    ap.add_argument("--quantile", default="median", choices=("median", "p25"),
                    help="statistic over the repeats (default median; p25 is less sensitive to preemption)")
    ap.add_argument("--json", help="write the errors and the fitted profile here")
    args = ap.parse_args(argv)
    res = validate(args.run2, args.run4, train_hidden=tuple(int(h) for h in args.train_hidden.split(",")),
                   train_tokens=tuple(int(t) for t in args.train_tokens.split(",")), quantile=args.quantile)
    print(res["markdown"])
    if args.json:
        Path(args.json).write_text(json.dumps({"errors": res["errors"], "cases": res["cases"],
                                               "profiles": {k: p.to_dict() for k, p in res["profiles"].items()}},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
