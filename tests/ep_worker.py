"""One rank of an expert-parallel test launch (started by tests/test_expert_parallel.py).

    python tests/ep_worker.py SPEC_PT OUT_DIR      (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)

Runs every case of SPEC_PT in order on this rank's slice of the global batch (sequences
[rank*B/world, (rank+1)*B/world)), all in one gloo process group, and writes OUT_DIR/rank<r>.pt:
{case name: outputs, aux, input and weight grads, comm stats, dropped counts, group ranks, every router call's
input and output}. A case with moe.expert_bias_rate runs two training steps, each followed by the trainer's
bias update (loads all-reduced over the world); what is reported is the second step and the biases after it.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from coe_dist.train.expert_balance import update_expert_biases

from ep_common import build_layer, force_routing, record_router_calls, run_layer


def main(spec_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    spec = torch.load(spec_path, weights_only=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=spec.get("pg_timeout_s", 60)))
    results = {}
    for case in spec["cases"]:
        B = case["u"].shape[0]
        assert B % world == 0, (B, world)
        Bl = B // world
        rows = slice(rank * Bl, (rank + 1) * Bl)
        layer = build_layer(case["cfg"], case["u"].shape[-1], case["ep"], case["sd"], dtype=case["u"].dtype)
        if case["forced"] is not None:
            T_l = Bl * case["u"].shape[1]
            force_routing(layer, [t[rank * T_l:(rank + 1) * T_l] for t in case["forced"]])
        steps = 2 if case["cfg"].get("expert_bias_rate") else 1
        calls = record_router_calls(layer)
        for _ in range(steps):
            layer.dispatcher.stats.reset()
            calls.clear()
            res = run_layer(layer, case["u"][rows], case["gout"][rows], aux_scale=Bl / B,
                            input_requires_grad=case.get("input_requires_grad", True))
            update_expert_biases([layer], world)
        res["router_calls"] = calls
        res["biases"] = [r.expert_bias for r in layer.routers if r.expert_bias is not None]
        stats = layer.dispatcher.stats
        res["records"] = {key: (r.calls, r.bytes_sent, r.bytes_received) for key, r in stats.records.items()}
        res["dropped"] = dict(stats.dropped)
        res["first_expert"], res["num_local"] = layer.first_expert, layer.num_local_experts
        if case["ep"] > 1:
            from coe_dist.parallel.groups import expert_data_parallel_group

            res["ep_group"] = dist.get_process_group_ranks(layer.dispatcher.ep_group)
            res["edp_group"] = dist.get_process_group_ranks(expert_data_parallel_group(case["ep"]))
        results[case["name"]] = res
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    if spec["final_barrier"]:  # off where a test wants a rank left in a collective to fail at once
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
