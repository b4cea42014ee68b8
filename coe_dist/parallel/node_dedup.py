"""One row per (token, destination node) over the network, then one per rank inside it (`moe.dispatch:
node_dedup`), as DeepEP's normal kernels send a token once per node over RDMA and forward it over NVLink.

An expert-parallel group of P consecutive ranks spans M nodes of G ranks: rank (m, g) = m*G + g holds the E
experts [(m*G + g)*E, ...), so node m holds the G*E experts [m*G*E, (m+1)*G*E). Rank (m', g) is the relay
of node m' for every rank (m, g): the ranks with the same local rank g, one per node, form the inter group.

    home rank (m, g)     kept copies -> rows: the distinct (node, token) pairs, each with its slots (the copy's
                         expert numbered inside its node, gate) -> all-to-all over the inter group
    relay (m', g)        received rows -> `_IntraNode`: the distinct (rank in the node, row) pairs, slots
                         (local expert, gate) -> all-to-all inside the node -> experts -> gate-weighted sum per
                         row -> all-to-all back inside the node -> sum per received row
                         -> all-to-all back over the inter group: one row per (token, node)
    home rank            sum the rows of each token

Hop 1 is `DedupAllToAllDispatcher` over the inter group, a node's G*E experts standing for one rank's; hop 2
is another over the node's ranks, run by hop 1 in place of the experts, its tokens the received rows and its
copies their filled slots. The layer's stats record hop 1 as dispatch/combine (the bytes that cross nodes;
a rank's own node is not on the network) and hop 2 as intra_dispatch/intra_combine. Capacity is applied on
the home rank, as in the other modes; `a2a_chunks` and overlap pipeline hop 1, hop 2 runs inside it.

Shape legend: R = rows a relay received, S = their slots, D = hidden.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from coe_dist.parallel.comm_stats import CommStats
from coe_dist.parallel.dedup import DedupAllToAllDispatcher, DedupState, fan_out
from coe_dist.parallel.dispatch import Experts, Pending, Permutation, _wait


class _IntraNode(DedupAllToAllDispatcher):
    """Hop 2 on a relay: the received rows are its tokens and their filled slots its copies, already sorted by
    expert (`preset`); no capacity (drops happened at home). Records into the layer's stats as intra_*."""

    def __init__(self, node_experts: int, group, stats: CommStats) -> None:
        super().__init__(node_experts, group, None, layer=stats.layer, chunks=1, overlap=False)
        self.stats = stats
        self.preset: Permutation | None = None

    def _permutation(self, experts_TK: torch.Tensor, iteration: int) -> Permutation:
        return self.preset

    def _timed(self, iteration: int, direction: str, *args):
        return super()._timed(iteration, f"intra_{direction}", *args)


class NodeDedupAllToAllDispatcher(DedupAllToAllDispatcher):
    """`DedupAllToAllDispatcher` over nodes, forwarding inside each node (module docstring)."""

    def __init__(self, num_experts: int, ep_group, inter_group, intra_group, capacity_factor: float | None = None,
                 *, layer: int = 0, chunks: int = 1, overlap: bool = True, fp8: bool = False) -> None:
        super().__init__(num_experts, inter_group, capacity_factor, layer=layer, chunks=chunks, overlap=overlap,
                         fp8=fp8)
        self.ep_group = ep_group
        self.expert_rank = dist.get_rank(ep_group)
        self.intra = _IntraNode(self.num_local, intra_group, self.stats)

    def _expert_rows(self, pending: Pending, state: DedupState, experts: Experts) -> torch.Tensor:
        """Wait for the rows from the other nodes' ranks, forward them to this node's ranks (hop 2) and return
        one gate-weighted sum per received row, in the wire dtype."""
        x_RD, slots_RS2 = _wait(pending)
        perm, gates_RS = fan_out(slots_RS2, self.num_local)
        ids_RS = slots_RS2[:, gates_RS.shape[1]:].detach().long()
        self.intra.preset = perm
        y_RD = self.intra.run(x_RD, gates_RS, ids_RS, state.iteration, x_RD.dtype, experts)
        return y_RD.to(x_RD.dtype)
