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

Backward: the graph is cut at every phase boundary (each phase runs on detached copies of its inputs that
require grad), and the step's backward runs phase by phase in reverse with `torch.autograd.grad` on the
saved outputs, handing each phase the gradients of its outputs and collecting those of its inputs (a
tensor used by several phases, like h_{t-1}, sums the gradients from all of them). This times exactly
the work autograd runs for that phase, with the same kernels (the all-to-all backward is the all-to-all
with swapped splits) and no hooks in the model code. Parameter gradients are computed (they are part of
each phase's backward cost) and dropped.

A barrier (see `timing.barrier`) precedes every communication phase, forward and backward.
"""

from __future__ import annotations

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
from coe_dist.parallel.dispatch import _all_to_all, permute, unpermute

COMM_PHASES = ("counts", "dispatch", "combine")
PHASES = ("route", "permute", "counts", "dispatch", "regroup", "experts", "ungroup", "combine", "shared",
          "unpermute")


class _A2A(torch.autograd.Function):
    """Uneven all-to-all whose backward is the all-to-all with swapped splits (as the dispatcher's)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


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

    def forward(self, h_TD: torch.Tensor, tape: _Tape, timer: PhaseTimer, group) -> torch.Tensor:
        case, L = self.case, self.layer
        P, E, N = case.ep_size, case.local_experts, case.num_experts
        wire = DTYPES[case.dtype]
        row_bytes = case.hidden * case.wire_bytes
        me = self.ep_rank
        for t in range(case.iterations):
            # ---- route
            with timer.phase(L, t, "route", "fwd") as rec:
                h = tape.leaf(h_TD)
                router = self.routers[t]
                table = self.tables[t]
                if table is None:
                    routing = router(h)
                    weights_TK, experts_TK = routing.weights_TK, routing.experts_TK
                else:
                    probs_TN = F.linear(h, router.weight).softmax(dim=-1)
                    weights_TK, experts_TK = probs_TN.gather(1, table), table
                rec.rows = case.tokens
            tape.record(L, t, "route", [weights_TK], [router.weight])
            # ---- permute
            with timer.phase(L, t, "permute", "fwd") as rec:
                h = tape.leaf(h_TD)
                x_XD, perm, _ = permute(h, experts_TK, N)
                x_XD = x_XD.to(wire)
                counts_PE = perm.counts_N.view(P, E)
                rec.rows = x_XD.shape[0]
            tape.record(L, t, "permute", [x_XD])
            # ---- counts exchange (+ the host sync for the split sizes)
            barrier(group, self.device)
            with timer.phase(L, t, "counts", "fwd") as rec:
                # As AllToAllDispatcher.run: each rank gets its E counts and their total; one host sync
                # brings the split sizes and what the dispatcher checks them against to the host.
                wire_PE1 = torch.cat([counts_PE, counts_PE.sum(1, keepdim=True)], 1)
                recv_PE1 = _all_to_all(wire_PE1, [1] * P, [1] * P, group)
                recv_counts_PE = recv_PE1[:, :E]
                send_splits, recv_splits, announced, smallest = torch.stack(
                    [counts_PE.sum(1), recv_counts_PE.sum(1), recv_PE1[:, E], recv_counts_PE.min(1).values]).tolist()
                if sum(send_splits) != x_XD.shape[0] or recv_splits != announced or min(smallest) < 0:
                    raise RuntimeError(f"bench: inconsistent expert counts on ep rank {me}: {recv_splits} vs "
                                       f"{announced}")
                rec.bytes_sent = rec.bytes_received = count_exchange_bytes(P, E)
            tape.record(L, t, "counts", [])
            sent = (sum(send_splits) - send_splits[me]) * row_bytes
            received = (sum(recv_splits) - recv_splits[me]) * row_bytes
            # ---- dispatch
            barrier(group, self.device)
            with timer.phase(L, t, "dispatch", "fwd") as rec:
                x = tape.leaf(x_XD)
                x_RD = _A2A.apply(x, recv_splits, send_splits, group)
                rec.bytes_sent, rec.bytes_received, rec.rows = sent, received, x_RD.shape[0]
            tape.record(L, t, "dispatch", [x_RD], meta={"bytes": (received, sent), "rows": x_RD.shape[0]})
            # ---- regroup
            with timer.phase(L, t, "regroup", "fwd") as rec:
                x = tape.leaf(x_RD)
                expert_R = torch.repeat_interleave(torch.arange(E, device=x.device).repeat(P),
                                                   recv_counts_PE.flatten(), output_size=x.shape[0])
                regroup_R = torch.argsort(expert_R, stable=True)
                x_in = x[regroup_R]
                counts_E = recv_counts_PE.sum(0)
                rec.rows = x.shape[0]
            tape.record(L, t, "regroup", [x_in])
            # ---- experts
            with timer.phase(L, t, "experts", "fwd") as rec:
                x = tape.leaf(x_in)
                y = self.experts(x, counts_E)
                rec.rows = x.shape[0]
            tape.record(L, t, "experts", [y], list(self.experts.parameters()), meta={"rows": x.shape[0]})
            # ---- ungroup
            with timer.phase(L, t, "ungroup", "fwd") as rec:
                y = tape.leaf(y)
                y_back = torch.empty_like(y).index_copy(0, regroup_R, y)
                rec.rows = y.shape[0]
            tape.record(L, t, "ungroup", [y_back])
            # ---- combine
            barrier(group, self.device)
            with timer.phase(L, t, "combine", "fwd") as rec:
                y = tape.leaf(y_back)
                y_XD = _A2A.apply(y, send_splits, recv_splits, group)
                rec.bytes_sent, rec.bytes_received, rec.rows = received, sent, y_XD.shape[0]
            tape.record(L, t, "combine", [y_XD], meta={"bytes": (sent, received), "rows": y_XD.shape[0]})
            # ---- shared experts
            s_TD = None
            if self.shared is not None:
                with timer.phase(L, t, "shared", "fwd") as rec:
                    h = tape.leaf(h_TD)
                    s_TD = self.shared(h.to(wire)).float()
                    rec.rows = case.tokens
                tape.record(L, t, "shared", [s_TD], list(self.shared.parameters()))
            # ---- unpermute + residual
            with timer.phase(L, t, "unpermute", "fwd") as rec:
                y, w, h = tape.leaf(y_XD), tape.leaf(weights_TK), tape.leaf(h_TD)
                out = unpermute(y, perm, w) + h
                if s_TD is not None:
                    out = out + tape.leaf(s_TD)
                out = out.to(h_TD.dtype)
                rec.rows = y.shape[0]
            tape.record(L, t, "unpermute", [out])
            h_TD = out
        return h_TD


def backward(tape: _Tape, final: torch.Tensor, grad: torch.Tensor, timer: PhaseTimer, group,
             device: torch.device) -> None:
    """Run the recorded phases' backward in reverse order, each timed on its own."""
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
            if "bytes" in meta:
                rec.bytes_sent, rec.bytes_received = meta["bytes"]
            rec.rows = meta.get("rows", 0)
        for src, g in zip(sources, got[:len(leaves)], strict=True):
            if g is None:
                continue
            key = id(src)
            keep.append(src)
            grads[key] = g if key not in grads else grads[key] + g
