"""The Chain-of-Experts block (COE_SPEC "The block").

    h_0 = u                                           (u: post-attention RMSNorm of the stream x)
    for t in 1..C:
        route h_{t-1} locally -> dispatch copies -> experts -> combine, weighted by g
        h_t = routed + shared(h_{t-1}) + (h_{t-1} if inner_residual)
    return h_C, aux                                   (the decoder layer adds x when outer_residual)

Shape legend: B = batch, L = sequence, T = B*L tokens, D = hidden, K = experts per token, N = routed experts.
"""

from __future__ import annotations

import hashlib
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from coe_dist.config import MoEConfig, validate_moe
from coe_dist.errors import UserError
from coe_dist.model.experts import GroupedExperts, SwiGLU, _compute_dtype
from coe_dist.model.router import (
    GateRule,
    Router,
    Routing,
    coselection_counts,
    expert_counts,
    global_aux_loss,
    seq_aux_loss,
    transition_counts,
    z_loss,
)
from coe_dist.parallel.dedup import DedupAllToAllDispatcher
from coe_dist.parallel.dispatch import AllToAllDispatcher, LocalDispatcher
from coe_dist.parallel.node_dedup import NodeDedupAllToAllDispatcher

ROUTING_SAMPLE_TOKENS = 1024  # tokens' expert choices kept per logging step, to predict a placement's traffic


def _build_dispatcher(config: MoEConfig, layer: int) -> LocalDispatcher:
    if config.ep_size == 1:
        return LocalDispatcher(config.num_experts, config.capacity_factor, layer=layer)
    from coe_dist.parallel.groups import expert_parallel_group

    group = expert_parallel_group(config.ep_size, config.num_experts)
    options = dict(layer=layer, chunks=config.a2a_chunks, overlap=config.overlap, fp8=config.dispatch_dtype == "fp8")
    if config.dispatch == "node_dedup":
        from coe_dist.parallel.groups import node_groups, ranks_per_node

        inter, intra = node_groups(config.ep_size, ranks_per_node(config.ranks_per_node))
        return NodeDedupAllToAllDispatcher(config.num_experts, group, inter, intra, config.capacity_factor, **options)
    kind = DedupAllToAllDispatcher if config.dispatch == "dedup" else AllToAllDispatcher
    return kind(config.num_experts, group, config.capacity_factor, **options)


class StateDictMismatch(UserError, KeyError):
    """Weights whose keys do not fit the layer: the message names the missing and the unexpected keys."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class CoELayer(nn.Module):
    """C iterations of top-K-of-N routing with shared experts. `forward(u_BLD) -> (h_BLD, aux_loss)`.

    With `config.ep_size = P > 1` (torch.distributed initialised) the layer holds only the experts of its
    rank in the expert-parallel group and exchanges token copies by all-to-all at every iteration.
    """

    def __init__(self, config: MoEConfig, hidden_size: int, *, layer: int = 0, seed: int = 0,
                 init_std: float = 0.02) -> None:
        super().__init__()
        validate_moe(config)
        self.config = config
        self.hidden_size = hidden_size
        self.layer = layer
        num_routers = config.iterations if config.independent_gating else 1
        rule = GateRule(config.router_score, config.gate_scaling, config.norm_topk_prob,
                        config.routed_scaling_factor)
        self.routers = nn.ModuleList(
            Router(hidden_size, config.num_experts, config.top_k, rule=rule, expert_bias=config.expert_bias_rate > 0,
                   routing_groups=config.routing_groups, routing_group_topk=config.routing_group_topk)
            for _ in range(num_routers))
        self.dispatcher = _build_dispatcher(config, layer)
        ep_rank = getattr(self.dispatcher, "expert_rank", 0)
        self.num_local_experts = config.num_experts // config.ep_size
        self.first_expert = ep_rank * self.num_local_experts
        self.experts = GroupedExperts(self.num_local_experts, hidden_size, config.expert_hidden_size,
                                      impl=config.expert_impl)
        shared_width = config.shared_expert_hidden_size or config.num_shared_experts * config.expert_hidden_size
        self.shared_experts = SwiGLU(hidden_size, shared_width) if config.num_shared_experts else None
        # Qwen2-MoE's shared-expert gate: the shared output is scaled by sigmoid(w . h) per token.
        self.shared_expert_gate = (nn.Linear(hidden_size, 1, bias=False)
                                   if config.num_shared_experts and config.shared_expert_gate else None)
        # Expert placement (moe.placement): slot s (held by rank s // num_local_experts) holds original expert
        # expert_order[s]. Routers' rows and checkpoints follow the slots, so routing and dispatch need no table;
        # only the routing records speak original ids (statistics that survive a re-placement).
        self.register_buffer("expert_order", torch.arange(config.num_experts), persistent=False)
        # Set by the trainer on logging steps: the next forward records routing statistics (no collectives);
        # record_coselection adds which experts tokens pick together (log.coselection).
        self.record_routing = False
        self.record_coselection = True
        self.routing_record: dict[str, object] = {}
        self.reset_parameters(seed, init_std)

    @torch.no_grad()
    def reset_parameters(self, seed: int, std: float) -> None:
        """Normal(0, std) init. Each routed expert draws from a generator seeded by (seed, layer, global
        expert id), so a model has the same weights whatever the expert-parallel layout."""
        def normal_(t: torch.Tensor, *key: int) -> None:
            digest = hashlib.sha256(repr((seed, self.layer) + key).encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:6], "little"))
            t.copy_(torch.randn(t.shape, generator=g) * std)

        for t, router in enumerate(self.routers):
            normal_(router.weight, 0, t)
        for e in range(self.num_local_experts):
            expert_id = self.first_expert + e
            normal_(self.experts.w_gate_up_E2FD[e], 1, expert_id)
            normal_(self.experts.w_down_EDF[e], 2, expert_id)
        if self.shared_experts is not None:
            for i, lin in enumerate(self.shared_experts.children()):
                normal_(lin.weight, 3, i)
        if self.shared_expert_gate is not None:
            normal_(self.shared_expert_gate.weight, 4, 0)

    # ------------------------------------------------------------------ forward

    def forward(self, u_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, D = u_BLD.shape
        cfg = self.config
        h_TD = u_BLD.reshape(B * L, D)
        aux = h_TD.new_zeros((), dtype=torch.promote_types(h_TD.dtype, torch.float32))
        chain: list[torch.Tensor] = []
        # One compute-dtype copy of the expert weights serves all C iterations (casting them per call was the
        # layer's largest non-GEMM cost).
        with self.experts.reuse_weight_casts():
            for t in range(cfg.iterations):
                router = self.routers[t if cfg.independent_gating else 0]
                routing = router(h_TD)
                aux = aux + self._router_loss(routing, B)
                if self.record_routing:
                    chain.append(self._record(routing, t, chain[-1] if chain else None))
                y_TD = self._moe_iteration(h_TD, routing, t)
                h_TD = (y_TD + h_TD if cfg.inner_residual else y_TD).to(u_BLD.dtype)
        if chain:
            # Chain diversity: distinct ordered tuples of expert sets (one set per iteration) over tokens.
            self.routing_record["chains"] = int(torch.unique(torch.cat(chain, dim=1), dim=0).shape[0])
            self.routing_record["tokens"] = B * L
        return h_TD.view(B, L, D), aux

    @torch.no_grad()
    def _record(self, routing: Routing, iteration: int, prev_TK: torch.Tensor | None) -> torch.Tensor:
        """Load per slot and entropy; co-selection within the iteration and from the last one, and a sample of
        tokens' choices, in original expert ids (coe_dist/train/coselection.py). Returns the sorted ids."""
        N, rec = self.config.num_experts, self.routing_record
        probs = routing.probs_TN
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()
        rec[f"iter{iteration}/counts"] = expert_counts(routing.experts_TK, N)
        rec[f"iter{iteration}/entropy"] = float(entropy)
        ids_TK = self.expert_order[routing.experts_TK].sort(dim=-1).values
        if self.record_coselection:
            rec[f"iter{iteration}/pairs"] = coselection_counts(ids_TK, N)
            if prev_TK is not None:
                rec[f"iter{iteration}/follows"] = transition_counts(prev_TK, ids_TK, N)
            rec[f"iter{iteration}/sample"] = ids_TK[:ROUTING_SAMPLE_TOKENS]
        return ids_TK

    def set_placement(self, order: list[int]) -> None:
        """Slot s holds original expert order[s] (a permutation of range(N)); set before weights are loaded."""
        if sorted(order) != list(range(self.config.num_experts)):
            raise ValueError(f"layer {self.layer}: placement {order} is not a permutation of "
                             f"0..{self.config.num_experts - 1}")
        self.expert_order.copy_(torch.tensor(order))

    def _moe_iteration(self, h_TD: torch.Tensor, routing: Routing, iteration: int) -> torch.Tensor:
        """Routed + shared experts of one iteration (with ep_size > 1 the shared experts run while the
        dispatch all-to-all is in flight, unless moe.overlap is off)."""
        if self.config.recompute and torch.is_grad_enabled():
            # Keep only h and the routing of this iteration; the dispatch, experts and combine run again in
            # backward (their all-to-alls too, in the same order on every rank). The shared experts stay
            # outside the recomputed part, as before overlap existed: kept, not recomputed, not overlapped.
            y_TD = checkpoint(self._routed_experts_raw, h_TD, routing.weights_TK, routing.experts_TK, iteration,
                              False, use_reentrant=False)
            return y_TD if self.shared_experts is None else y_TD + self._shared(h_TD)
        return self._routed_experts_raw(h_TD, routing.weights_TK, routing.experts_TK, iteration, True)

    def _shared(self, h_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.shared_experts(h_TD)
        if self.shared_expert_gate is None:
            return y_TD
        return torch.sigmoid(self.shared_expert_gate(h_TD)) * y_TD

    def _routed_experts_raw(self, h_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                            iteration: int, with_shared: bool) -> torch.Tensor:
        """permute -> all-to-all -> experts -> all-to-all -> unpermute, weighted sum (+ shared experts): the
        dispatcher schedules the expert calls around its all-to-alls."""
        shared = with_shared and self.shared_experts is not None
        return self.dispatcher.run(h_TD, weights_TK, experts_TK, iteration, _compute_dtype(h_TD), self.experts,
                                   partial(self._shared, h_TD) if shared else None)

    def _router_loss(self, routing: Routing, batch: int) -> torch.Tensor:
        cfg = self.config
        loss = routing.probs_TN.new_zeros(())
        if cfg.aux_loss_coef:
            balance = (seq_aux_loss(routing, batch, cfg.num_experts) if cfg.aux_loss_type == "seq"
                       else global_aux_loss(routing, cfg.num_experts))
            loss = loss + cfg.aux_loss_coef * balance
        if cfg.z_loss_coef:
            loss = loss + cfg.z_loss_coef * z_loss(routing)
        return loss

    # ------------------------------------------------------------------ aux-loss-free balancing

    def pending_expert_load(self) -> torch.Tensor:
        """[routers, N] token copies each router chose per expert since its last bias update (this rank)."""
        return torch.stack([router.load_N for router in self.routers])

    def update_expert_biases(self, load_RN: torch.Tensor) -> None:
        """One bias step per router from `load_RN`, the pending loads already summed over all ranks."""
        for router, load_N in zip(self.routers, load_RN, strict=True):
            router.update_bias(load_N, self.config.expert_bias_rate)

    # ------------------------------------------------------------------ reference layout

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the reference `CoeMoE` names; with ep_size > 1 only this rank's experts."""
        return {name: dest.detach().clone() for name, dest in self._hf_targets().items()}

    def _hf_targets(self, expert_ids: range | None = None) -> dict[str, torch.Tensor]:
        """Reference name -> destination parameter (or view) for the parameters this rank holds; with
        `expert_ids`, the names of those routed experts instead of this rank's (values then unused)."""
        f = self.config.expert_hidden_size
        targets: dict[str, torch.Tensor] = {}
        if self.config.independent_gating:
            for t, router in enumerate(self.routers):
                targets[f"gate.{t}.weight"] = router.weight
        else:
            targets["gate.weight"] = self.routers[0].weight
        local = range(self.first_expert, self.first_expert + self.num_local_experts)
        for i in local if expert_ids is None else expert_ids:
            e = (i - self.first_expert) if i in local else 0
            targets[f"experts.{i}.gate_proj.weight"] = self.experts.w_gate_up_E2FD[e, :f]
            targets[f"experts.{i}.up_proj.weight"] = self.experts.w_gate_up_E2FD[e, f:]
            targets[f"experts.{i}.down_proj.weight"] = self.experts.w_down_EDF[e]
        if self.shared_experts is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                targets[f"shared_experts.{name}.weight"] = getattr(self.shared_experts, name).weight
        if self.shared_expert_gate is not None:
            targets["shared_expert_gate.weight"] = self.shared_expert_gate.weight
        return targets

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
        """Load reference-layout weights; returns (missing, unexpected) key lists, as torch's load_state_dict.

        A full dict is accepted with ep_size > 1: this rank keeps its own experts, the other ranks' experts
        are neither missing nor unexpected. `strict` (default): a missing or unexpected key (a C=3 dict into a
        C=2 layer, an S=1 dict into an S=0 layer) raises StateDictMismatch naming them, before any copy.
        A mis-shaped key always raises ValueError naming it."""
        targets = self._hf_targets()
        known = set(self._hf_targets(range(self.config.num_experts)))
        missing = sorted(name for name in targets if name not in sd)
        unexpected = sorted(name for name in sd if name not in known)
        if strict and (missing or unexpected):
            raise StateDictMismatch(f"reference state dict does not fit CoE layer {self.layer}: missing "
                                    f"{missing or 'none'}, unexpected {unexpected or 'none'}; the weights were "
                                    "saved for another moe config (iterations, independent_gating, "
                                    "num_shared_experts, num_experts)")
        for name, dest in targets.items():
            if name in sd and tuple(sd[name].shape) != tuple(dest.shape):
                raise ValueError(f"reference state dict key '{name}' has shape {list(sd[name].shape)}, "
                                 f"expected {list(dest.shape)} for this config")
        for name, dest in targets.items():
            if name in sd:
                dest.copy_(sd[name])
        return missing, unexpected
