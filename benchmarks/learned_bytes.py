"""All-to-all bytes per token of the real CoE layer under *learned* routing: copies vs dedup (+ fp8) vs dedup +
placement by co-selection (+ fp8), ep 2, 4, 8. A run trained with device-limited routing (moe.routing_groups)
gets copies and dedup (+ fp8) only: its routing bounds the ranks a token reaches, placement would undo that.

    torchrun --standalone --nproc_per_node=8 benchmarks/learned_bytes.py \
        "CoE-2(4/64)=runs/repro/coe-2-4of64-seed1" "MoE(8/64)=runs/repro/moe-8of64-seed2"

Each run directory holds `coselection.safetensors` (written by the trainer: co-selection counts over the whole
run, and the expert choices of rank 0's tokens on the last logging steps, per layer and iteration). For each
expert-parallel size P the placement is planned from the counts (`coe_dist.train.placement.make_plan`, METIS),
then every rank runs one real CoELayer per (layer of the run, mode), forward + backward, whose routers are
forced to the recorded choices (token i of rank r takes sampled token (r*T + i) mod S's experts, mapped to the
planned slots for the placement modes). Bytes come from the dispatcher's own counters, as in dedup_bytes.py;
the widths are the paper's (d = 1024) so that the table reads beside dedup_bytes.py's uniform one; bytes do
not depend on the expert width. Times (--repeats > 1): the median over repeats of the slowest rank's forward +
backward of all layers, and of the seconds inside the dispatcher's all-to-alls (blocking: exposed). The
recorded choices are the run's latest, the counts the whole run's: the
plan is judged on choices it was not fitted to alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist

try:
    from benchmarks.common import markdown_table, mean_over_ranks, start_gloo_ranks, write_json
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import markdown_table, mean_over_ranks, start_gloo_ranks, write_json

from coe_dist.config import MoEConfig
from coe_dist.model.coe import CoELayer
from coe_dist.model.router import Routing
from coe_dist.train import coselection
from coe_dist.train.checkpoint import resolve_checkpoint
from coe_dist.train.placement import make_plan

MODES = {"copies": ("copies", "bf16", False), "dedup": ("dedup", "bf16", False), "dedup+fp8": ("dedup", "fp8", False),
         "dedup+placement": ("dedup", "bf16", True), "dedup+placement+fp8": ("dedup", "fp8", True)}


def forced_router(router, choices_TK: torch.Tensor) -> None:
    """The router's top-k replaced by the given expert slots; gates stay its softmax (as dedup_bytes.py)."""
    def forward(self, h_TD):
        with torch.autocast(h_TD.device.type, enabled=False):  # float32 gates, as `Router`
            logits_TN = torch.nn.functional.linear(h_TD.float(), self.weight.float())
        probs_TN = logits_TN.softmax(dim=-1)
        return Routing(logits_TN, probs_TN, probs_TN.gather(1, choices_TK), choices_TK)

    router.forward = types.MethodType(forward, router)


def layer_choices(stats: dict, layer: int, iterations: int, order: list[int] | None, rank: int,
                  tokens: int) -> list[torch.Tensor]:
    """Per iteration [T, K] slots for this rank's tokens: recorded original ids, through the placement."""
    slot_of = torch.arange(len(order or stats[f"layer{layer}/iter0/pairs"]))
    if order is not None:
        slot_of[torch.tensor(order)] = torch.arange(len(order))
    out = []
    for t in range(iterations):
        sample = stats[f"layer{layer}/iter{t}/sample"].long()
        rows = (torch.arange(tokens) + rank * tokens) % len(sample)
        out.append(slot_of[sample[rows]])
    return out


def measure(stats: dict, cfg: dict, P: int, mode: str, plan: dict, args, rank: int) -> dict[str, float]:
    dispatch, wire, placed = MODES[mode]
    moe = MoEConfig(num_experts=cfg["num_experts"], top_k=cfg["top_k"], iterations=cfg["iterations"],
                    num_shared_experts=cfg["num_shared_experts"], expert_hidden_size=16, ep_size=P,
                    dispatch=dispatch, dispatch_dtype=wire)
    layers = coselection.layers_in(stats)
    built = []
    for layer_id in layers:
        layer = CoELayer(moe, args.hidden)
        order = plan["layers"][str(layer_id)] if placed else None
        for t, choice in enumerate(layer_choices(stats, layer_id, moe.iterations, order, rank, args.tokens)):
            forced_router(layer.routers[t], choice)
        built.append(layer)
    u = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank))
    walls, a2a = [], []
    for _ in range(args.repeats):
        before = sum(r.seconds for layer in built for r in layer.dispatcher.stats.records.values())
        dist.barrier()
        start = time.perf_counter()
        for layer in built:  # each on the same input: the bytes depend on the forced choices only
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, aux = layer(u.clone().requires_grad_())
            (out.float().square().mean() + aux).backward()
        walls.append(time.perf_counter() - start)
        a2a.append(sum(r.seconds for layer in built for r in layer.dispatcher.stats.records.values()) - before)
    records = [r for layer in built for r in layer.dispatcher.stats.records.items()]
    # Forward combine rows (one per copy, or per (token, rank) in dedup) are bf16 and carry no slots.
    rows = sum(r.bytes_sent for (_, key), r in records if key == "combine_fwd") / (2 * args.hidden) / args.repeats
    sent = sum(r.bytes_sent for _, r in records) / args.repeats
    T, n = args.tokens, len(layers) * moe.iterations
    return {"rows_per_token_iteration": rows / (T * n), "bytes_per_token_step": sent / (T * len(layers)),
            "seconds_median": statistics.median(walls), "a2a_seconds_median": statistics.median(a2a)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR", help="trained runs with coselection.safetensors")
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024, help="d (the paper configs' 1024)")
    p.add_argument("--repeats", type=int, default=1, help="forward + backward passes timed per mode (median)")
    p.add_argument("--out", default="benchmarks/results/learned_bytes.json")
    args = p.parse_args()
    rank, world = start_gloo_ranks()
    rows = []
    for spec in args.runs:
        name, run = spec.split("=", 1)
        stats, run_dir = coselection.read(Path(run))
        cfg = resolve_checkpoint(run_dir)[1]["config"]["moe"]
        layers = coselection.layers_in(stats)
        for P in (2, 4, 8):
            if world % P:
                continue
            # Device-limited routing (moe.routing_groups > 1) keeps each token's experts in its best groups of
            # consecutive experts: placement would scatter the groups over ranks (the config refuses the pair).
            limited = cfg.get("routing_groups", 1) > 1
            plan = None if limited else make_plan(stats, layers, cfg["num_experts"], cfg["iterations"], P)
            for mode in (m for m in MODES if not (limited and MODES[m][2])):
                mine = measure(stats, cfg, P, mode, plan, args, rank)
                # time: the slowest rank's (every rank waits for it at the next all-to-all)
                row = mean_over_ranks(mine, world, slowest=("seconds_median", "a2a_seconds_median"))
                rows.append({"model": name, "run": run, "ep": P, "mode": mode, **row})
    if rank == 0:
        base = {(r["model"], r["ep"]): r["bytes_per_token_step"] for r in rows if r["mode"] == "copies"}
        print(markdown_table(
            ["model (learned routing)", "ep", "mode", "rows/token/iteration to other ranks", "KiB/token/step/layer",
             "vs copies", "fwd+bwd s (median)", "in all-to-all s"],
            [[r["model"], str(r["ep"]), r["mode"], f"{r['rows_per_token_iteration']:.3f}",
              f"{r['bytes_per_token_step'] / 1024:.2f}",
              f"{r['bytes_per_token_step'] / base[(r['model'], r['ep'])]:.3f}",
              f"{r['seconds_median']:.3f}", f"{r['a2a_seconds_median']:.3f}"] for r in rows]))
        write_json(args.out, {"args": vars(args), "world": world, "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
