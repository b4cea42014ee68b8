"""Expert placement by co-selection: which rank holds which expert (issue 15, docs/scaling.md).

    <run>/coselection.safetensors (coselection.py: per layer and iteration, how often tokens pick experts i and j
    together)
    -> per layer: graph on the N experts, edge weight = co-selections summed over the C iterations (the iterations
       share the experts) -> METIS (pymetis) into P parts of N/P -> exact balance by the cheapest moves
    -> plan JSON: per layer, the original expert in each slot (slot s: rank s // (N/P)), and the predicted
       all-to-all rows per token before and after (the sampled choices, counted under both placements)
    -> `--set moe.placement=PLAN` on a resume: checkpoint.load moves each expert, its router rows and their Adam
       moments to its slot (a relabelling: the function does not change)

Why co-selection within an iteration: with moe.dispatch=dedup a token sends one row to each distinct rank among
its K experts, per iteration, and the row comes home before the next iteration routes; experts picked together
on one rank cost one row. Picks in consecutive iterations (`follows`) are reported, not optimised: the token
returns to its home rank between iterations, so they do not change the bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from coe_dist.argtypes import positive_int
from coe_dist.config import ConfigError, RunConfig, expand_path
from coe_dist.train import coselection

FORMAT = 1


# ------------------------------------------------------------------ planning

def partition(weights_NN: np.ndarray, parts: int) -> list[int]:
    """Part of each vertex: `parts` parts of exactly N/parts vertices, maximising the edge weight inside parts."""
    import pymetis

    N = len(weights_NN)
    size = N // parts
    w = np.asarray(weights_NN, dtype=np.float64)
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0)
    if parts == 1 or w.max() <= 0:
        return [v // size for v in range(N)]
    # METIS wants positive integer weights: scaled so the heaviest edge is 10^6; lighter ones at least 1.
    ints = np.where(w > 0, np.maximum(1, np.rint(w / w.max() * 1e6)), 0).astype(np.int64)
    xadj, adjncy, eweights = [0], [], []
    for v in range(N):
        nbrs = np.flatnonzero(ints[v])
        adjncy += nbrs.tolist()
        eweights += ints[v, nbrs].tolist()
        xadj.append(len(adjncy))
    _, part_of = pymetis.part_graph(parts, pymetis.CSRAdjacency(xadj, adjncy), eweights=eweights,
                                    options=pymetis.Options(ufactor=1, seed=0, ncuts=8))
    return _balance(list(part_of), w, parts, size)


def _balance(part_of: list[int], w: np.ndarray, parts: int, size: int) -> list[int]:
    """METIS allows a little imbalance; ranks hold exactly N/P experts: move the vertex whose move from an
    over-full part to an under-full one loses the least internal weight, until every part has `size`."""
    part_of = list(part_of)
    while True:
        count = np.bincount(part_of, minlength=parts)
        over, under = np.flatnonzero(count > size), np.flatnonzero(count < size)
        if len(over) == 0:
            return part_of
        member = np.zeros((parts, len(part_of)))
        member[part_of, np.arange(len(part_of))] = 1
        affinity = w @ member.T  # [N, parts]: weight from each vertex into each part
        best = None
        for v in (v for v in range(len(part_of)) if part_of[v] in over):
            for q in under:
                loss = affinity[v, part_of[v]] - affinity[v, q]
                if best is None or loss < best[0]:
                    best = (loss, v, int(q))
        part_of[best[1]] = best[2]


def slots_from_parts(part_of: list[int], parts: int) -> list[int]:
    """Original expert per slot: part r's experts (ascending) in slots r*N/P .. (r+1)*N/P - 1."""
    return [v for r in range(parts) for v in sorted(v for v, p in enumerate(part_of) if p == r)]


def rows_per_token(sample_SK: torch.Tensor, order: list[int], ep_size: int) -> float:
    """Mean distinct ranks among a token's K experts (the rows moe.dispatch=dedup sends) under a placement."""
    if len(sample_SK) == 0:
        return float("nan")
    size = len(order) // ep_size
    rank_of = torch.empty(len(order), dtype=torch.long)
    rank_of[torch.tensor(order)] = torch.arange(len(order)) // size
    ranks_SK = rank_of[sample_SK.long()]
    hit_SP = torch.zeros(len(ranks_SK), ep_size, dtype=torch.bool).scatter_(1, ranks_SK, True)
    return float(hit_SP.sum(1).double().mean())


def busiest_rank_load(sample_SK: torch.Tensor, order: list[int], ep_size: int) -> float:
    """The busiest rank's (token, expert) rows over the mean rank's under a placement: 1 = even. Placement keeps
    N/P experts per rank, not their load; experts picked together are often the busy ones, and a rank that
    holds several works longer while the others wait for it in the next all-to-all (docs/performance.md)."""
    if len(sample_SK) == 0:
        return float("nan")
    size = len(order) // ep_size
    rank_of = torch.empty(len(order), dtype=torch.long)
    rank_of[torch.tensor(order)] = torch.arange(len(order)) // size
    load_P = torch.bincount(rank_of[sample_SK.long()].flatten(), minlength=ep_size).double()
    return float(load_P.max() / load_P.mean())


def make_plan(stats: dict[str, torch.Tensor], layers: list[int], num_experts: int, iterations: int,
              ep_size: int) -> dict:
    """Plan JSON for every CoE layer, with the predicted rows per token (per layer and iteration, and mean)."""
    if num_experts % ep_size:
        raise ConfigError(f"--ep-size {ep_size}: must divide moe.num_experts={num_experts}")
    order_of, predicted = {}, []
    in_order = list(range(num_experts))
    for layer in layers:
        pairs = sum(stats[f"layer{layer}/iter{t}/pairs"].numpy() for t in range(iterations))
        order_of[str(layer)] = slots_from_parts(partition(pairs, ep_size), ep_size)
        for t in range(iterations):
            sample = stats[f"layer{layer}/iter{t}/sample"]
            predicted.append({"layer": layer, "iteration": t, "copies": int(sample.shape[1]),
                              "before": rows_per_token(sample, in_order, ep_size),
                              "after": rows_per_token(sample, order_of[str(layer)], ep_size),
                              "load_before": busiest_rank_load(sample, in_order, ep_size),
                              "load_after": busiest_rank_load(sample, order_of[str(layer)], ep_size)})
    return {"format": FORMAT, "num_experts": num_experts, "ep_size": ep_size, "layers": order_of,
            "predicted_rows_per_token": predicted}


def mean_rows(plan: dict) -> tuple[float, float]:
    """The plan's predicted rows per token and iteration, in order and placed, averaged over layers."""
    rows = plan["predicted_rows_per_token"]
    return tuple(sum(r[k] for r in rows) / len(rows) for k in ("before", "after"))


# ------------------------------------------------------------------ using a plan

def read_plan(cfg: RunConfig, layers: list[int]) -> dict[int, list[int]]:
    """moe.placement's plan for this config: every CoE layer's slot order; ConfigError naming what is wrong."""
    path = Path(cfg.moe.placement)
    where = f"moe.placement={str(path)!r}"
    try:
        plan = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file; make one with coe-dist placement plan --checkpoint RUN") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: not a placement plan (JSON: {e})") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise ConfigError(f"{where}: not a placement plan of format {FORMAT}; make one with coe-dist placement plan")
    N, P = cfg.moe.num_experts, cfg.moe.ep_size
    if plan.get("num_experts") != N or plan.get("ep_size") != P:
        raise ConfigError(f"{where}: made for num_experts={plan.get('num_experts')}, ep_size={plan.get('ep_size')}; "
                          f"this run has moe.num_experts={N}, moe.ep_size={P}: make a plan with --ep-size {P}")
    orders = {int(k): v for k, v in plan.get("layers", {}).items()}
    if sorted(orders) != sorted(layers):
        raise ConfigError(f"{where}: plans CoE layers {sorted(orders)}, this model has {sorted(layers)}")
    for layer, order in orders.items():
        if sorted(order) != list(range(N)):
            raise ConfigError(f"{where}: layer {layer}'s order is not a permutation of 0..{N - 1}")
    return orders


# ------------------------------------------------------------------ command line

def _plan(args: argparse.Namespace) -> int:
    from coe_dist.train.checkpoint import resolve_checkpoint

    stats, run = coselection.read(Path(args.checkpoint))
    _, meta = resolve_checkpoint(run)
    moe, model = meta["config"]["moe"], meta["config"]["model"]
    P = args.ep_size or moe["ep_size"]
    layers = coselection.layers_in(stats)
    plan = make_plan(stats, layers, moe["num_experts"], moe["iterations"], P)
    plan["source"] = str(run)
    out = Path(args.output or run / f"placement-ep{P}.json")
    out.write_text(json.dumps(plan, indent=1))
    rows = plan["predicted_rows_per_token"]
    print(f"placement of {moe['num_experts']} experts on {P} ranks from {run}/{coselection.FILE} "
          f"({len(stats[f'layer{layers[0]}/iter0/sample'])} sampled tokens per layer and iteration)")
    print("| layer | iteration | rows per token: copies | dedup, in order | dedup, planned "
          "| busiest rank's rows / mean: in order | planned |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['iteration']} | {r['copies']} | {r['before']:.3f} | {r['after']:.3f} "
              f"| {r['load_before']:.2f} | {r['load_after']:.2f} |")
    before, after = mean_rows(plan)
    row_bytes = 2 * 2 * model["hidden_size"] * len(rows)  # dispatch + combine, bf16, every layer and iteration
    print(f"mean rows per token and iteration: {before:.3f} -> {after:.3f} ({after / before:.1%}; copies send "
          f"{rows[0]['copies']}); all-to-all bytes per token over all layers and iterations (dispatch + combine, "
          f"bf16): {before * row_bytes:,.0f} -> {after * row_bytes:,.0f}")
    worst_before, worst_after = (max(r[k] for r in rows) for k in ("load_before", "load_after"))
    if worst_after > worst_before:
        print(f"note: the busiest rank gets {worst_after:.2f}x the mean rows (in order: {worst_before:.2f}x): where "
              f"the all-to-all is cheap next to compute (one host, fast links) the wait for it can cost more time "
              f"than the fewer bytes save; measure with benchmarks/learned_bytes.py --repeats 5")
    print(f"wrote {out}; use it with: coe-dist train ... --resume auto --set moe.placement={out}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("placement", help="place experts on ranks by co-selection (fewer all-to-all rows)",
                       description="Plan which rank holds which expert from a run's routing statistics, so that "
                                   "experts picked together share a rank (docs/scaling.md).")
    actions = p.add_subparsers(dest="placement_command", metavar="ACTION", required=True)
    plan = actions.add_parser("plan", help="run -> placement plan JSON (METIS), with the predicted rows per token")
    plan.add_argument("--checkpoint", required=True, type=expand_path, help="run or checkpoint directory")
    plan.add_argument("--ep-size", type=positive_int, default=None, help="ranks to place on (default: the run's)")
    plan.add_argument("--output", type=expand_path, default=None, help="plan file (default RUN/placement-epP.json)")
    plan.set_defaults(func=_plan)
