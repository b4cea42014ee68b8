"""Top-k gating and the router losses of COE_SPEC.

    logits = h W^T (float32 or wider)
    s      = softmax(logits) | sigmoid(logits)                      (moe.router_score)
    c      = s + b                                                  (b: expert bias, aux-loss-free balancing)
    c[e]   = -inf for e outside the token's best M of G groups     (device-limited routing)
    I      = topk(c, K);  g = s[I]                                  (the bias only chooses; gates come from s)
    g      = gate rule (moe.gate_scaling; sigmoid: g / sum(g) * routed_scaling_factor)

Shape legend: T = tokens, N = routed experts, K = experts per token, G = routing groups, B = sequences,
L = sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Routing:
    logits_TN: torch.Tensor  # router logits, float32 (or wider)
    probs_TN: torch.Tensor  # softmax(logits), or the sigmoid scores normalised over N: the balance losses' P
    weights_TK: torch.Tensor  # gate values g of the chosen experts (after norm/scaling)
    experts_TK: torch.Tensor  # chosen expert ids, int64


@dataclass(frozen=True)
class GateRule:
    """How the chosen scores become gate values (COE_SPEC "The block").

    score "softmax", scaling "reference" (the CoE reference): g/sum(g) if K > 1 and norm_topk_prob, else
    g * routed_scaling_factor, never both. Scaling "renorm_then_scale" (DeepSeek-V3): g/sum(g) if
    norm_topk_prob (any K), then * routed_scaling_factor. Score "sigmoid" (DeepSeek-V3): always
    g/sum(g) * routed_scaling_factor."""

    score: str = "softmax"  # softmax | sigmoid
    scaling: str = "reference"  # reference | renorm_then_scale
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def apply(self, g_TK: torch.Tensor) -> torch.Tensor:
        K = g_TK.shape[-1]
        if self.score == "sigmoid":
            renorm, scale = True, True
        elif self.scaling == "reference":
            renorm = K > 1 and self.norm_topk_prob
            scale = not renorm
        else:
            renorm, scale = self.norm_topk_prob, True
        if renorm:
            g_TK = g_TK / (g_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return g_TK * self.routed_scaling_factor if scale else g_TK


class Router(nn.Module):
    """Scores in float32 (or wider), top-K choice (optionally biased, optionally group-limited), gate rule.

    `expert_bias` (a buffer, saved in checkpoints) exists when aux-loss-free balancing is on; the trainer
    counts the load over all ranks and calls `update_bias` after each optimizer step."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, rule: GateRule = GateRule(),
                 expert_bias: bool = False, routing_groups: int = 1, routing_group_topk: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.rule = rule
        self.routing_groups = routing_groups
        self.routing_group_topk = routing_group_topk
        self.expert_bias: torch.Tensor | None
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)
        # Token copies chosen per expert since the last bias update (training forwards only; not saved).
        self.register_buffer("load_N", torch.zeros(num_experts, dtype=torch.int64) if expert_bias else None,
                             persistent=False)

    def forward(self, h_TD: torch.Tensor) -> Routing:
        # Gating in float32 even under bf16 autocast (as the reference does); float64 stays float64.
        dtype = torch.promote_types(h_TD.dtype, torch.float32)
        with torch.autocast(h_TD.device.type, enabled=False):
            logits_TN = F.linear(h_TD.to(dtype), self.weight.to(dtype))
        if self.rule.score == "sigmoid":
            scores_TN = logits_TN.sigmoid()
            probs_TN = scores_TN / scores_TN.sum(dim=-1, keepdim=True)
        else:
            scores_TN = probs_TN = logits_TN.softmax(dim=-1)
        experts_TK = self._choose(scores_TN.detach())
        weights_TK = self.rule.apply(scores_TN.gather(1, experts_TK))
        if self.expert_bias is not None and self.training and torch.is_grad_enabled():
            self.load_N += torch.bincount(experts_TK.flatten(), minlength=self.load_N.numel())
        return Routing(logits_TN, probs_TN, weights_TK, experts_TK)

    def _choose(self, scores_TN: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, K], best first: top-K of the (biased) scores within each token's best groups."""
        choice_TN = scores_TN if self.expert_bias is None else scores_TN + self.expert_bias.to(scores_TN.dtype)
        if self.routing_groups > 1:
            T, N = choice_TN.shape
            choice_TGn = choice_TN.view(T, self.routing_groups, N // self.routing_groups)
            best_TM = choice_TGn.amax(dim=-1).topk(self.routing_group_topk, dim=-1).indices
            keep_TG = torch.zeros(T, self.routing_groups, dtype=torch.bool, device=choice_TN.device)
            keep_TG.scatter_(1, best_TM, True)
            choice_TN = choice_TGn.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, N)
        return choice_TN.topk(self.top_k, dim=-1).indices

    @torch.no_grad()
    def update_bias(self, load_N: torch.Tensor, rate: float) -> None:
        """b += rate * sign(mean load - load): `load_N` already summed over every rank that routes tokens."""
        load_N = load_N.to(self.expert_bias.dtype)
        self.expert_bias += rate * torch.sign(load_N.mean() - load_N)
        self.load_N.zero_()


def expert_counts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token copies routed to each expert: [N] int64."""
    return torch.bincount(experts_TK.flatten(), minlength=num_experts)


def coselection_counts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, N] int64: (i, j) = tokens that picked both i and j in one iteration (symmetric, zero diagonal)."""
    T, K = experts_TK.shape
    pairs_TKK = experts_TK.unsqueeze(2) * num_experts + experts_TK.unsqueeze(1)
    off_diagonal = ~torch.eye(K, dtype=torch.bool, device=experts_TK.device)
    return torch.bincount(pairs_TKK[:, off_diagonal].flatten(), minlength=num_experts**2).view(num_experts, -1)


def transition_counts(prev_TK: torch.Tensor, next_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N, N] int64: (i, j) = tokens that picked i in one iteration and j in the next."""
    pairs_TKK = prev_TK.unsqueeze(2) * num_experts + next_TK.unsqueeze(1)
    return torch.bincount(pairs_TKK.flatten(), minlength=num_experts**2).view(num_experts, -1)


def seq_aux_loss(routing: Routing, batch: int, num_experts: int) -> torch.Tensor:
    """DeepSeek sequence-level balance loss (without alpha): mean_b sum_i f_{b,i} P_{b,i},
    f_{b,i} = count_{b,i} * N / (L*K), P_{b,i} = mean over the sequence of s_i."""
    T, K = routing.experts_TK.shape
    L = T // batch
    probs_BLN = routing.probs_TN.view(batch, L, num_experts)
    counts_BN = torch.zeros(batch, num_experts, dtype=probs_BLN.dtype, device=probs_BLN.device)
    counts_BN.scatter_add_(1, routing.experts_TK.view(batch, L * K),
                           torch.ones(batch, L * K, dtype=probs_BLN.dtype, device=probs_BLN.device))
    f_BN = counts_BN * (num_experts / (L * K))
    return (f_BN * probs_BLN.mean(dim=1)).sum(dim=1).mean()


def global_aux_loss(routing: Routing, num_experts: int) -> torch.Tensor:
    """Switch-style balance loss over all local tokens (without alpha): sum_i f_i P_i."""
    T, K = routing.experts_TK.shape
    counts_N = expert_counts(routing.experts_TK, num_experts).to(routing.probs_TN.dtype)
    f_N = counts_N * (num_experts / (T * K))
    return (f_N * routing.probs_TN.mean(dim=0)).sum()


def z_loss(routing: Routing) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2 (without coefficient)."""
    return torch.logsumexp(routing.logits_TN, dim=-1).square().mean()
