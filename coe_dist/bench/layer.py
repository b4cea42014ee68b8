"""One CoE layer taken apart into timed phases, forward and backward, built from the project's public pieces.

Forward, every iteration t of every layer (COE_SPEC "Distributed protocol"), each phase timed on its own:

    route     router logits/softmax/top-k (learned-random) or the gates of a fixed table (forced, skewed)
    permute   `permute()`: sort token copies by destination expert, cast to the wire dtype
    counts    count exchange ([P, E+1] all-to-all: per-expert counts and the sender's total, as the dispatcher
              sends them) and the one `.tolist()` of the split sizes, with the dispatcher's consistency check
    dispatch  data all-to-all (uneven splits)
    regroup   received rows (source rank, expert) -> (expert, source rank) order
    experts   `GroupedExperts` on the local experts
    ungroup   undo the regrouping
    combine   data all-to-all back
    shared    shared experts (only when S > 0)
    unpermute `unpermute()`: weight by g, sum per token, add the inner residual

`dispatch: dedup` (`DedupAllToAllDispatcher`) fills the same phases with its own steps:

    permute   `rows_of()`: the distinct (destination rank, token) pairs; the rows and their (gate, local
              expert) slots as the dispatcher's `_send` builds them (the gates carry gradients)
    counts    the same exchange, the last column the row count; the dispatcher's `_check_rows`
    dispatch  rows and slots in one all-to-all (one uint8 row each, as the dispatcher packs them)
    regroup   `fan_out()`: each received row to its slots' experts (copies sorted by local expert)
    ungroup   the gate-weighted sum per received row (`unpermute()` over the fan-out), in the wire dtype
    combine   one pre-summed row per (token, rank) back
    unpermute sum the rows of each token, add the inner residual

Both modes move their rows with the dispatcher's own exchange (`_InFlight`, waited for at once): the bytes
recorded per call are that exchange's rows to other ranks times its wire row size, so `dispatch_dtype: fp8`
(e4m3 rows and a float32 scale each, forward dispatch only) and dedup's slots are counted as sent. What the
bench leaves out of the dispatcher: capacity drops, token chunks and overlap (one chunk, waited at once).

Backward: the graph is cut at every phase boundary (each phase runs on detached copies of its inputs that
require grad), and the step's backward runs phase by phase in reverse with `torch.autograd.grad` on the
saved outputs, handing each phase the gradients of its outputs and collecting those of its inputs (a
tensor used by several phases, like h_{t-1}, sums the gradients from all of them). This times exactly
the work autograd runs for that phase, with the same kernels (the all-to-all backward is the all-to-all
with swapped splits, in the rows' dtype even for fp8: the quantization is straight-through) and no hooks
in the model code. Parameter gradients are computed (they are part of each phase's backward cost) and
dropped.

A barrier (see `timing.barrier`) precedes every communication phase, forward and backward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from coe_dist.bench.grid import (
    DTYPES,
    BenchCase,
    forced_balanced_table,
    stable_seed,
    zipf_table,
)
from coe_dist.bench.model import count_exchange_bytes
from coe_dist.bench.timing import PhaseTimer, barrier
from coe_dist.model.experts import GroupedExperts, SwiGLU
from coe_dist.model.router import Router
from coe_dist.parallel.dedup import DedupAllToAllDispatcher, DedupState, fan_out, rows_of
from coe_dist.parallel.dispatch import (
    AllToAllDispatcher,
    _InFlight,
    _StartAllToAll,
    _WaitAllToAll,
    permutation,
    permute,
    unpermute,
)

COMM_PHASES = ("counts", "dispatch", "combine")
PHASES = ("route", "permute", "counts", "dispatch", "regroup", "experts", "ungroup", "combine", "shared",
          "unpermute")


class _BenchWire:
    """What the bench takes from a real dispatcher: its count exchange and checks, dedup's row building
    (`_send`, with the all-to-all start held back: the bench times building the rows and moving them as
    separate phases), and the owner of `_InFlight` exchanges. No `CommStats` timing: the bench times the
    phases itself, and `stats.timed` would add a CUDA synchronisation per call."""

    def _timed(self, *args, **kwargs):
        return nullcontext()

    def _start(self, xs: tuple[torch.Tensor, ...], state, direction: str, *, fp8: bool = False):
        return xs  # `_send` hands back the rows it built; `exchange` sends them


class _CopiesWire(_BenchWire, AllToAllDispatcher):
    pass


class _DedupWire(_BenchWire, DedupAllToAllDispatcher):
    pass


def exchange(owner: AllToAllDispatcher, iteration: int, direction: str, xs: tuple[torch.Tensor, ...],
             recv_splits: list[int], send_splits: list[int], fp8: bool = False
             ) -> tuple[tuple[torch.Tensor, ...], _InFlight]:
    """One data all-to-all of the row-aligned xs through the dispatcher's `_InFlight` (several tensors or fp8
    rows travel packed as one uint8 row), waited for at once. Returns (received tensors, the exchange)."""
    flight = _InFlight(owner, iteration, direction, recv_splits, send_splits, fp8=fp8)
    return _WaitAllToAll.apply(flight, *_StartAllToAll.apply(flight, *xs)), flight


def wire_bytes(flight: _InFlight, phase: str) -> tuple[int, int]:
    """(sent, received) bytes to and from other ranks of the exchange's last call in `phase` (fwd | bwd):
    rows times the row size on the wire, as `AllToAllDispatcher._timed` counts them."""
    out_splits, in_splits = flight.splits[phase]
    me = flight.owner.ep_rank
    return ((sum(in_splits) - in_splits[me]) * flight.row_bytes, (sum(out_splits) - out_splits[me]) * flight.row_bytes)


class _Tape:
    """Phase boundaries: `leaf(t)` hands a phase a detached copy of t that requires grad and remembers
    where its gradient goes; `record()` stores the phase for the backward pass."""

    def __init__(self) -> None:
        self.entries: list[tuple] = []  # (layer, iteration, name, leaves, sources, outputs, params, meta)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def leaf(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        x = t.detach().requires_grad_(True)
        self._pending.append((x, t))
        return x

    def record(self, layer: int, iteration: int, name: str, outputs: list[torch.Tensor], params=(),
               meta: dict | None = None) -> None:
        leaves = [x for x, _ in self._pending]
        sources = [s for _, s in self._pending]
        self._pending = []
        outs = [o for o in outputs if o.requires_grad]
        self.entries.append((layer, iteration, name, leaves, sources, outs,
                             [p for p in params if p.requires_grad], meta or {}))


class BenchLayer:
    """The weights and fixed routing tables of one CoE layer for one case, on this rank."""

    def __init__(self, case: BenchCase, layer: int, ep_rank: int, device: torch.device, seed: int,
                 data_rank: int) -> None:
        self.case, self.layer, self.device = case, layer, device
        self.ep_rank = ep_rank
        d, f, N, E = case.hidden, case.expert_hidden, case.num_experts, case.local_experts
        gen = torch.Generator().manual_seed(stable_seed(seed, "weights", layer))
        compute = DTYPES[case.dtype]
        self.routers = [Router(d, N, case.top_k) for _ in range(case.iterations)]
        for r in self.routers:
            with torch.no_grad():
                r.weight.copy_(torch.randn(r.weight.shape, generator=gen) * d ** -0.5)
            r.to(device)
        # Expert weights are stored in the compute dtype (no per-call cast: the bench times the GEMMs, as
        # the trainer does under `reuse_weight_casts()`), initialised like the model (std 0.02).
        self.experts = GroupedExperts(E, d, f)
        with torch.no_grad():
            self.experts.w_gate_up_E2FD.copy_(torch.randn(self.experts.w_gate_up_E2FD.shape, generator=gen) * 0.02)
            self.experts.w_down_EDF.copy_(torch.randn(self.experts.w_down_EDF.shape, generator=gen) * 0.02)
        self.experts.to(device=device, dtype=compute)
        self.shared = None
        if case.num_shared_experts:
            self.shared = SwiGLU(d, case.num_shared_experts * f)
            with torch.no_grad():
                for lin in self.shared.children():
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.02)
            self.shared.to(device=device, dtype=compute)
        # Fixed routing tables (built outside the timed region; different per rank, layer and iteration).
        self.tables: list[torch.Tensor | None] = []
        tgen = torch.Generator().manual_seed(stable_seed(seed, "tables", layer, data_rank))
        for _ in range(case.iterations):
            if case.routing == "forced-balanced":
                t = forced_balanced_table(case.tokens, case.top_k, N, tgen)
            elif case.routing == "skewed":
                t = zipf_table(case.tokens, case.top_k, N, case.zipf, tgen)
            else:
                t = None
            self.tables.append(None if t is None else t.to(device))
        self.wire: AllToAllDispatcher | None = None  # made by the first forward (it needs the group)

    def forward(self, h_TD: torch.Tensor, tape: _Tape, timer: PhaseTimer, group) -> torch.Tensor:
        if self.wire is None:
            kind = _DedupWire if self.case.dispatch == "dedup" else _CopiesWire
            self.wire = kind(self.case.num_experts, group, layer=self.layer)
        routed = self._dedup if self.case.dispatch == "dedup" else self._copies
        for t in range(self.case.iterations):
            weights_TK, experts_TK = self._route(t, h_TD, tape, timer)
            y_XD, merge = routed(t, h_TD, weights_TK, experts_TK, tape, timer, group)
            s_TD = self._shared(t, h_TD, tape, timer)
            h_TD = self._unpermute(t, h_TD, y_XD, merge, s_TD, tape, timer)
        return h_TD

    # ------------------------------------------------------------------ phases of both modes

    def _route(self, t: int, h_TD: torch.Tensor, tape: _Tape, timer: PhaseTimer
               ) -> tuple[torch.Tensor, torch.Tensor]:
        with timer.phase(self.layer, t, "route", "fwd") as rec:
            h = tape.leaf(h_TD)
            router, table = self.routers[t], self.tables[t]
            if table is None:
                routing = router(h)
                weights_TK, experts_TK = routing.weights_TK, routing.experts_TK
            else:
                probs_TN = F.linear(h, router.weight).softmax(dim=-1)
                weights_TK, experts_TK = probs_TN.gather(1, table), table
            rec.rows = self.case.tokens
        tape.record(self.layer, t, "route", [weights_TK], [router.weight])
        return weights_TK, experts_TK

    def _exchange(self, t: int, name: str, xs: tuple[torch.Tensor, ...], recv_splits: list[int],
                  send_splits: list[int], tape: _Tape, timer: PhaseTimer, group, fp8: bool = False
                  ) -> tuple[torch.Tensor, ...]:
        """A data all-to-all phase (dispatch | combine): receive recv_splits rows from each rank, send
        send_splits; the backward's bytes are read from the exchange when it has run (`backward`)."""
        barrier(group, self.device)
        with timer.phase(self.layer, t, name, "fwd") as rec:
            outs, flight = exchange(self.wire, t, name, tuple(tape.leaf(x) for x in xs), recv_splits, send_splits,
                                    fp8)
            rec.bytes_sent, rec.bytes_received = wire_bytes(flight, "fwd")
            rec.rows = outs[0].shape[0]
        tape.record(self.layer, t, name, list(outs), meta={"flight": flight, "rows": rec.rows})
        return outs

    def _experts(self, t: int, x_in: torch.Tensor, counts_E: torch.Tensor, tape: _Tape, timer: PhaseTimer
                 ) -> torch.Tensor:
        with timer.phase(self.layer, t, "experts", "fwd") as rec:
            x = tape.leaf(x_in)
            y = self.experts(x, counts_E)
            rec.rows = x.shape[0]
        tape.record(self.layer, t, "experts", [y], list(self.experts.parameters()), meta={"rows": x.shape[0]})
        return y

    def _shared(self, t: int, h_TD: torch.Tensor, tape: _Tape, timer: PhaseTimer) -> torch.Tensor | None:
        if self.shared is None:
            return None
        with timer.phase(self.layer, t, "shared", "fwd") as rec:
            h = tape.leaf(h_TD)
            s_TD = self.shared(h.to(DTYPES[self.case.dtype])).float()
            rec.rows = self.case.tokens
        tape.record(self.layer, t, "shared", [s_TD], list(self.shared.parameters()))
        return s_TD

    def _unpermute(self, t: int, h_TD: torch.Tensor, y_XD: torch.Tensor,
                   merge: Callable[[torch.Tensor], torch.Tensor], s_TD: torch.Tensor | None, tape: _Tape,
                   timer: PhaseTimer) -> torch.Tensor:
        """The routed rows summed per token by the mode's `merge`, + the inner residual (+ shared experts)."""
        with timer.phase(self.layer, t, "unpermute", "fwd") as rec:
            y, h = tape.leaf(y_XD), tape.leaf(h_TD)
            out = merge(y) + h
            if s_TD is not None:
                out = out + tape.leaf(s_TD)
            out = out.to(h_TD.dtype)
            rec.rows = y.shape[0]
        tape.record(self.layer, t, "unpermute", [out])
        return out

    # ------------------------------------------------------------------ dispatch: copies

    def _copies(self, t: int, h_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
                tape: _Tape, timer: PhaseTimer, group) -> tuple[torch.Tensor, Callable]:
        """One row per token copy each way (`AllToAllDispatcher`). Returns (combined rows, their merge)."""
        case, L, wire = self.case, self.layer, self.wire
        P, E, N = case.ep_size, case.local_experts, case.num_experts
        with timer.phase(L, t, "permute", "fwd") as rec:
            h = tape.leaf(h_TD)
            x_XD, perm, _ = permute(h, experts_TK, N)
            x_XD = x_XD.to(DTYPES[case.dtype])
            counts_PE = perm.counts_N.view(P, E)
            rec.rows = x_XD.shape[0]
        tape.record(L, t, "permute", [x_XD])
        barrier(group, self.device)
        with timer.phase(L, t, "counts", "fwd") as rec:
            # As AllToAllDispatcher._plan: each rank gets its E counts and their total; one host sync brings
            # the split sizes and what the dispatcher checks them against to the host.
            recv_PE1 = wire._exchange_counts(counts_PE[None], counts_PE.sum(1)[None])[0]
            recv_counts_PE = recv_PE1[:, :E]
            send_splits, recv_splits, announced, smallest = torch.stack(
                [counts_PE.sum(1), recv_counts_PE.sum(1), recv_PE1[:, E], recv_counts_PE.min(1).values]).tolist()
            wire._check_metadata(send_splits, recv_splits, announced, smallest, x_XD.shape[0], recv_counts_PE, t, 0)
            rec.bytes_sent = rec.bytes_received = count_exchange_bytes(P, E)
        tape.record(L, t, "counts", [])
        (x_RD,) = self._exchange(t, "dispatch", (x_XD,), recv_splits, send_splits, tape, timer, group,
                                 fp8=case.dispatch_dtype == "fp8")
        with timer.phase(L, t, "regroup", "fwd") as rec:
            x = tape.leaf(x_RD)
            expert_R = torch.repeat_interleave(torch.arange(E, device=x.device).repeat(P),
                                               recv_counts_PE.flatten(), output_size=x.shape[0])
            regroup_R = torch.argsort(expert_R, stable=True)
            x_in = x[regroup_R]
            rec.rows = x.shape[0]
        tape.record(L, t, "regroup", [x_in])
        y = self._experts(t, x_in, recv_counts_PE.sum(0), tape, timer)
        with timer.phase(L, t, "ungroup", "fwd") as rec:
            y = tape.leaf(y)
            y_back = torch.empty_like(y).index_copy(0, regroup_R, y)
            rec.rows = y.shape[0]
        tape.record(L, t, "ungroup", [y_back])
        (y_XD,) = self._exchange(t, "combine", (y_back,), send_splits, recv_splits, tape, timer, group)
        # Weight by g and sum per token at home (the leaf is made inside the unpermute phase that calls this).
        return y_XD, lambda y: unpermute(y, perm, tape.leaf(weights_TK))

    # ------------------------------------------------------------------ dispatch: dedup

    def _dedup(self, t: int, h_TD: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor,
               tape: _Tape, timer: PhaseTimer, group) -> tuple[torch.Tensor, Callable]:
        """One row per (token, destination rank) each way (`DedupAllToAllDispatcher`); the gates travel in
        the rows' slots and are applied on the expert rank. Returns (combined rows, their merge)."""
        case, L, wire = self.case, self.layer, self.wire
        P, E, T = case.ep_size, case.local_experts, case.tokens
        with timer.phase(L, t, "permute", "fwd") as rec:
            h, w = tape.leaf(h_TD), tape.leaf(weights_TK)
            perm, _ = permutation(experts_TK, case.num_experts)
            rank_X, token_X, row_Y, slot_Y, copy_Y, local_Y = rows_of(perm, experts_TK, E)
            state = DedupState(t, T, token_X, row_Y, slot_Y, copy_Y, local_Y, case.slots, [], [])
            x_XD, slots_XS2 = wire._send(h, w, state, DTYPES[case.dtype])
            rows_P, counts_PE = torch.bincount(rank_X, minlength=P), perm.counts_N.view(P, E)
            rec.rows = x_XD.shape[0]
        tape.record(L, t, "permute", [x_XD, slots_XS2])
        barrier(group, self.device)
        with timer.phase(L, t, "counts", "fwd") as rec:
            # As DedupAllToAllDispatcher._plan: per-expert copies and the row count per destination.
            recv_PE1 = wire._exchange_counts(counts_PE[None], rows_P[None])[0]
            send_splits, recv_splits, recv_copies = torch.stack(
                [rows_P, recv_PE1[:, E], recv_PE1[:, :E].sum(1)]).tolist()
            wire._check_rows(recv_splits, recv_copies, case.slots, t, 0)
            rec.bytes_sent = rec.bytes_received = count_exchange_bytes(P, E)
        tape.record(L, t, "counts", [])
        x_RD, slots_RS2 = self._exchange(t, "dispatch", (x_XD, slots_XS2), recv_splits, send_splits, tape, timer,
                                         group, fp8=case.dispatch_dtype == "fp8")
        with timer.phase(L, t, "regroup", "fwd") as rec:  # the fan-out
            x = tape.leaf(x_RD)
            fan, gates_RS = fan_out(tape.leaf(slots_RS2), E)
            x_in = x[fan.token_X]
            rec.rows = x.shape[0]
        tape.record(L, t, "regroup", [x_in, gates_RS])
        y = self._experts(t, x_in, fan.counts_N, tape, timer)
        with timer.phase(L, t, "ungroup", "fwd") as rec:  # the gate-weighted sum per received row
            y = tape.leaf(y)
            y_RD = unpermute(y, fan, tape.leaf(gates_RS)).to(x_RD.dtype)
            rec.rows = y.shape[0]
        tape.record(L, t, "ungroup", [y_RD])
        (y_XD,) = self._exchange(t, "combine", (y_RD,), send_splits, recv_splits, tape, timer, group)
        # The rows come back pre-summed and gate-weighted: add up each token's rows (`_receive_back`).
        return y_XD, lambda y: y.new_zeros(T, y.shape[1], dtype=torch.float32).index_add(0, token_X, y.float())


def backward(tape: _Tape, final: torch.Tensor, grad: torch.Tensor, timer: PhaseTimer, group,
             device: torch.device) -> dict[int, torch.Tensor]:
    """Run the recorded phases' backward in reverse order, each timed on its own. Returns the gradients left
    over, those of the step's inputs (no phase produced them), by id() of the input."""
    grads: dict[int, torch.Tensor] = {id(final): grad}
    keep = [final]  # keep tensors alive so that their ids stay unique
    for layer, iteration, name, leaves, sources, outs, params, meta in reversed(tape.entries):
        pairs = [(o, grads.pop(id(o), None)) for o in outs]
        pairs = [(o, g) for o, g in pairs if g is not None]
        if not pairs:
            continue
        inputs = [x for x in leaves] + params
        if name in ("dispatch", "combine"):
            barrier(group, device)
        with timer.phase(layer, iteration, name, "bwd") as rec:
            got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
            if "flight" in meta:  # the gradient exchange has run: its rows and row size are known
                rec.bytes_sent, rec.bytes_received = wire_bytes(meta["flight"], "bwd")
            rec.rows = meta.get("rows", 0)
        for src, g in zip(sources, got[:len(leaves)], strict=True):
            if g is None:
                continue
            key = id(src)
            keep.append(src)
            grads[key] = g if key not in grads else grads[key] + g
    return grads
