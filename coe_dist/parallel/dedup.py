"""One row per (token, destination rank): the deduplicated dispatch (`moe.dispatch: dedup`).

    home rank    kept copies (after capacity, as `permutation` keeps them) -> rows: the distinct (destination
                 rank, token) pairs, sorted by rank then token; each row carries its slots, the (local expert
                 id, gate) of every copy of that token for that rank
                 -> one all-to-all of the rows (wire dtype) with their slots (gate dtype) packed alongside
    expert rank  fan each received row out to its slots' experts (one grouped pass, copies sorted by local
                 expert) -> gate-weighted sum per received row, in the gate dtype
                 -> all-to-all back: one row per (token, rank), in the wire dtype
    home rank    sum the rows of each token

Compared with `AllToAllDispatcher` (one row per copy both ways), a token whose K experts live on k distinct
ranks sends k rows instead of K each way, plus 8 bytes per slot (gate and id as float32) with the dispatch
(forward: the values; backward: their gradients). The gates
travel with autograd, so their gradients come back with the dispatch's backward; everything else is the
parent's machinery (count exchange, chunks, overlap, fp8 rows, timing).

Shape legend: T = tokens on this rank, K = experts per token, D = hidden, X = rows sent, R = rows received,
Y = copies, S = slots per row (min(K, E)), E = experts on this rank, P = ranks in the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coe_dist.parallel.dispatch import (
    AllToAllDispatcher,
    Experts,
    Pending,
    Permutation,
    RoutingMetadataError,
    _wait,
    chunk_sizes,
    split_permutation,
    unpermute,
)


@dataclass(frozen=True)
class DedupState:
    """One chunk's rows and slots, fixed before its all-to-alls."""

    iteration: int
    num_tokens: int  # T of the chunk
    token_X: torch.Tensor  # home token of each sent row (rows sorted by destination rank, then token)
    row_Y: torch.Tensor  # row of each kept copy
    slot_Y: torch.Tensor  # its slot in that row
    copy_Y: torch.Tensor  # its flat index t*K + k (for its gate)
    local_Y: torch.Tensor  # its expert's id on the destination rank
    slots: int  # S
    send_splits: list[int]  # rows to each rank of the group
    recv_splits: list[int]  # rows from each rank


def rows_of(perm: Permutation, experts_TK: torch.Tensor, num_local: int) -> tuple[torch.Tensor, ...]:
    """The distinct (destination rank, token) pairs of `perm`'s kept copies. Returns (rank_X, token_X,
    row_Y, slot_Y, copy_Y, local_Y), copies listed by row and, inside a row, by expert."""
    T = max(perm.num_tokens, 1)
    expert_Y = experts_TK.flatten()[perm.copy_X]  # sorted by expert, so by destination rank
    key_Y = torch.div(expert_Y, num_local, rounding_mode="floor") * T + perm.token_X
    order_Y = torch.argsort(key_Y, stable=True)  # stable: expert order inside a row
    keys_X, row_Y, per_row_X = torch.unique_consecutive(key_Y[order_Y], return_inverse=True, return_counts=True)
    slot_Y = torch.arange(row_Y.numel(), device=row_Y.device) - (torch.cumsum(per_row_X, 0) - per_row_X)[row_Y]
    rank_X = torch.div(keys_X, T, rounding_mode="floor")
    return rank_X, keys_X - rank_X * T, row_Y, slot_Y, perm.copy_X[order_Y], expert_Y[order_Y] % num_local


def fan_out(slots_RS2: torch.Tensor, num_local: int) -> tuple[Permutation, torch.Tensor]:
    """The copies of received rows, sorted by local expert, as a `Permutation` over the R rows (slot s of
    row r is copy r*S + s); and the rows' gates [R, S] (0 in empty slots)."""
    R, S = slots_RS2.shape[0], slots_RS2.shape[1] // 2
    gates_RS, ids_RS = slots_RS2[:, :S], slots_RS2[:, S:].detach().long()
    filled_Y = (ids_RS.flatten() >= 0).nonzero().squeeze(1)
    local_Y = ids_RS.flatten()[filled_Y]
    copy_Y = filled_Y[torch.argsort(local_Y, stable=True)]
    counts_E = torch.bincount(local_Y, minlength=num_local)
    return Permutation(copy_Y, torch.div(copy_Y, S, rounding_mode="floor"), counts_E, R), gates_RS


class DedupAllToAllDispatcher(AllToAllDispatcher):
    """`AllToAllDispatcher` that sends each token at most once to each rank (module docstring)."""

    # ------------------------------------------------------------------ steps of one chunk

    def _send(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, state: DedupState,
              wire_dtype: torch.dtype) -> Pending:
        X, S = state.token_X.numel(), state.slots
        dtype = torch.promote_types(weights_TK.dtype, torch.float32)  # float32 at least: ids exact below 2^24
        gates_XS = weights_TK.new_zeros(X, S, dtype=dtype).index_put((state.row_Y, state.slot_Y),
                                                                      weights_TK.flatten()[state.copy_Y].to(dtype))
        ids_XS = torch.full((X, S), -1, dtype=dtype, device=weights_TK.device)
        ids_XS[state.row_Y, state.slot_Y] = state.local_Y.to(dtype)
        slots_XS2 = torch.cat([gates_XS, ids_XS], 1)
        return self._start((x_TD.to(wire_dtype)[state.token_X], slots_XS2), state, "dispatch", fp8=self.fp8)

    def _expert_rows(self, pending: Pending, state: DedupState, experts: Experts) -> torch.Tensor:
        """Wait for rows and slots, fan the rows out to the local experts, and sum each row's expert outputs
        weighted by its gates; returns one row per received row, in the wire dtype."""
        x_RD, slots_RS2 = _wait(pending)
        perm, gates_RS = fan_out(slots_RS2, self.num_local)
        y_YD = experts(x_RD[perm.token_X], perm.counts_N)
        return unpermute(y_YD, perm, gates_RS).to(x_RD.dtype)

    def _receive_back(self, pending: Pending, state: DedupState, weights_TK: torch.Tensor) -> torch.Tensor:
        (y_XD,) = _wait(pending)
        out_TD = weights_TK.new_zeros(weights_TK.shape[0], y_XD.shape[-1])
        return out_TD.index_add(0, state.token_X, y_XD.to(out_TD.dtype))

    # ------------------------------------------------------------------ routing metadata

    def _plan(self, experts_TK: torch.Tensor, iteration: int) -> list[DedupState]:
        """Rows of every chunk, and one count exchange for all chunks: per destination, the copies for each
        local expert and the row count (one device-to-host copy brings the splits and checks to the host)."""
        P, E, C = self.ep_size, self.num_local, self.chunks
        sizes = chunk_sizes(experts_TK.shape[0], C)
        perms = split_permutation(self._permutation(experts_TK, iteration), experts_TK, sizes)
        starts = [sum(sizes[:c]) for c in range(C)]
        rows = [rows_of(perm, experts_TK[start:start + size], E)
                for perm, start, size in zip(perms, starts, sizes, strict=True)]
        rows_CP = torch.stack([torch.bincount(rank_X, minlength=P) for rank_X, *_ in rows])
        counts_CPE = torch.stack([perm.counts_N for perm in perms]).view(C, P, E)
        recv_CPE1 = self._exchange_counts(counts_CPE, rows_CP)
        send_splits, recv_splits, recv_copies = torch.stack(
            [rows_CP, recv_CPE1[..., E], recv_CPE1[..., :E].sum(2)]).tolist()
        S = min(experts_TK.shape[1], E)
        states = []
        for c, (_, token_X, row_Y, slot_Y, copy_Y, local_Y) in enumerate(rows):
            self._check_rows(recv_splits[c], recv_copies[c], S, iteration, c)
            states.append(DedupState(iteration, sizes[c], token_X, row_Y, slot_Y, copy_Y, local_Y, S, send_splits[c],
                                     recv_splits[c]))
        return states

    def _check_rows(self, rows: list[int], copies: list[int], slots: int, iteration: int, chunk: int) -> None:
        """Each announced row carries 1..S copies: other counts would size the fan-out wrongly."""
        for src, (n_rows, n_copies) in enumerate(zip(rows, copies, strict=True)):
            if not 0 <= n_rows <= n_copies <= n_rows * slots:
                of_chunk = f" chunk {chunk}" if self.chunks > 1 else ""
                raise RoutingMetadataError(
                    f"routing metadata mismatch in layer {self.stats.layer} iteration {iteration}{of_chunk} on "
                    f"expert-parallel rank {self.ep_rank}: rank {src} of the group announced {n_rows} rows "
                    f"holding {n_copies} token copies (each row holds 1 to {slots}); refusing the all-to-all")
