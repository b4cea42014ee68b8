"""Token dispatch: move each token copy to the rank holding its expert, and back.

    run (one CoE iteration):
        permute copies by expert -> exchange per-expert counts -> all-to-all (uneven splits)
        -> regroup received rows by local expert -> experts -> undo the regrouping -> all-to-all back
        -> weight by g and sum per token; + the shared experts

`LocalDispatcher` (ep_size 1) only permutes; `AllToAllDispatcher` adds the two all-to-alls. Both share the
permutation, so the single-process and expert-parallel paths compute the same sums in the same order.
Autograd runs the mirror image: the backward of each all-to-all is an all-to-all with swapped splits.

Overlap (`AllToAllDispatcher`, `moe.overlap`): each data all-to-all is issued by one autograd node
(`async_op=True`) and waited for by a second one, as late as the data allows:
  - the shared experts run while the dispatch all-to-all is in flight;
  - `moe.a2a_chunks = n` splits the iteration's tokens into n chunks, each dispatched, computed and combined
    on its own: chunk c+1's dispatch is in flight while chunk c's experts run, and the combines are waited
    for after the last chunk's experts. Routing, capacity drops and the count exchange stay per iteration;
  - backward mirrors it: autograd runs ready nodes in reverse creation order, so a wait node's backward
    issues the gradient all-to-all and the matching start node's backward, reached after the work created
    between the two in forward (shared experts, other chunks), waits for it.
gloo runs the exchange on its own threads, NCCL on its own stream: the same `async_op` API covers both.

Shape legend: T = tokens on this rank, K = experts per token, D = hidden, X = token copies sent,
R = rows received, N = routed experts, E = experts on this rank, P = ranks in the expert-parallel group,
C = token chunks of an iteration (`moe.a2a_chunks`).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from coe_dist.errors import UserError
from coe_dist.faults import fault_point
from coe_dist.parallel.comm_stats import CommStats
from coe_dist.parallel.fp8_wire import dequantize_rows, quantize_rows


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


class _WeightedSum(torch.autograd.Function):
    """out[t] = sum_k w[t,k] * y[t,k] in the gate dtype (float32), as K multiply-adds over [T, D] rows: time
    linear in T*K*D on every device. (One [1, K] x [K, D] product per token, torch.bmm, takes a slow path on
    CPU when K*D < 512, 4x slower per element at K = 1, and keeps a float32 copy of y for its backward.)
    Backward: g_y is one broadcast product; g_w = <g[t], y[t,k]> needs y in float32, converted a block of
    tokens at a time on CPU so the copy stays in cache (benchmarks/unpermute.py)."""

    CPU_BLOCK_TOKENS = 256

    @staticmethod
    def forward(ctx, y_TKD, w_TK):
        ctx.save_for_backward(y_TKD, w_TK)
        out_TD = y_TKD[:, 0].to(w_TK.dtype) * w_TK[:, :1]
        for k in range(1, y_TKD.shape[1]):
            out_TD.addcmul_(y_TKD[:, k], w_TK[:, k:k + 1])
        return out_TD

    @staticmethod
    def backward(ctx, g_TD):
        y_TKD, w_TK = ctx.saved_tensors
        g_y = torch.mul(g_TD.unsqueeze(1), w_TK.unsqueeze(-1), out=torch.empty_like(y_TKD))
        g_w = torch.empty_like(w_TK)
        T = y_TKD.shape[0]
        block = T if y_TKD.is_cuda else _WeightedSum.CPU_BLOCK_TOKENS
        for s in range(0, T, max(block, 1)):
            torch.linalg.vecdot(y_TKD[s:s + block].to(g_TD.dtype), g_TD[s:s + block].unsqueeze(1),
                                out=g_w[s:s + block])
        return g_y, g_w


def unpermute(y_XD: torch.Tensor, perm: Permutation, weights_TK: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k g[t,k] * y[copy (t,k)], accumulated in the gate dtype (float32): the copies are put back
    in token-major [T, K] order (a copy dropped by capacity stays zero), then summed per token with their
    weights, instead of a float32 [X, D] product and an index_add (and their backward passes)."""
    (T, K), D = weights_TK.shape, y_XD.shape[-1]  # D spelled out: an empty chunk (T = 0) must reshape too
    if perm.inverse_X is not None:
        y_TKD = _PermuteRows.apply(y_XD, perm.inverse_X, perm.copy_X).view(T, K, D)
    else:
        y_TKD = y_XD.new_zeros(T * K, D).index_copy(0, perm.copy_X, y_XD).view(T, K, D)
    return _WeightedSum.apply(y_TKD, weights_TK)


def chunk_sizes(num_tokens: int, chunks: int) -> list[int]:
    """Tokens per chunk, as even as possible (the first num_tokens % chunks get one more; some may be 0).
    Every rank uses `chunks` chunks whatever its token count, so all ranks run the same all-to-alls."""
    return [num_tokens // chunks + (c < num_tokens % chunks) for c in range(chunks)]


def split_permutation(perm: Permutation, experts_TK: torch.Tensor, sizes: list[int]) -> list[Permutation]:
    """The copies of each token chunk (consecutive tokens, `sizes` of them) as the chunk's own permutation,
    in the same (expert, token) order; the kept copies are those of `perm`, so capacity stays per iteration.
    Several chunks cost one device-to-host copy (their row counts)."""
    if len(sizes) == 1:
        return [perm]
    K, N, C = experts_TK.shape[1], perm.counts_N.numel(), len(sizes)
    ends_C = torch.tensor(sizes, device=perm.token_X.device).cumsum(0)
    chunk_X = torch.bucketize(perm.token_X, ends_C, right=True)
    counts_CN = torch.bincount(chunk_X * N + experts_TK.flatten()[perm.copy_X], minlength=C * N).view(C, N)
    by_chunk_X = torch.argsort(chunk_X, stable=True)  # chunk-major; stable keeps (expert, token) order inside
    chunks, start = [], 0
    for size, counts_N, rows_X in zip(sizes, counts_CN, by_chunk_X.split(counts_CN.sum(1).tolist()), strict=True):
        copy_X = perm.copy_X[rows_X] - start * K
        inverse_X = _inverse(copy_X) if perm.inverse_X is not None else None
        chunks.append(Permutation(copy_X, perm.token_X[rows_X] - start, counts_N, size, inverse_X))
        start += size
    return chunks


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Row chunks as one autograd node (its backward concatenates), none at all for one chunk."""
    return [x] if len(sizes) == 1 else list(x.split(sizes))


@dataclass(frozen=True)
class DispatchState:
    """One chunk's routing metadata, fixed before its all-to-alls."""

    perm: Permutation
    counts_E: torch.Tensor  # rows per local expert, for GroupedExperts
    iteration: int
    send_splits: list[int]  # rows to each rank of the group
    recv_splits: list[int]  # rows from each rank
    regroup_R: torch.Tensor  # received row order -> expert-major order
    inverse_R: torch.Tensor  # expert-major order -> received row order

    @property
    def num_tokens(self) -> int:
        return self.perm.num_tokens


Experts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows sorted by local expert, counts_E) -> rows


class LocalDispatcher:
    """All experts on this process: permute, experts, unpermute."""

    def __init__(self, num_experts: int, capacity_factor: float | None = None, *, layer: int = 0) -> None:
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.stats = CommStats(layer)

    def _permutation(self, experts_TK: torch.Tensor, iteration: int) -> Permutation:
        perm, dropped = permutation(experts_TK, self.num_experts, self.capacity_factor)
        if self.capacity_factor is not None:
            self.stats.add_dropped(iteration, int(dropped))
        return perm

    def _gather(self, x_TD: torch.Tensor, perm: Permutation, wire_dtype: torch.dtype) -> torch.Tensor:
        if self.capacity_factor is not None:
            return x_TD[perm.token_X].to(wire_dtype)
        return _GatherCopies.apply(x_TD, perm, wire_dtype)

    def run(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor, iteration: int,
            wire_dtype: torch.dtype, experts: Experts, shared: Callable[[], torch.Tensor] | None = None
            ) -> torch.Tensor:
        """One iteration's routed experts, weighted by g and summed per token, + `shared()` when given."""
        perm = self._permutation(experts_TK, iteration)
        routed_TD = unpermute(experts(self._gather(x_TD, perm, wire_dtype), perm.counts_N), perm, weights_TK)
        return routed_TD if shared is None else routed_TD + shared()


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _InFlight:
    """One data all-to-all between its start and wait nodes: forward receives `recv_splits` rows from each
    rank and sends `send_splits`; backward sends the gradient back with the splits swapped.

    It carries one or more row-aligned tensors (same row count, any dtypes): several, or float8 rows, travel
    as one uint8 buffer, each row the bytes of every tensor's row side by side, so that a row and its
    metadata (dedup's slots) need one call. `fp8`: the first tensor's forward rows travel as e4m3 with a
    float32 scale per row (fp8_wire.py) and arrive dequantized to its dtype; its backward gradient travels in
    its own dtype (the quantization is straight-through)."""

    def __init__(self, owner: AllToAllDispatcher, iteration: int, direction: str, recv_splits: list[int],
                 send_splits: list[int], *, fp8: bool = False) -> None:
        self.owner, self.iteration, self.direction = owner, iteration, direction
        self.splits = {"fwd": (recv_splits, send_splits), "bwd": (send_splits, recv_splits)}
        self.fp8 = fp8
        self.work = self.issued_at = self.done_at = None
        self.row_bytes = 0  # bytes per row on the wire of the exchange in flight
        self.packed: torch.Tensor | None = None  # several tensors or fp8: the uint8 rows being received
        self.widths: list[int] = []  # bytes of each tensor's row in `packed`
        self.grad_out: tuple[torch.Tensor, ...] | None = None  # backward: the gradient exchange's outputs

    def start(self, xs: tuple[torch.Tensor, ...], phase: str) -> tuple[torch.Tensor, ...]:
        """Issue the exchange of xs' rows; returns their output buffers, filled in the background until
        `wait`."""
        out_splits, in_splits = self.splits[phase]
        outs = tuple(x.new_empty((sum(out_splits), *x.shape[1:])) for x in xs)
        quantized = self.fp8 and phase == "fwd"
        if len(xs) == 1 and not quantized:
            wire_in, wire_out, self.packed = xs[0].contiguous(), outs[0], None
        else:
            parts = [quantize_rows(xs[0]) if quantized else xs[0], *xs[1:]]
            self.widths = [p.shape[1] * p.element_size() for p in parts]
            wire_in = torch.cat([p.contiguous().view(torch.uint8) for p in parts], dim=1)
            wire_out = self.packed = wire_in.new_empty((sum(out_splits), wire_in.shape[1]))
        self.row_bytes = math.prod(wire_in.shape[1:]) * wire_in.element_size()
        self.issued_at = time.perf_counter()
        self.work = dist.all_to_all_single(wire_out, wire_in, out_splits, in_splits, group=self.owner.group,
                                           async_op=True)
        # gloo completes the future on its own thread when the exchange is done: its completion time. NCCL
        # completes it in stream order, which says nothing about host time, so CUDA records no in-flight time.
        if wire_in.device.type == "cpu":
            self.done_at = self.work.get_future().then(lambda _: time.perf_counter())
        return outs

    def wait(self, outs: tuple[torch.Tensor, ...], phase: str) -> tuple[torch.Tensor, ...]:
        """Block until the exchange is done (timed: the exposed part of its time); returns `outs`, filled."""
        out_splits, in_splits = self.splits[phase]
        key = f"{self.direction}_{phase}"
        with self.owner._timed(self.iteration, key, self.row_bytes, out_splits, in_splits, outs[0].device):
            self.work.wait()
        if self.done_at is not None:
            self.owner.in_flight_s[(self.iteration, key)] += self.done_at.wait() - self.issued_at
        self.work = self.done_at = None
        if self.packed is not None:
            for i, (out, rows) in enumerate(zip(outs, self.packed.split(self.widths, dim=1), strict=True)):
                if i == 0 and self.fp8 and phase == "fwd":
                    out.copy_(dequantize_rows(rows, out.shape[-1]))
                else:
                    out.copy_(rows.contiguous().view(out.dtype))
            self.packed = None
        return outs


class _StartAllToAll(torch.autograd.Function):
    """Issues `flight`'s exchange of xs and returns their output buffers, still being filled: read them only
    through `_WaitAllToAll`. Backward waits for the gradient exchange that `_WaitAllToAll.backward` issued."""

    @staticmethod
    def forward(ctx, flight, *xs):
        ctx.flight = flight
        return flight.start(xs, "fwd")

    @staticmethod
    def backward(ctx, *_grad_placeholders):
        flight = ctx.flight
        grads, flight.grad_out = flight.wait(flight.grad_out, "bwd"), None
        return None, *grads


class _WaitAllToAll(torch.autograd.Function):
    """Waits for `flight`'s exchange; returns the filled buffers. Backward issues the gradient exchange and
    returns at once: the nodes autograd runs before `_StartAllToAll.backward` overlap it. The gradients
    themselves are handed over through `flight`, not returned (they have the sender's row count)."""

    @staticmethod
    def forward(ctx, flight, *buffers):
        ctx.flight = flight
        return flight.wait(buffers, "fwd")

    @staticmethod
    def backward(ctx, *grads):
        ctx.flight.grad_out = ctx.flight.start(grads, "bwd")
        return None, *grads  # placeholders for the start node, which ignores them


Pending = tuple[tuple[torch.Tensor, ...], _InFlight]  # output buffers being filled, and their exchange


def _wait(pending: Pending) -> tuple[torch.Tensor, ...]:
    buffers, flight = pending
    return _WaitAllToAll.apply(flight, *buffers)


class AllToAllDispatcher(LocalDispatcher):
    """Experts sharded over an expert-parallel group: rank r holds experts [r*E, (r+1)*E).

    `overlap`: run the shared experts and the other chunks' work while all-to-alls are in flight; without
    it each all-to-all is waited for as soon as it is issued and the shared experts run last. `chunks`:
    token chunks per iteration (see the module docstring). `stats` times the waits (the exposed all-to-all
    time); `in_flight_s` adds up issue-to-completion seconds per (iteration, direction), CPU (gloo) only.
    """

    def __init__(self, num_experts: int, group, capacity_factor: float | None = None, *, layer: int = 0,
                 chunks: int = 1, overlap: bool = True, fp8: bool = False) -> None:
        super().__init__(num_experts, capacity_factor, layer=layer)
        self.group = group  # the all-to-alls' group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.ep_group, self.expert_rank = group, self.ep_rank  # the expert-parallel group, and which experts are here
        self.num_local = num_experts // self.ep_size
        self.chunks = chunks
        self.overlap = overlap
        self.fp8 = fp8  # dispatch rows as float8 e4m3 + a scale per row (moe.dispatch_dtype: fp8)
        self.in_flight_s: defaultdict[tuple[int, str], float] = defaultdict(float)

    def _timed(self, iteration: int, direction: str, row_bytes: int, out_splits: list[int],
               in_splits: list[int], device: torch.device):
        """`stats.timed` for one exchange of rows of `row_bytes`: bytes to and from the other ranks."""
        sent = (sum(in_splits) - in_splits[self.ep_rank]) * row_bytes
        received = (sum(out_splits) - out_splits[self.ep_rank]) * row_bytes
        return self.stats.timed(iteration, direction, sent, received, device)

    def run(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor, iteration: int,
            wire_dtype: torch.dtype, experts: Experts, shared: Callable[[], torch.Tensor] | None = None
            ) -> torch.Tensor:
        states = self._plan(experts_TK, iteration)
        sizes = [state.num_tokens for state in states]
        chunks = list(zip(_split(x_TD, sizes), _split(weights_TK, sizes), states, strict=True))
        schedule = self._pipelined if self.overlap else self._sequential
        outs, shared_TD = schedule(chunks, wire_dtype, experts, shared)
        routed_TD = outs[0] if len(outs) == 1 else torch.cat(outs)
        return routed_TD if shared_TD is None else routed_TD + shared_TD

    def _pipelined(self, chunks, wire_dtype, experts, shared):
        """Issue order: dispatch 0, [shared experts], dispatch 1, experts 0, combine 0, dispatch 2, experts 1,
        combine 1, ...; the combines are waited for after the last chunk's experts."""
        dispatched = [self._send(*chunks[0], wire_dtype)]
        shared_TD = shared() if shared is not None else None  # while chunk 0's dispatch is in flight
        combined = []
        for c, (_, _, state) in enumerate(chunks):
            if c + 1 < len(chunks):  # in flight while this chunk's experts run
                dispatched.append(self._send(*chunks[c + 1], wire_dtype))
            combined.append(self._send_back(self._expert_rows(dispatched[c], state, experts), state))
        return [self._receive_back(pending, state, w_TK)
                for pending, (_, w_TK, state) in zip(combined, chunks, strict=True)], shared_TD

    def _sequential(self, chunks, wire_dtype, experts, shared):
        """Each all-to-all waited for as soon as it is issued; the shared experts last (the pre-overlap path)."""
        outs = []
        for x_TD, w_TK, state in chunks:
            y_RD = self._expert_rows(self._send(x_TD, w_TK, state, wire_dtype), state, experts)
            outs.append(self._receive_back(self._send_back(y_RD, state), state, w_TK))
        return outs, shared() if shared is not None else None

    # ------------------------------------------------------------------ steps of one chunk

    def _start(self, xs: tuple[torch.Tensor, ...], state, direction: str, *, fp8: bool = False) -> Pending:
        """Issue one data all-to-all of the rows of xs: `dispatch` sends `state.send_splits` rows to each
        rank, `combine` sends back what was received."""
        splits = (state.recv_splits, state.send_splits)
        flight = _InFlight(self, state.iteration, direction, *(splits if direction == "dispatch" else splits[::-1]),
                           fp8=fp8)
        return _StartAllToAll.apply(flight, *xs), flight

    def _send(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, state: DispatchState,
              wire_dtype: torch.dtype) -> Pending:
        return self._start((self._gather(x_TD, state.perm, wire_dtype),), state, "dispatch", fp8=self.fp8)

    def _expert_rows(self, pending: Pending, state: DispatchState, experts: Experts) -> torch.Tensor:
        """Wait for the dispatched rows, run the local experts; returns their outputs in received order."""
        (x_RD,) = _wait(pending)
        # Received rows are ordered (source rank, local expert); the experts want (local expert, source rank).
        y_RD = experts(_PermuteRows.apply(x_RD, state.regroup_R, state.inverse_R), state.counts_E)
        return _PermuteRows.apply(y_RD, state.inverse_R, state.regroup_R)

    def _send_back(self, y_RD: torch.Tensor, state: DispatchState) -> Pending:
        return self._start((y_RD,), state, "combine")

    def _receive_back(self, pending: Pending, state: DispatchState, weights_TK: torch.Tensor) -> torch.Tensor:
        return unpermute(_wait(pending)[0], state.perm, weights_TK)

    # ------------------------------------------------------------------ routing metadata

    def _plan(self, experts_TK: torch.Tensor, iteration: int) -> list[DispatchState]:
        """Permute the iteration's copies, split them into token chunks and exchange every chunk's per-expert
        counts in one all-to-all: each rank gets, per chunk, its E counts and their total as the sender
        computed it. One device-to-host copy brings all chunks' splits to the host (the checks ride on it)."""
        P, E, C = self.ep_size, self.num_local, self.chunks
        perms = split_permutation(self._permutation(experts_TK, iteration), experts_TK,
                                  chunk_sizes(experts_TK.shape[0], C))
        # Experts of rank p are contiguous, so copies sorted by expert are sorted by destination rank.
        counts_CPE = torch.stack([perm.counts_N for perm in perms]).view(C, P, E)
        recv_CPE1 = self._exchange_counts(counts_CPE, counts_CPE.sum(2))
        recv_counts_CPE = recv_CPE1[..., :E]
        send_splits, recv_splits, announced, smallest = torch.stack(
            [counts_CPE.sum(2), recv_counts_CPE.sum(2), recv_CPE1[..., E], recv_counts_CPE.min(2).values]).tolist()
        states = []
        for c, perm in enumerate(perms):
            self._check_metadata(send_splits[c], recv_splits[c], announced[c], smallest[c], perm.copy_X.numel(),
                                 recv_counts_CPE[c], iteration, c)
            expert_R = torch.repeat_interleave(torch.arange(E, device=experts_TK.device).repeat(P),
                                               recv_counts_CPE[c].flatten(), output_size=sum(recv_splits[c]))
            regroup_R = torch.argsort(expert_R, stable=True)
            states.append(DispatchState(perm, recv_counts_CPE[c].sum(0), iteration, send_splits[c],
                                        recv_splits[c], regroup_R, _inverse(regroup_R)))
        return states

    def _exchange_counts(self, counts_CPE: torch.Tensor, rows_CP: torch.Tensor) -> torch.Tensor:
        """One all-to-all of every chunk's per-local-expert copy counts and row count (the sender's own
        total, checked by the receiver) for each rank; returns what each rank sent here, [C, P, E+1]."""
        C, P, E = counts_CPE.shape
        wire_PCE1 = torch.cat([counts_CPE, rows_CP.unsqueeze(2)], 2).transpose(0, 1).contiguous()
        if fault_point("dispatch.counts") == "corrupt":
            wire_PCE1[0, 0, 0] += 1  # what a bit flip or a routing bug would send: counts that do not add up
        return _all_to_all(wire_PCE1.view(P, -1), [1] * P, [1] * P, self.group).view(P, C, E + 1).transpose(0, 1)

    def _check_metadata(self, send_splits: list[int], recv_splits: list[int], announced: list[int],
                        smallest: list[int], rows: int, recv_counts_PE: torch.Tensor, iteration: int,
                        chunk: int) -> None:
        """Routing metadata that does not add up would size the all-to-all wrongly on one side: a deadlock or
        rows landing at the wrong expert. Refuse it before the exchange, naming the ranks and the numbers."""
        of_chunk = f" chunk {chunk}" if self.chunks > 1 else ""
        where = f"layer {self.stats.layer} iteration {iteration}{of_chunk} on expert-parallel rank {self.ep_rank}"
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
