"""Expert placement by co-selection: the routing statistics, the METIS planner, the predicted rows per token and
the plan file's checks (the re-placement round trip through a real resume is in test_checkpoint.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coe_dist.config import ConfigError, load_config
from coe_dist.model.router import coselection_counts, transition_counts
from coe_dist.train.placement import (
    busiest_rank_load,
    make_plan,
    partition,
    read_plan,
    rows_per_token,
    slots_from_parts,
)

from trainrun import TINY


def test_coselection_and_transition_counts_by_hand():
    experts_TK = torch.tensor([[0, 1, 2], [0, 1, 3]])
    want = torch.zeros(4, 4, dtype=torch.long)
    for i, j, n in ((0, 1, 2), (0, 2, 1), (1, 2, 1), (0, 3, 1), (1, 3, 1)):
        want[i, j] = want[j, i] = n
    assert torch.equal(coselection_counts(experts_TK, 4), want)
    nxt = torch.tensor([[3, 3, 2], [1, 0, 0]])  # token 0: {0,1,2} -> {3,3,2}; token 1: {0,1,3} -> {1,0,0}
    got = transition_counts(experts_TK, nxt, 4)
    assert got[0, 3] == 2 and got[2, 2] == 1 and got[3, 0] == 2 and got[1, 1] == 1 and int(got.sum()) == 18


def planted(groups: list[list[int]], n: int, seed: int = 0) -> np.ndarray:
    """Heavy co-selection inside each group, light noise across."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0, 1, (n, n))
    for g in groups:
        for i in g:
            for j in g:
                w[i, j] += 100
    w = w + w.T
    np.fill_diagonal(w, 0)
    return w


def test_partition_finds_planted_groups_on_exactly_balanced_ranks():
    perm = np.random.default_rng(1).permutation(16).tolist()
    groups = [sorted(perm[4 * r:4 * r + 4]) for r in range(4)]
    part_of = partition(planted(groups, 16), 4)
    assert np.bincount(part_of).tolist() == [4, 4, 4, 4]
    assert sorted(sorted(v for v in range(16) if part_of[v] == r) for r in range(4)) == sorted(groups)


def test_partition_balances_a_group_larger_than_a_rank():
    # 6 experts that always go together on ranks of 4: two must leave; each rank still gets exactly 4.
    part_of = partition(planted([[0, 1, 2, 3, 4, 5]], 8), 2)
    assert np.bincount(part_of).tolist() == [4, 4]
    assert max(sum(part_of[v] == r for v in range(6)) for r in range(2)) == 4  # 4 of the 6 share a rank


def test_rows_per_token_by_hand():
    sample = torch.tensor([[0, 1], [0, 2], [1, 3]])
    assert rows_per_token(sample, [0, 1, 2, 3], 2) == pytest.approx((1 + 2 + 2) / 3)  # ranks {0,1}, {2,3}
    assert rows_per_token(sample, [0, 2, 1, 3], 2) == pytest.approx((2 + 1 + 1) / 3)  # ranks {0,2}, {1,3}
    assert slots_from_parts([1, 0, 1, 0], 2) == [1, 3, 0, 2]
    # (token, expert) rows per rank: in order {0,1} gets 0,1,0,1 = 4, {2,3} gets 2,3 = 2: 4 / 3; placed {0,2}
    # gets 0,0,2 = 3 and {1,3} gets 1,1,3 = 3: even
    assert busiest_rank_load(sample, [0, 1, 2, 3], 2) == pytest.approx(4 / 3)
    assert busiest_rank_load(sample, [0, 2, 1, 3], 2) == 1.0


def test_plan_from_planted_statistics_cuts_the_rows():
    perm = np.random.default_rng(2).permutation(8).tolist()
    groups = [perm[:4], perm[4:]]
    # tokens pick 2 experts of one group: in order they straddle ranks, placed they need one
    rng = np.random.default_rng(3)
    sample = torch.tensor(np.array([rng.choice(groups[rng.integers(2)], 2, replace=False) for _ in range(400)]))
    stats = {"layer0/iter0/pairs": coselection_counts(sample, 8).double(), "layer0/iter0/sample": sample}
    plan = make_plan(stats, [0], 8, 1, 2)
    (row,) = plan["predicted_rows_per_token"]
    assert row["after"] == 1.0 and row["before"] > 1.2 and row["copies"] == 2
    assert sorted(map(sorted, (plan["layers"]["0"][:4], plan["layers"]["0"][4:]))) == sorted(map(sorted, groups))


@pytest.mark.parametrize("plan, message", [
    (None, "no such file; make one with coe-dist placement plan"),
    ("{", "not a placement plan (JSON"),
    ({"format": 1, "num_experts": 16, "ep_size": 2, "layers": {}}, "made for num_experts=16, ep_size=2"),
    ({"format": 1, "num_experts": 8, "ep_size": 2, "layers": {"0": list(range(8))}}, "plans CoE layers [0]"),
    ({"format": 1, "num_experts": 8, "ep_size": 2, "layers": {"0": [0] * 8, "1": list(range(8))}},
     "layer 0's order is not a permutation"),
])
def test_a_bad_plan_is_refused_naming_what_is_wrong(tmp_path, plan, message):
    path = tmp_path / "plan.json"
    if plan is not None:
        path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
    cfg = load_config(TINY, [f"moe.placement={path}"])
    with pytest.raises(ConfigError, match=message.replace("(", "\\(").replace("[", "\\[")) as e:
        read_plan(cfg, [0, 1])
    assert f"moe.placement='{path}'" in str(e.value)


def test_placement_with_routing_groups_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="moe.routing_groups=2: a placement relabels experts"):
        load_config(TINY, [f"moe.placement={tmp_path}/p.json", "moe.routing_groups=2"])


def test_cost_model_takes_measured_distinct_ranks(tmp_path):
    import dataclasses

    from coe_dist.bench.model import Workload, distinct_ranks_per_token
    from coe_dist.bench.scaling_doc import learned_distinct_ranks

    uniform = Workload(2, 3, 64, 1024, 704, 4096, 8, dispatch="dedup")
    assert uniform.rows_per_token == pytest.approx(distinct_ranks_per_token(64, 3, 8))
    placed = dataclasses.replace(uniform, distinct_ranks=1.5)
    assert placed.rows_per_token == 1.5
    # data calls scale with the rows; slots too (a slot per copy per remote row: min(K, N/P) of them)
    assert placed.a2a_bytes("combine", "fwd") / uniform.a2a_bytes("combine", "fwd") == pytest.approx(
        1.5 / uniform.rows_per_token)
    assert dataclasses.replace(placed, dispatch="copies").rows_per_token == 3  # copies ignores it
    rows = [{"model": "CoE-2(4/64)", "ep": 8, "mode": "dedup+placement", "rows_per_token_iteration": 1.75},
            {"model": "CoE-2(4/64)", "ep": 8, "mode": "dedup", "rows_per_token_iteration": 2.5},
            {"model": "CoE-2(4/64) devlim 2 of 8", "ep": 4, "mode": "dedup", "rows_per_token_iteration": 1.5}]
    (tmp_path / "l.json").write_text(json.dumps({"rows": rows}))
    assert learned_distinct_ranks(tmp_path / "l.json") == {("CoE-2(4/64)", 8): pytest.approx(2.0)}  # 1.75 * 8/7
    # the device-limited run's dedup rows, under the plain model's label: 1.5 * 4/3
    assert learned_distinct_ranks(tmp_path / "l.json", "dedup", "devlim 2 of 8") == {
        ("CoE-2(4/64)", 4): pytest.approx(2.0)}
    assert learned_distinct_ranks(tmp_path / "missing.json") == {}


def test_overwrite_clears_the_routing_statistics_of_the_earlier_run():
    from coe_dist.train import coselection, rundir

    assert coselection.FILE in rundir.RUN_OUTPUTS  # a new run's plan must not count the old run's choices


def test_plan_without_statistics_fails_in_one_line(tmp_path, capsys):
    from coe_dist.cli import main

    assert main(["placement", "plan", "--checkpoint", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert "no coselection.safetensors" in err and str(tmp_path) in err and "\n" not in err


@pytest.mark.parametrize("sets", [["moe.replace_interval=5", "log.save_interval=3"],
                                  ["moe.replace_interval=4", "log.save_interval=0"],
                                  ["moe.replace_interval=-1"]])
def test_replace_interval_must_fall_on_saves(sets):
    with pytest.raises(ConfigError, match="moe.replace_interval=.*positive multiple of log.save_interval"):
        load_config(TINY, sets)
    load_config(TINY, ["moe.replace_interval=6", "log.save_interval=3"])  # a multiple is fine


def test_coselection_off_records_none_and_replacement_needs_it():
    from coe_dist.config import MoEConfig
    from coe_dist.model.coe import CoELayer

    layer = CoELayer(MoEConfig(num_experts=4, top_k=2, iterations=2, expert_hidden_size=8), 16)
    u = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0))
    for on in (True, False):
        layer.record_routing, layer.record_coselection, layer.routing_record = True, on, {}
        layer(u)
        keys = set(layer.routing_record)
        assert ({"iter0/pairs", "iter1/pairs", "iter1/follows", "iter0/sample"} <= keys) == on
        assert "iter1/counts" in keys  # the load metrics stay
    with pytest.raises(ConfigError, match="moe.replace_interval=3 with log.coselection=false"):
        load_config(TINY, ["moe.replace_interval=3", "log.save_interval=3", "log.coselection=false"])
