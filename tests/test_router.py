"""The router's options against an independent float64 implementation (tests/routing_reference.py):
gate rules (reference, renorm_then_scale, sigmoid), the expert bias of aux-loss-free balancing (choice only,
never the gates; its update), device-limited routing (best M of G groups) and their config checks. The
biases' checkpoint round trip is in tests/test_checkpoint.py (its runs have moe.expert_bias_rate on)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from coe_dist.config import ConfigError, MoEConfig, config_from_dict
from coe_dist.model.coe import CoELayer

from routing_reference import RouterSpec, bias_step, route

F64 = torch.float64
N, D, T = 8, 16, 40
RTOL = 1e-12

pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(seed: int = 0, **keys) -> CoELayer:
    cfg = MoEConfig(num_experts=N, expert_hidden_size=8, iterations=2, **keys)
    layer = CoELayer(cfg, D, seed=seed, init_std=0.5).to(F64)
    return layer


def tokens(seed: int) -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


def check_router(layer: CoELayer, h: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    router = layer.routers[0]
    got = router(h)
    experts, gates = route(h, router.weight.detach(), spec, router.expert_bias)
    assert torch.equal(got.experts_TK, experts)
    assert torch.allclose(got.weights_TK, gates, rtol=RTOL, atol=0)
    return experts, gates


# ---------------------------------------------------------------- gate rules

MODES = [("softmax", "reference"), ("softmax", "renorm_then_scale"), ("sigmoid", "reference")]
GATE_GRID = list(itertools.product([1, 2, 4], [False, True], [1.0, 2.5], MODES))


@pytest.mark.parametrize(("K", "norm", "scale", "mode"), GATE_GRID,
                         ids=[f"K{k}-{'norm' if n else 'raw'}-x{s}-{m[0]}-{m[1]}" for k, n, s, m in GATE_GRID])
def test_gate_rule_matches_reference(K, norm, scale, mode):
    score, scaling = mode
    layer = make_layer(seed=GATE_GRID.index((K, norm, scale, mode)), top_k=K, norm_topk_prob=norm,
                       routed_scaling_factor=scale, router_score=score, gate_scaling=scaling)
    check_router(layer, tokens(1), RouterSpec(K, score, scaling, norm, scale))


def test_gate_rules_by_hand():
    """Logits (2, 1, 0, -1) on N = 4, top-1 and top-2, norm_topk_prob on, routed_scaling_factor 2.5."""
    z = 1 + math.exp(-1) + math.exp(-2) + math.exp(-3)
    p0, p1 = 1 / z, math.exp(-1) / z  # softmax of the two best
    s0, s1 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))  # their sigmoids
    expected = {  # (score, scaling, K) -> gates
        ("softmax", "reference", 1): [2.5 * p0],  # K = 1: no renormalisation, so scaled
        ("softmax", "reference", 2): [p0 / (p0 + p1), p1 / (p0 + p1)],  # renormalised, not scaled
        ("softmax", "renorm_then_scale", 1): [2.5],
        ("softmax", "renorm_then_scale", 2): [2.5 * p0 / (p0 + p1), 2.5 * p1 / (p0 + p1)],
        ("sigmoid", "reference", 1): [2.5],
        ("sigmoid", "reference", 2): [2.5 * s0 / (s0 + s1), 2.5 * s1 / (s0 + s1)],
    }
    for (score, scaling, K), gates in expected.items():
        layer = CoELayer(MoEConfig(num_experts=4, top_k=K, iterations=1, expert_hidden_size=8, norm_topk_prob=True,
                                   routed_scaling_factor=2.5, router_score=score, gate_scaling=scaling), 4).to(F64)
        with torch.no_grad():
            layer.routers[0].weight.copy_(torch.eye(4, dtype=F64))
        got = layer.routers[0](torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=F64))
        assert got.experts_TK.tolist() == [[0, 1][:K]]
        assert got.weights_TK[0].tolist() == pytest.approx(gates, rel=1e-14), (score, scaling, K)


# ---------------------------------------------------------------- expert bias (aux-loss-free balancing)

@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_chooses_experts_but_not_gates(score):
    layer = make_layer(seed=3, top_k=2, router_score=score, expert_bias_rate=0.01, norm_topk_prob=True)
    h = tokens(4)
    unbiased = layer.routers[0](h).experts_TK
    bias = torch.tensor([0.3, -0.2, 0.0, 0.25, -0.1, 0.05, 0.15, -0.3], dtype=F64)
    layer.routers[0].expert_bias.copy_(bias)
    experts, _ = check_router(layer, h, RouterSpec(2, score, norm=True))
    assert not torch.equal(experts, unbiased)  # the bias changed some choices: the check above means something


def test_bias_update_by_hand_and_counting_only_in_training():
    layer = make_layer(top_k=2, expert_bias_rate=0.125)
    router = layer.routers[0]
    router.load_N.copy_(torch.tensor([3, 1, 2, 2, 0, 5, 2, 1]))  # mean 2
    layer.update_expert_biases(torch.stack([router.load_N, torch.tensor([2] * N)]))
    assert router.expert_bias.tolist() == [-0.125, 0.125, 0, 0, 0.125, -0.125, 0, 0.125]
    assert layer.routers[1].expert_bias.tolist() == [0.0] * N  # a balanced load leaves it
    assert router.load_N.tolist() == [0] * N  # counts restart after an update
    assert bias_step([0.0] * 4, [3, 1, 2, 2], 0.125) == [-0.125, 0.125, 0, 0]

    u = tokens(5).view(4, 10, D)
    with torch.no_grad():  # evaluation: not counted
        layer(u)
    assert int(layer.pending_expert_load().sum()) == 0
    layer(u)[0].sum().backward()
    load = layer.pending_expert_load()
    assert load.tolist() == [torch.bincount(e.flatten(), minlength=N).tolist() for e in _chosen(layer, u)]
    assert load.sum(dim=1).tolist() == [T * 2, T * 2]


def _chosen(layer: CoELayer, u: torch.Tensor) -> list[torch.Tensor]:
    """Experts each iteration chose for u (without counting: under no_grad)."""
    seen = []
    hooks = [r.register_forward_hook(lambda m, a, out: seen.append(out.experts_TK)) for r in layer.routers]
    with torch.no_grad():
        layer(u)
    for hook in hooks:
        hook.remove()
    return seen


# ---------------------------------------------------------------- device-limited routing

GROUP_GRID = [(2, 1, 2, "softmax", False), (2, 1, 4, "softmax", True), (4, 2, 3, "softmax", False),
              (4, 1, 2, "sigmoid", True), (4, 3, 4, "sigmoid", False), (2, 1, 3, "sigmoid", True)]


@pytest.mark.parametrize(("G", "M", "K", "score", "biased"), GROUP_GRID,
                         ids=[f"G{g}-M{m}-K{k}-{s}{'-bias' if b else ''}" for g, m, k, s, b in GROUP_GRID])
def test_group_limited_routing_matches_reference(G, M, K, score, biased):
    layer = make_layer(seed=10 + GROUP_GRID.index((G, M, K, score, biased)), top_k=K, routing_groups=G,
                       routing_group_topk=M, router_score=score, expert_bias_rate=0.01 if biased else 0.0)
    if biased:
        layer.routers[0].expert_bias.copy_(torch.linspace(-0.2, 0.2, N, dtype=F64))
    experts, _ = check_router(layer, tokens(20), RouterSpec(K, score, groups=G, group_topk=M))
    groups_per_token = [len({int(e) // (N // G) for e in row}) for row in experts]
    assert max(groups_per_token) <= M
    unlimited = make_layer(seed=10 + GROUP_GRID.index((G, M, K, score, biased)), top_k=K, router_score=score)
    assert max(len({int(e) // (N // G) for e in row}) for row in unlimited.routers[0](tokens(20)).experts_TK) > M


# ---------------------------------------------------------------- config checks

@pytest.mark.parametrize(("override", "words"), [
    ("moe.routing_groups=3", ["moe.routing_groups=3", "must divide moe.num_experts=8"]),
    ("moe.routing_groups=0", ["moe.routing_groups=0", "must divide"]),
    ("moe.routing_group_topk=3", ["moe.routing_group_topk=3", "between 1 and moe.routing_groups=2"]),
    ("moe.routing_group_topk=0", ["moe.routing_group_topk=0", "between 1"]),
    ("moe.router_score=relu", ["moe.router_score='relu'", "softmax, sigmoid"]),
    ("moe.gate_scaling=v3", ["moe.gate_scaling='v3'", "reference, renorm_then_scale"]),
    ("moe.expert_bias_rate=-1", ["moe.expert_bias_rate=-1.0", ">= 0"]),
])
def test_bad_routing_keys_fail_in_one_line(override, words):
    base = ["moe.num_experts=8", "moe.top_k=2", "moe.routing_groups=2"]
    with pytest.raises(ConfigError) as e:
        config_from_dict({}, [*base, override])
    assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)


def test_group_topk_must_reach_k():
    with pytest.raises(ConfigError, match=r"moe.routing_group_topk=1: its 1 groups of 2 experts hold fewer than "
                                          r"moe.top_k=4; use moe.routing_group_topk >= 2"):
        config_from_dict({}, ["moe.num_experts=8", "moe.top_k=4", "moe.routing_groups=4"])
