"""The CoE paper's reference training path, re-implemented for benchmarks and equivalence checks.

Follows `CoeMoE` / `MoEGate` / `CoeMLP` / `CoeDecoderLayer.custom_forward` of the paper's reference code
(DeepSeek-V2 style), repository joevidev/chainofexperts, file config/models/coe_deepseekv2/modeling_coe.py:

- gate: `F.linear(h.float(), W.float())`, `softmax(dtype=float32)`, `topk(sorted=False)`; then
  `g /= sum(g) + 1e-20` if `top_k > 1 and norm_topk_prob`, *else* `g *= routed_scaling_factor`;
- training branch of `CoeMoE.forward`: `h.repeat_interleave(top_k, dim=0)`, a Python loop over ALL routed
  experts with boolean masks `y[flat_topk_idx == i] = expert(h[flat_topk_idx == i])`, then
  `(y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)`, shared experts added;
- the decoder layer runs `for _iter in range(inner_iter): h = h + mlp(h, _iter)` (inner residual) on the
  post-attention-normed stream, `+ residual` after the chain only if `outer_residual`.

The reference attaches the aux loss to the output with an `AddAuxiliaryLoss` autograd trick (gradient 1);
here it is returned instead, `forward(u_BLD) -> (h_BLD, aux)`, like `coe_dist.model.coe.CoELayer`, which
gives the same gradients when the caller adds it to the loss. Parameter names are the reference's, so
`ReferenceCoE(cfg, d).load_state_dict(layer.hf_state_dict())` works for an ep_size 1 `CoELayer`.
The outer residual (decoder-level) is not part of the layer, as in `CoELayer`. One adaptation for bf16
autocast over float32 master weights is marked in `moe`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coe_dist.config import MoEConfig


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.dtype == torch.float32:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ReferenceMLP(nn.Module):
    """CoeMLP: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReferenceGate(nn.Module):
    """MoEGate with scoring_func="softmax", topk_method="greedy"."""

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.n_routed_experts = config.num_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_coef
        self.seq_aux = config.aux_loss_type == "seq"
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, hidden_states: torch.Tensor):
        bsz, seq_len, h = hidden_states.shape
        hidden_states = hidden_states.view(-1, h)
        logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32), None)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            denominator = topk_weight.sum(dim=-1, keepdim=True) + 1e-20
            topk_weight = topk_weight / denominator
        else:
            topk_weight = topk_weight * self.routed_scaling_factor
        aux_loss = None
        if self.training and self.alpha > 0.0:
            topk_idx_for_aux_loss = topk_idx.view(bsz, -1)
            if self.seq_aux:
                scores_for_seq_aux = scores.view(bsz, seq_len, -1)
                ce = torch.zeros(bsz, self.n_routed_experts, device=hidden_states.device)
                ce.scatter_add_(1, topk_idx_for_aux_loss,
                                torch.ones(bsz, seq_len * self.top_k, device=hidden_states.device)
                                ).div_(seq_len * self.top_k / self.n_routed_experts)
                aux_loss = (ce * scores_for_seq_aux.mean(dim=1)).sum(dim=1).mean() * self.alpha
            else:
                mask_ce = F.one_hot(topk_idx_for_aux_loss.view(-1), num_classes=self.n_routed_experts)
                ce = mask_ce.float().mean(0)
                aux_loss = (scores.mean(0) * ce * self.n_routed_experts).sum() * self.alpha
        return topk_idx, topk_weight, aux_loss


class ReferenceCoE(nn.Module):
    """CoeMoE (training branch) + the decoder layer's inner-iteration loop. `forward(u_BLD) -> (h, aux)`."""

    def __init__(self, config: MoEConfig, hidden_size: int) -> None:
        super().__init__()
        if config.ep_size != 1 or config.capacity_factor is not None or config.z_loss_coef:
            raise ValueError("the reference path is single-process, dropless, without z-loss")
        self.config = config
        self.num_experts_per_tok = config.top_k
        self.inner_iter = config.iterations
        self.experts = nn.ModuleList(
            ReferenceMLP(hidden_size, config.expert_hidden_size) for _ in range(config.num_experts))
        self.use_igate = config.independent_gating
        if self.use_igate:
            self.gate = nn.ModuleList(ReferenceGate(hidden_size, config) for _ in range(self.inner_iter))
        else:
            self.gate = ReferenceGate(hidden_size, config)
        self.shared_experts = (
            ReferenceMLP(hidden_size, config.expert_hidden_size * config.num_shared_experts)
            if config.num_shared_experts else None)

    def moe(self, hidden_states: torch.Tensor, _iter: int):
        """CoeMoE.forward, training branch."""
        identity = hidden_states
        orig_shape = hidden_states.shape
        gate = self.gate[_iter] if self.use_igate else self.gate
        topk_idx, topk_weight, aux_loss = gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        flat_topk_idx = topk_idx.view(-1)
        hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
        # The reference trained under FSDP MixedPrecision(param_dtype=bf16) (coe/trainer/base_trainer.py), so its
        # stream and `y` were bf16. Under autocast with float32 master weights the stream is float32 and the
        # experts return bf16, which `y[mask] = ...` (index_put) refuses: allocate `y` in the expert dtype.
        y = torch.empty_like(hidden_states, dtype=_compute_dtype(hidden_states))
        for i, expert in enumerate(self.experts):
            y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
        y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
        y = y.to(hidden_states.dtype).view(*orig_shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y, aux_loss

    def forward(self, u_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = u_BLD
        aux = u_BLD.new_zeros((), dtype=torch.float32)
        for _iter in range(self.inner_iter):
            inner_residual = hidden_states
            hidden_states, aux_loss = self.moe(hidden_states, _iter)
            if aux_loss is not None:
                aux = aux + aux_loss
            if self.config.inner_residual:
                hidden_states = inner_residual + hidden_states
        return hidden_states, aux
