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

from coe_dist.errors import UserError
from coe_dist.faults import fault_point
from coe_dist.parallel.comm_stats import CommStats


class RoutingMetadataError(UserError, RuntimeError):
    """Expert counts exchanged between ranks that do not add up (a bug, or memory or network corruption)."""


@dataclass(frozen=True)
class Permutation:
    """Which copy of which token sits in each row of the expert-sorted buffer."""

    copy_X: torch.Tensor  # flat copy index t*K + k of each kept copy, sorted by expert
    token_X: torch.Tensor  # its token index t
    counts_N: torch.Tensor  # kept copies per global expert
    num_tokens: int
    inverse_X: torch.Tensor | None = None  # dropless only: row of copy t*K + k in the sorted buffer


class _PermuteRows(torch.autograd.Function):
    """out = x[order] for a permutation `order` of the rows; backward gathers with the inverse permutation
    (autograd of x[order] / index_copy would zero-fill and scatter-accumulate instead)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _GatherCopies(torch.autograd.Function):
    """Dropless dispatch gather: x_TD.to(dtype)[token_X]. Casts the T rows once instead of the T*K copies, and
    gathers half the bytes; backward brings the copies' gradients into token-major [T, K] order (a gather) and
    sums over K in float32, as autograd of the float32 gather + cast did."""

    @staticmethod
    def forward(ctx, x_TD, perm, dtype):
        ctx.save_for_backward(perm.inverse_X)
        ctx.in_dtype, ctx.T = x_TD.dtype, perm.num_tokens
        ctx.K = perm.copy_X.numel() // perm.num_tokens if perm.num_tokens else 0
        return x_TD.to(dtype).index_select(0, perm.token_X)

    @staticmethod
    def backward(ctx, g_XD):
        (inverse_X,) = ctx.saved_tensors
        g_TKD = g_XD.index_select(0, inverse_X).view(ctx.T, ctx.K, g_XD.shape[-1])
        return g_TKD.sum(1, dtype=torch.promote_types(ctx.in_dtype, torch.float32)).to(ctx.in_dtype), None, None


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def permute(x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int,
            capacity_factor: float | None = None) -> tuple[torch.Tensor, Permutation, torch.Tensor]:
    """Sort token copies by expert (stable: token order within an expert). With a capacity factor each
    expert keeps its first ceil(cf * T*K / N) copies. Returns (x_XD, permutation, dropped count)."""
    perm, dropped = permutation(experts_TK, num_experts, capacity_factor)
    return x_TD[perm.token_X], perm, dropped


def permutation(experts_TK: torch.Tensor, num_experts: int,
                capacity_factor: float | None = None) -> tuple[Permutation, torch.Tensor]:
    """The permutation of `permute`, without moving rows. Returns (permutation, dropped count)."""
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
    inverse_X = _inverse(copy_X) if capacity_factor is None else None
    return Permutation(copy_X, token_X, counts_N, T, inverse_X), dropped


def unpermute(y_XD: torch.Tensor, perm: Permutation, weights_TK: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k g[t,k] * y[copy (t,k)], accumulated in the gate dtype (float32): the copies are put back
    in token-major [T, K] order (a copy dropped by capacity stays zero), then one [1, K] x [K, D] product per
    token, instead of a float32 [X, D] product and an index_add (and their backward passes)."""
    T, K = weights_TK.shape
    if perm.inverse_X is not None:
        y_TKD = _PermuteRows.apply(y_XD, perm.inverse_X, perm.copy_X).view(T, K, -1)
    else:
        y_TKD = y_XD.new_zeros(T * K, y_XD.shape[-1]).index_copy(0, perm.copy_X, y_XD).view(T, K, -1)
    return torch.bmm(weights_TK.unsqueeze(1), y_TKD.to(weights_TK.dtype)).squeeze(1)


@dataclass(frozen=True)
class DispatchState:
    perm: Permutation
    counts_E: torch.Tensor  # rows per local expert, for GroupedExperts
    iteration: int
    send_splits: list[int] | None = None  # rows to each rank of the group
    recv_splits: list[int] | None = None  # rows from each rank
    regroup_R: torch.Tensor | None = None  # received row order -> expert-major order
    inverse_R: torch.Tensor | None = None  # expert-major order -> received row order


class LocalDispatcher:
    """All experts on this process: dispatch = permute, combine = unpermute."""

    def __init__(self, num_experts: int, capacity_factor: float | None = None, *, layer: int = 0) -> None:
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.stats = CommStats(layer)

    def _permute(self, x_TD, experts_TK, iteration, wire_dtype):
        perm, dropped = permutation(experts_TK, self.num_experts, self.capacity_factor)
        if self.capacity_factor is not None:
            self.stats.add_dropped(iteration, int(dropped))
            return x_TD[perm.token_X].to(wire_dtype), perm
        return _GatherCopies.apply(x_TD, perm, wire_dtype), perm

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
        # Each row goes to one rank: its E per-expert counts, then their total as the sender computed it.
        counts_PE = perm.counts_N.view(P, E)
        wire_PE1 = torch.cat([counts_PE, counts_PE.sum(1, keepdim=True)], 1)
        if fault_point("dispatch.counts") == "corrupt":
            wire_PE1[0, 0] += 1  # what a bit flip or a routing bug would send: counts that do not add up
        recv_PE1 = _all_to_all(wire_PE1, [1] * P, [1] * P, self.group)
        recv_counts_PE = recv_PE1[:, :E]
        # The one device-to-host sync: all-to-all split sizes must be known on the host. The checks ride on it.
        send_splits, recv_splits, announced, smallest = torch.stack(
            [counts_PE.sum(1), recv_counts_PE.sum(1), recv_PE1[:, E], recv_counts_PE.min(1).values]).tolist()
        self._check_metadata(send_splits, recv_splits, announced, smallest, x_XD.shape[0], recv_counts_PE, iteration)
        x_RD = _AllToAll.apply(x_XD, recv_splits, send_splits, self.group, self._timer(iteration, "dispatch"))
        # Received rows are ordered (source rank, local expert); the experts want (local expert, source rank).
        expert_R = torch.repeat_interleave(
            torch.arange(E, device=x_RD.device).repeat(P), recv_counts_PE.flatten(), output_size=x_RD.shape[0])
        regroup_R = torch.argsort(expert_R, stable=True)
        inverse_R = _inverse(regroup_R)
        state = DispatchState(perm, recv_counts_PE.sum(0), iteration, send_splits, recv_splits, regroup_R, inverse_R)
        return _PermuteRows.apply(x_RD, regroup_R, inverse_R), state

    def _check_metadata(self, send_splits: list[int], recv_splits: list[int], announced: list[int],
                        smallest: list[int], rows: int, recv_counts_PE: torch.Tensor, iteration: int) -> None:
        """Routing metadata that does not add up would size the all-to-all wrongly on one side: a deadlock or
        rows landing at the wrong expert. Refuse it before the exchange, naming the ranks and the numbers."""
        where = f"layer {self.stats.layer} iteration {iteration} on expert-parallel rank {self.ep_rank}"
        if sum(send_splits) != rows:
            raise RoutingMetadataError(f"routing metadata mismatch in {where}: the per-expert counts add up to "
                                       f"{sum(send_splits)} token copies but {rows} were permuted")
        for src, (got, said, low) in enumerate(zip(recv_splits, announced, smallest, strict=True)):
            if got != said or low < 0:
                sender = dist.get_global_rank(self.group, src)
                raise RoutingMetadataError(
                    f"routing metadata mismatch in {where}: rank {sender} (expert-parallel rank {src}) announced "
                    f"{said} token copies for this rank but its per-expert counts {recv_counts_PE[src].tolist()} "
                    f"add up to "
                    f"{got}; refusing the all-to-all (it would hang or mix up rows)")

    def combine(self, y_RD: torch.Tensor, state: DispatchState, weights_TK: torch.Tensor) -> torch.Tensor:
        y_back_RD = _PermuteRows.apply(y_RD, state.inverse_R, state.regroup_R)
        y_XD = _AllToAll.apply(y_back_RD, state.send_splits, state.recv_splits, self.group,
                               self._timer(state.iteration, "combine"))
        return unpermute(y_XD, state.perm, weights_TK)
