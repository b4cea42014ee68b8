"""Token dispatch: move each token copy to the rank holding its expert, and back.

    dispatch: permute copies by expert -> exchange per-expert counts -> all-to-all (uneven splits)
              -> regroup received rows by local expert            => rows for GroupedExperts
    combine:  undo the regrouping -> all-to-all back -> weight by g and sum per token

`LocalDispatcher` (ep_size 1) only permutes; `AllToAllDispatcher` adds the two all-to-alls. Both share the
permutation, so the single-process and expert-parallel paths compute the same sums in the same order.
Autograd runs the mirror image: the backward of each all-to-all is an all-to-all with swapped splits.

Shape legend: T = tokens on this rank, K = experts per token, D = hidden, X = token copies sent,
R = rows received, N = routed experts, E = experts on this rank, P = ranks in the expert-parallel group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from coe_dist.parallel.comm_stats import CommStats


@dataclass(frozen=True)
class Permutation:
    """Which copy of which token sits in each row of the expert-sorted buffer."""

    copy_X: torch.Tensor  # flat copy index t*K + k of each kept copy, sorted by expert
    token_X: torch.Tensor  # its token index t
    counts_N: torch.Tensor  # kept copies per global expert
    num_tokens: int


def permute(x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int,
            capacity_factor: float | None = None) -> tuple[torch.Tensor, Permutation, torch.Tensor]:
    """Sort token copies by expert (stable: token order within an expert). With a capacity factor each
    expert keeps its first ceil(cf * T*K / N) copies. Returns (x_XD, permutation, dropped count)."""
    T, K = experts_TK.shape
    flat_X = experts_TK.flatten()
    copy_X = torch.argsort(flat_X, stable=True)
    counts_N = torch.bincount(flat_X, minlength=num_experts)
    dropped = counts_N.new_zeros(())
    if capacity_factor is not None:
        capacity = math.ceil(capacity_factor * T * K / num_experts)
        starts_N = torch.cumsum(counts_N, 0) - counts_N
        position_X = torch.arange(flat_X.numel(), device=flat_X.device) - starts_N[flat_X[copy_X]]
        keep_X = position_X < capacity
        dropped = (~keep_X).sum()
        copy_X = copy_X[keep_X]
        counts_N = counts_N.clamp(max=capacity)
    token_X = torch.div(copy_X, K, rounding_mode="floor")
    return x_TD[token_X], Permutation(copy_X, token_X, counts_N, T), dropped


def unpermute(y_XD: torch.Tensor, perm: Permutation, weights_TK: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k g[t,k] * y[copy (t,k)], accumulated in the gate dtype (float32)."""
    weights_X = weights_TK.flatten()[perm.copy_X]
    weighted_XD = y_XD.to(weights_X.dtype) * weights_X[:, None]
    out_TD = weighted_XD.new_zeros(perm.num_tokens, y_XD.shape[-1])
    return out_TD.index_add(0, perm.token_X, weighted_XD)


@dataclass(frozen=True)
class DispatchState:
    perm: Permutation
    counts_E: torch.Tensor  # rows per local expert, for GroupedExperts
    iteration: int
    send_splits: list[int] | None = None  # rows to each rank of the group
    recv_splits: list[int] | None = None  # rows from each rank
    regroup_R: torch.Tensor | None = None  # received row order -> expert-major order


class LocalDispatcher:
    """All experts on this process: dispatch = permute, combine = unpermute."""

    def __init__(self, num_experts: int, capacity_factor: float | None = None, *, layer: int = 0) -> None:
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.stats = CommStats(layer)

    def _permute(self, x_TD, experts_TK, iteration, wire_dtype):
        x_XD, perm, dropped = permute(x_TD, experts_TK, self.num_experts, self.capacity_factor)
        if self.capacity_factor is not None:
            self.stats.add_dropped(iteration, int(dropped))
        return x_XD.to(wire_dtype), perm

    def dispatch(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, iteration: int,
                 wire_dtype: torch.dtype) -> tuple[torch.Tensor, DispatchState]:
        x_XD, perm = self._permute(x_TD, experts_TK, iteration, wire_dtype)
        return x_XD, DispatchState(perm, perm.counts_N, iteration)

    def combine(self, y_XD: torch.Tensor, state: DispatchState, weights_TK: torch.Tensor) -> torch.Tensor:
        return unpermute(y_XD, state.perm, weights_TK)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all-to-all whose backward is the all-to-all with swapped splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, timer):
        ctx.splits, ctx.group, ctx.timer = (out_splits, in_splits), group, timer
        with timer("fwd", x, out_splits, in_splits):
            return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        with ctx.timer("bwd", grad, in_splits, out_splits):
            return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None, None


class AllToAllDispatcher(LocalDispatcher):
    """Experts sharded over an expert-parallel group: rank r holds experts [r*E, (r+1)*E)."""

    def __init__(self, num_experts: int, group, capacity_factor: float | None = None, *, layer: int = 0):
        super().__init__(num_experts, capacity_factor, layer=layer)
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_local = num_experts // self.ep_size

    def _timer(self, iteration: int, direction: str):
        def timer(phase, x, out_splits, in_splits):
            row_bytes = math.prod(x.shape[1:]) * x.element_size()
            sent = (sum(in_splits) - in_splits[self.ep_rank]) * row_bytes
            received = (sum(out_splits) - out_splits[self.ep_rank]) * row_bytes
            return self.stats.timed(iteration, f"{direction}_{phase}", sent, received, x.device)
        return timer

    def dispatch(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, iteration: int,
                 wire_dtype: torch.dtype) -> tuple[torch.Tensor, DispatchState]:
        P, E = self.ep_size, self.num_local
        x_XD, perm = self._permute(x_TD, experts_TK, iteration, wire_dtype)
        # Experts of rank p are contiguous, so copies sorted by expert are sorted by destination rank.
        recv_counts_PE = _all_to_all(perm.counts_N.view(P, E), [1] * P, [1] * P, self.group)
        # The one device-to-host sync: all-to-all split sizes must be known on the host.
        send_splits, recv_splits = torch.stack(
            [perm.counts_N.view(P, E).sum(1), recv_counts_PE.sum(1)]).tolist()
        x_RD = _AllToAll.apply(x_XD, recv_splits, send_splits, self.group, self._timer(iteration, "dispatch"))
        # Received rows are ordered (source rank, local expert); the experts want (local expert, source rank).
        expert_R = torch.repeat_interleave(
            torch.arange(E, device=x_RD.device).repeat(P), recv_counts_PE.flatten(), output_size=x_RD.shape[0])
        regroup_R = torch.argsort(expert_R, stable=True)
        state = DispatchState(perm, recv_counts_PE.sum(0), iteration, send_splits, recv_splits, regroup_R)
        return x_RD[regroup_R], state

    def combine(self, y_RD: torch.Tensor, state: DispatchState, weights_TK: torch.Tensor) -> torch.Tensor:
        y_back_RD = torch.empty_like(y_RD).index_copy(0, state.regroup_R, y_RD)
        y_XD = _AllToAll.apply(y_back_RD, state.send_splits, state.recv_splits, self.group,
                               self._timer(state.iteration, "combine"))
        return unpermute(y_XD, state.perm, weights_TK)
