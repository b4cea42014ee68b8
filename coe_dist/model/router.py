"""Top-k softmax gating and the router losses of COE_SPEC.

Shape legend: T = tokens, N = routed experts, K = experts per token, B = sequences, L = sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Routing:
    logits_TN: torch.Tensor  # router logits, float32 (or wider)
    probs_TN: torch.Tensor  # softmax(logits)
    weights_TK: torch.Tensor  # gate values g of the chosen experts (after norm/scaling)
    experts_TK: torch.Tensor  # chosen expert ids, int64


class Router(nn.Module):
    """s = softmax(h W^T) in float32; g, I = topk(s, K); optional renormalisation and scaling."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 norm_topk_prob: bool = False, routed_scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor

    def forward(self, h_TD: torch.Tensor) -> Routing:
        # Gating in float32 even under bf16 autocast (as the reference does); float64 stays float64.
        dtype = torch.promote_types(h_TD.dtype, torch.float32)
        with torch.autocast(h_TD.device.type, enabled=False):
            logits_TN = F.linear(h_TD.to(dtype), self.weight.to(dtype))
        probs_TN = logits_TN.softmax(dim=-1)
        weights_TK, experts_TK = probs_TN.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.routed_scaling_factor
        return Routing(logits_TN, probs_TN, weights_TK, experts_TK)


def expert_counts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Token copies routed to each expert: [N] int64."""
    return torch.bincount(experts_TK.flatten(), minlength=num_experts)


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
