"""An independent float64 implementation of the router's choice and gates (COE_SPEC "The block" and
"Routing options"), written from the spec with plain Python floats and loops, sharing no code with
`coe_dist.model.router`. Used by tests/test_router.py and tests/test_expert_parallel.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RouterSpec:
    K: int
    score: str = "softmax"  # softmax | sigmoid
    scaling: str = "reference"  # reference | renorm_then_scale
    norm: bool = False  # norm_topk_prob
    scale: float = 1.0  # routed_scaling_factor
    groups: int = 1  # G
    group_topk: int = 1  # M

    @classmethod
    def of(cls, cfg) -> RouterSpec:
        """From a MoEConfig (only its routing keys are read)."""
        return cls(cfg.top_k, cfg.router_score, cfg.gate_scaling, cfg.norm_topk_prob, cfg.routed_scaling_factor,
                   cfg.routing_groups, cfg.routing_group_topk)


def _scores(logits: list[float], score: str) -> list[float]:
    if score == "sigmoid":
        return [1.0 / (1.0 + math.exp(-v)) for v in logits]
    m = max(logits)
    ex = [math.exp(v - m) for v in logits]
    return [e / sum(ex) for e in ex]


def _gates(g: list[float], spec: RouterSpec) -> list[float]:
    """The three gate rules, spelled out case by case."""
    if spec.score == "sigmoid":  # DeepSeek-V3: always renormalised over the chosen K, then scaled
        return [x / sum(g) * spec.scale for x in g]
    if spec.scaling == "reference":  # the CoE reference: renormalise (K > 1 and norm) or scale, never both
        if spec.K > 1 and spec.norm:
            return [x / sum(g) for x in g]
        return [x * spec.scale for x in g]
    if spec.norm:  # renorm_then_scale, at any K
        g = [x / sum(g) for x in g]
    return [x * spec.scale for x in g]


def route_token(logits: list[float], spec: RouterSpec, bias: list[float] | None = None,
                min_gap: float = 1e-9) -> tuple[list[int], list[float]]:
    """(chosen experts, best biased score first; their gates) of one token. Asserts no near-tie decides."""
    n = len(logits)
    s = _scores(logits, spec.score)
    c = [s[e] + (bias[e] if bias else 0.0) for e in range(n)]
    allowed = list(range(n))
    if spec.groups > 1:
        size = n // spec.groups
        best_in_group = [max(c[q * size:(q + 1) * size]) for q in range(spec.groups)]
        ranked = sorted(range(spec.groups), key=lambda q: -best_in_group[q])
        if spec.group_topk < spec.groups:
            assert best_in_group[ranked[spec.group_topk - 1]] - best_in_group[ranked[spec.group_topk]] > min_gap
        allowed = [e for q in ranked[:spec.group_topk] for e in range(q * size, (q + 1) * size)]
    order = sorted(allowed, key=lambda e: -c[e])
    if spec.K < len(order):
        assert c[order[spec.K - 1]] - c[order[spec.K]] > min_gap, "near-tie in the test data"
    top = order[:spec.K]
    return top, _gates([s[e] for e in top], spec)


def route(h_TD: torch.Tensor, w_ND: torch.Tensor, spec: RouterSpec, bias_N: torch.Tensor | None = None,
          min_gap: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token: (experts [T, K] int64, gates [T, K] float64)."""
    h, w = h_TD.double().tolist(), w_ND.double().tolist()
    bias = None if bias_N is None else bias_N.double().tolist()
    experts, gates = [], []
    for x in h:
        logits = [math.fsum(a * b for a, b in zip(row, x, strict=True)) for row in w]
        top, g = route_token(logits, spec, bias, min_gap)
        experts.append(top)
        gates.append(g)
    return torch.tensor(experts, dtype=torch.int64), torch.tensor(gates, dtype=torch.float64)


def bias_step(bias_N: list[float], load_N: list[int], rate: float) -> list[float]:
    """b_i += rate * sign(mean load - load_i)."""
    mean = sum(load_N) / len(load_N)
    return [b + rate * ((mean > x) - (mean < x)) for b, x in zip(bias_N, load_N, strict=True)]
