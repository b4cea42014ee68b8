"""All-to-all bytes per token of the real CoE layer under uniform routing: copies vs dedup (+ fp8) vs node_dedup,
ep 2, 4, 8.

    torchrun --standalone --nproc_per_node=8 benchmarks/dedup_bytes.py [--tokens 512] [--hidden 1024]
        [--ranks-per-node 2]

Every rank runs CoE-2(4/64) and MoE(8/64) (+1 shared expert, as the paper configs) at each expert-parallel
size P in {2, 4, 8} (the world split into 8/P expert-data-parallel replicas) and each wire mode, one forward +
backward with forced routing: every token takes K experts drawn uniformly without replacement (an independent
draw per rank, layer and iteration, the same draw in every mode). Bytes come from the dispatcher's own
counters (`layer.dispatcher.stats`); the table gives, per token on a rank, the rows it sends to other ranks
per iteration (forward dispatch data rows) and the bytes it sends per step (all four data all-to-alls and
dedup's slots, forward + backward, all iterations), averaged over ranks, beside the cost model's expectation
(`coe_dist.bench.model.Workload`). The expert width is tiny (bytes do not depend on it). node_dedup runs where
the group spans nodes of --ranks-per-node ranks (simulated: moe.ranks_per_node): its rows to other ranks are
those to other nodes, and the rows its relays forward inside their node have a column of their own.
"""

from __future__ import annotations

import argparse
import types

import torch
import torch.distributed as dist

try:
    from benchmarks.common import markdown_table, mean_over_ranks, start_gloo_ranks, write_json
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import markdown_table, mean_over_ranks, start_gloo_ranks, write_json

from coe_dist.bench.model import Workload
from coe_dist.config import MoEConfig
from coe_dist.model.coe import CoELayer
from coe_dist.model.router import Routing

MODELS = {"CoE-2(4/64)": dict(iterations=2, top_k=4), "MoE(8/64)": dict(iterations=1, top_k=8)}
MODES = {"copies": ("copies", "bf16"), "dedup": ("dedup", "bf16"), "dedup+fp8": ("dedup", "fp8"),
         "node_dedup": ("node_dedup", "bf16")}


def uniform_router(router, seed: int) -> None:
    """Replace the router's top-k by K experts drawn uniformly per token (seeded); gates stay its softmax."""
    def forward(self, h_TD):
        with torch.autocast(h_TD.device.type, enabled=False):  # float32 gates, as `Router`
            logits_TN = torch.nn.functional.linear(h_TD.float(), self.weight.float())
        probs_TN = logits_TN.softmax(dim=-1)
        g = torch.Generator().manual_seed(seed)
        experts_TK = torch.rand(h_TD.shape[0], self.weight.shape[0], generator=g).topk(self.top_k, dim=-1).indices
        return Routing(logits_TN, probs_TN, probs_TN.gather(1, experts_TK), experts_TK)

    router.forward = types.MethodType(forward, router)


def measure(model: str, P: int, mode: str, args, rank: int) -> dict[str, float]:
    dispatch, wire = MODES[mode]
    cfg = MoEConfig(num_experts=64, num_shared_experts=1, expert_hidden_size=16, ep_size=P, dispatch=dispatch,
                    dispatch_dtype=wire, ranks_per_node=args.ranks_per_node, **MODELS[model])
    layer = CoELayer(cfg, args.hidden)
    for t, router in enumerate(layer.routers):
        uniform_router(router, seed=1000 * rank + t)
    u = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = layer(u)
    (out.float().square().mean() + aux).backward()
    records = layer.dispatcher.stats.records
    T, C = args.tokens, cfg.iterations
    data_row = args.hidden + 4 if wire == "fp8" else 2 * args.hidden
    G = args.ranks_per_node
    row_experts = {"copies": 0, "dedup": 64 // P, "node_dedup": G * 64 // P}[dispatch]  # experts one row serves
    slots = min(cfg.top_k, row_experts) * 8

    def rows(key: str, row_bytes: int) -> float:
        return sum(r.bytes_sent for (_, k), r in records.items() if k == key) / row_bytes / (T * C)

    w = Workload(C, cfg.top_k, 64, args.hidden, 16, T, P, 1, dispatch=dispatch, dispatch_dtype=wire, node_ranks=G)
    inter, intra = (w.node_dedup_rows()[:2] if dispatch == "node_dedup"
                    else (w.rows_per_token * (P - 1) / P, 0.0))
    return {"rows_per_token_iteration": rows("dispatch_fwd", data_row + slots),
            "forwarded_rows_per_token_iteration": rows("intra_dispatch_fwd", 2 * args.hidden
                                                       + min(cfg.top_k, 64 // P) * 8),
            "bytes_per_token_step": sum(r.bytes_sent for r in records.values()) / T,
            "model_rows_per_token_iteration": inter, "model_forwarded_rows_per_token_iteration": intra,
            "model_bytes_per_token_step": w.bytes_per_step / T}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024, help="d (the paper configs' 1024)")
    p.add_argument("--ranks-per-node", type=int, default=2, help="node_dedup's simulated node size")
    p.add_argument("--out", default="benchmarks/results/dedup_bytes.json")
    args = p.parse_args()
    rank, world = start_gloo_ranks()
    rows = []
    for model in MODELS:
        for P in (2, 4, 8):
            if world % P:
                continue
            for mode in MODES:
                if mode == "node_dedup" and P <= args.ranks_per_node:
                    continue  # the group inside one node: dedup with a hop to itself
                mine = measure(model, P, mode, args, rank)
                rows.append({"model": model, "ep": P, "mode": mode, **mean_over_ranks(mine, world)})
    if rank == 0:
        base = {(r["model"], r["ep"]): r["bytes_per_token_step"] for r in rows if r["mode"] == "copies"}
        print(markdown_table(
            ["model", "ep", "mode", "rows/token/iteration to other ranks (model)",
             "node_dedup: rows/token/iteration forwarded in the node (model)", "KiB/token/step sent (model)",
             "vs copies"],
            [[r["model"], str(r["ep"]), r["mode"],
              f"{r['rows_per_token_iteration']:.3f} ({r['model_rows_per_token_iteration']:.3f})",
              f"{r['forwarded_rows_per_token_iteration']:.3f} ({r['model_forwarded_rows_per_token_iteration']:.3f})",
              f"{r['bytes_per_token_step'] / 1024:.2f} ({r['model_bytes_per_token_step'] / 1024:.2f})",
              f"{r['bytes_per_token_step'] / base[(r['model'], r['ep'])]:.3f}"] for r in rows]))
        write_json(args.out, {"args": vars(args), "world": world, "rows": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
