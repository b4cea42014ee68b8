"""Cost model of one expert-parallel CoE layer: predict each phase's time from a cluster profile, and fit
the profile's numbers from measurements.

All-to-all (one call, one rank's view; B = bytes the rank sends to other ranks, P = group size, g = ranks
per node):

    P <= g (one node):   t = a_intra(P-1) + B / bw_intra
    P >  g (hierarchical, two stages, as DeepEP's normal kernels: RDMA between nodes, then NVLink forwarding):
        t = a_inter(n-1) + B_inter / bw_inter  +  a_intra(g-1) + (B_intra + B_inter*(g-1)/g) / bw_intra
        with n = ceil(P/g) nodes, B_inter = B*(P-g)/(P-1) the bytes bound for other nodes,
        B_intra = B*(g-1)/(P-1) those for the other ranks of this node (uniform routing)
    a(k) = latency_s + k * latency_per_peer_s   (NCCL: fixed; gloo's pairwise exchange: per peer)

Data all-to-all bytes (`Workload.a2a_bytes`): rows x row bytes x (P-1)/P, per token:
    moe.dispatch copies: K rows each way (one per token copy)
    moe.dispatch dedup:  k rows each way, k = P * (1 - C(N - N/P, K) / C(N, K)) the expected distinct ranks
                         among a token's K experts under uniform routing (K=4 of N=64 on P=8: 3.38); each
                         dispatch row carries min(K, N/P) slots x 8 bytes (gate, local expert id)
    moe.dispatch node_dedup: two all-to-alls per call (coe_dist/parallel/node_dedup.py), n nodes of G ranks,
                         E = N/P experts a rank; with p(x) = 1 - C(N - x, K) / C(N, K) the chance that a given x
                         experts hold one of the token's K: hop 1 sends (n-1) * p(G*E) rows per token to other
                         nodes (slots min(K, G*E)), hop 2 forwards n * (G-1) * p(E) rows per token inside the node
                         (slots min(K, E)); t = a_inter(n-1) + B_1 / bw_inter + a_intra(G-1) + B_2 / bw_intra
    moe.dispatch_dtype fp8: forward dispatch rows of d + 4 bytes (e4m3 + a float32 scale); the rest unchanged
                         (node_dedup: on hop 1; a relay forwards the rows in the compute dtype)

Count exchange: one all-to-all of E + 1 int64 per peer (the per-expert counts and the sender's total), plus
the host sync (`host_sync_s`) that turns the split sizes into Python ints.

Expert compute: `fixed_s + FLOPs * per_unit_s` (per_unit_s = 1 / GEMM rate), FLOPs = 6*R*d*f forward,
12*R*d*f backward for R token copies on the rank. The other local phases are affine in their size
(`PHASE_UNITS`): measured profiles fit (fixed_s, per_unit_s) per phase and direction; GPU profiles derive
them from HBM bandwidth (bytes touched per unit / bandwidth) and an assumed per-phase launch overhead.

CPU profiles: P ranks on one node share its cores; every phase is multiplied by the oversubscription
max(1, ranks_per_node * threads_per_rank / cores_per_node) (1 on GPUs: each rank has its own device).

The model does not overlap communication with compute (what `moe.overlap: false` does, and how the bench
times the phases: one after another, one host sync per iteration), so all of it is exposed: comm share =
(counts + dispatch + combine, fwd + bwd) / step. `moe.overlap` hides part of it behind the shared expert and
`moe.a2a_chunks` behind other chunks' experts; `benchmarks/overlap.py` measures how much.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from coe_dist.errors import UserError

COMM_PHASES = ("counts", "dispatch", "combine")
LOCAL_PHASES = ("route", "permute", "regroup", "experts", "ungroup", "shared", "unpermute")
ALL_PHASES = ("route", "permute", "counts", "dispatch", "regroup", "experts", "ungroup", "combine", "shared",
              "unpermute")
# Phase keys with a backward (counts has none).
PHASE_KEYS = tuple(f"{p}_{d}" for p in ALL_PHASES for d in ("fwd", "bwd") if not (p == "counts" and d == "bwd"))

# What a local phase's cost is linear in (units per layer-iteration on one rank):
#   T*N*d router multiply-adds; T*K*d or R*d elements moved; FLOPs for the experts.
PHASE_UNITS = {
    "route": "T*N*d",
    "permute": "T*K*d",
    "regroup": "R*d",
    "experts": "expert FLOPs (6*R*d*f fwd, 12*R*d*f bwd)",
    "ungroup": "R*d",
    "shared": "shared-expert FLOPs (6*T*d*S*f fwd, 12*T*d*S*f bwd)",
    "unpermute": "T*K*d",
    "counts": "peers (software overhead of the call site beyond the link)",
    "dispatch": "peers (software overhead of the call site beyond the link)",
    "combine": "peers (software overhead of the call site beyond the link)",
}
PHASE_UNITS2 = {"route": "T*N", "experts": "local expert weight bytes", "shared": "shared expert weight bytes"}
# Bytes of HBM traffic per unit for GPU profiles (derived phases): reads + writes of the elements moved,
# float32 stream, bf16 wire (2 bytes), int64 indices amortised over d. Approximate by construction.
GPU_BYTES_PER_UNIT = {
    "permute_fwd": 6.0, "permute_bwd": 10.0,  # gather fp32 rows, write bf16 / index_add back in fp32
    "regroup_fwd": 4.0, "regroup_bwd": 4.0,
    "ungroup_fwd": 4.0, "ungroup_bwd": 4.0,
    "unpermute_fwd": 14.0, "unpermute_bwd": 18.0,  # bf16 in, fp32 weighted copy, index_add into fp32
}


COUNT_BYTES = 8  # per-expert counts are int64
# Count-exchange row per destination rank: its E per-expert counts and their total as the sender computed it
# (the dispatcher checks the received counts against it before the data all-to-all).
COUNT_COLUMNS_EXTRA = 1


FP8_SCALE_BYTES = 4  # one float32 scale per fp8 row
SLOT_BYTES = 8  # dedup: a float32 gate and a float32 local expert id per slot


def distinct_ranks_per_token(num_experts: int, top_k: int, ep_size: int) -> float:
    """Expected distinct ranks among a token's K experts (N experts, N/P per rank, K drawn uniformly without
    replacement): P * (1 - C(N - N/P, K) / C(N, K)); the token's own rank counts as one of them."""
    per_rank = math.ceil(num_experts / ep_size)
    return ep_size * (1 - math.comb(num_experts - per_rank, top_k) / math.comb(num_experts, top_k))


def count_exchange_bytes(ep_size: int, local_experts: int) -> int:
    """Bytes one rank sends in one count exchange: an (E + 1)-entry int64 row to each other rank."""
    return (ep_size - 1) * (local_experts + COUNT_COLUMNS_EXTRA) * COUNT_BYTES


# ---------------------------------------------------------------- profile

@dataclass
class Link:
    latency_s: float = 0.0
    latency_per_peer_s: float = 0.0
    bandwidth_Bps: float = 1e9
    source: str = ""

    def time(self, peers: int, bytes_sent: float) -> float:
        if peers <= 0:
            return 0.0
        return self.latency_s + peers * self.latency_per_peer_s + bytes_sent / self.bandwidth_Bps


@dataclass
class Affine:
    """t = fixed_s + units * per_unit_s + units2 * per_unit2_s. The second size (`PHASE_UNITS2`) is the local
    expert weight bytes for the GEMM phases (every call streams all local expert weights once) and T*N for
    the router (softmax and top-k per token and expert, next to its T*N*d GEMM)."""

    fixed_s: float = 0.0
    per_unit_s: float = 0.0
    source: str = ""
    per_unit2_s: float = 0.0

    def time(self, units: float, units2: float = 0.0) -> float:
        return self.fixed_s + units * self.per_unit_s + units2 * self.per_unit2_s


@dataclass
class Profile:
    """A cluster (or this machine) as the model sees it. Every number carries its source."""

    name: str
    kind: str = "gpu"  # gpu | cpu
    ranks_per_node: int = 8
    cores_per_node: int | None = None  # cpu: for the oversubscription factor
    threads_per_rank: int | None = None
    dtype: str = "bf16"
    links: dict[str, Link] = field(default_factory=dict)  # intra, inter
    gemm: dict[str, Affine] = field(default_factory=dict)  # per dtype: per_unit_s = s/FLOP
    memory_Bps: float | None = None  # effective HBM bandwidth (GPU profiles: derives the local phases)
    launch_overhead_s: float = 0.0  # GPU: per phase (derived phases)
    host_sync_s: float = 0.0
    phases: dict[str, Affine] = field(default_factory=dict)  # explicit per "phase_dir" (measured profiles)
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    # ---- I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Profile:
        raw = dict(raw)
        try:
            raw["links"] = {k: Link(**v) for k, v in (raw.get("links") or {}).items()}
            raw["gemm"] = {k: Affine(**v) for k, v in (raw.get("gemm") or {}).items()}
            raw["phases"] = {k: Affine(**v) for k, v in (raw.get("phases") or {}).items()}
            return cls(**raw)
        except TypeError as e:
            raise UserError(f"cluster profile {raw.get('name')!r} is malformed: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write the profile as YAML (plain floats: numpy scalars would not serialise)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(_plain(self.to_dict()), sort_keys=False, width=110))
        return path

    # ---- derived numbers
    def oversubscription(self, ranks_per_node: int | None = None) -> float:
        if self.kind != "cpu" or not self.cores_per_node:
            return 1.0
        ranks = ranks_per_node or self.ranks_per_node
        return max(1.0, ranks * (self.threads_per_rank or 1) / self.cores_per_node)

    def gemm_rate(self, dtype: str) -> Affine:
        if dtype in self.gemm:
            return self.gemm[dtype]
        if self.gemm:
            return next(iter(self.gemm.values()))
        raise UserError(f"cluster profile {self.name!r} has no GEMM rate: add gemm.{dtype}")

    def phase(self, key: str, dtype: str = "bf16") -> Affine:
        """Cost coefficients of a local phase ('experts_fwd', 'permute_bwd', ...)."""
        if key in self.phases:
            return self.phases[key]
        name, direction = key.rsplit("_", 1)
        if name in ("experts", "shared"):
            g = self.gemm_rate(dtype)
            stream = (1.0 if direction == "fwd" else 3.0) / self.memory_Bps if self.memory_Bps else 0.0
            return Affine(g.fixed_s + self.launch_overhead_s, g.per_unit_s, "gemm rate + weight streaming", stream)
        if name == "route":
            g = self.gemm_rate("fp32")  # the router runs in float32
            mult = 2.0 if direction == "fwd" else 4.0  # fwd: h W^T; bwd: grads of h and W
            return Affine(self.launch_overhead_s, mult * g.per_unit_s, "fp32 gemm rate")
        if self.memory_Bps and key in GPU_BYTES_PER_UNIT:
            return Affine(self.launch_overhead_s, GPU_BYTES_PER_UNIT[key] / self.memory_Bps,
                          "bytes per unit / memory bandwidth")
        raise UserError(f"cluster profile {self.name!r} has no cost for phase {key!r}: add phases.{key} "
                        "(measured) or memory_Bps (derived)")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile YAML by path, or by name from configs/profiles/ (cwd first, then this repository)."""
    p = Path(name_or_path)
    candidates = [p]
    if p.suffix not in (".yaml", ".yml"):
        candidates += [Path("configs/profiles") / f"{p}.yaml",
                       Path(__file__).resolve().parents[2] / "configs" / "profiles" / f"{p}.yaml"]
    for c in candidates:
        if c.is_file():
            raw = yaml.safe_load(c.read_text()) or {}
            return Profile.from_dict(raw)
    raise UserError(f"cluster profile {str(name_or_path)!r} not found (tried {', '.join(map(str, candidates))}): "
                    "pass a YAML path or a name from configs/profiles/, or measure one with "
                    "`coe-dist bench comm --calibrate`")


# ---------------------------------------------------------------- workload

@dataclass
class Workload:
    """One CoE layer's shape on one rank (T tokens), repeated `layers` times per step."""

    iterations: int  # C
    top_k: int  # K
    num_experts: int  # N
    hidden: int  # d
    expert_hidden: int  # f
    tokens: int  # T
    ep_size: int  # P
    num_shared_experts: int = 0  # S
    layers: int = 1
    dtype: str = "bf16"
    wire_bytes: int = 2
    imbalance: float = 1.0  # max over ranks / mean of the token copies a rank receives
    ranks_per_node: int | None = None  # CPU runs: processes on the node (default: the profile's)
    dispatch: str = "copies"  # moe.dispatch: copies | dedup | node_dedup
    dispatch_dtype: str = "bf16"  # moe.dispatch_dtype: bf16 (the compute dtype) | fp8
    node_ranks: int = 8  # node_dedup: ranks per node (the profile's ranks_per_node)
    # dedup: distinct ranks per token as measured (learned routing, experts placed by co-selection:
    # benchmarks/learned_bytes.py); None: uniform routing's expectation
    distinct_ranks: float | None = None

    @classmethod
    def from_case(cls, case, ranks_per_node: int | None = None, imbalance: float = 1.0) -> Workload:
        return cls(case.iterations, case.top_k, case.num_experts, case.hidden, case.expert_hidden, case.tokens,
                   case.ep_size, case.num_shared_experts, case.layers, case.dtype, case.wire_bytes, imbalance,
                   ranks_per_node, dispatch=case.dispatch, dispatch_dtype=case.dispatch_dtype)

    @property
    def local_experts(self) -> int:
        return math.ceil(self.num_experts / self.ep_size)

    @property
    def copies(self) -> float:
        return float(self.tokens * self.top_k)

    @property
    def rows(self) -> float:
        """Token copies one rank's experts get (expected; times the imbalance)."""
        return self.copies * self.imbalance

    @property
    def bytes_offrank(self) -> float:
        """Bytes one rank sends to other ranks per data all-to-all (the busiest rank under imbalance)."""
        P = self.ep_size
        return self.copies * (P - 1) / P * self.hidden * self.wire_bytes * self.imbalance

    @property
    def rows_per_token(self) -> float:
        """Rows a token sends per data all-to-all (own rank included): K copies, or its distinct ranks."""
        if self.dispatch == "dedup":
            if self.distinct_ranks is not None:
                return self.distinct_ranks
            return distinct_ranks_per_token(self.num_experts, self.top_k, self.ep_size)
        return float(self.top_k)

    def node_dedup_rows(self) -> tuple[float, float, int, int]:
        """node_dedup under uniform routing: (rows a token sends to other nodes, rows per token a relay forwards
        inside its node, nodes n, ranks per node G); see the module doc."""
        P, N, K, E = self.ep_size, self.num_experts, self.top_k, self.local_experts
        G = min(self.node_ranks, P)
        n = math.ceil(P / G)

        def holds(x: int) -> float:  # chance that x given experts hold one of the token's K (ceil'd E: <= N)
            return 1 - math.comb(N - min(x, N), K) / math.comb(N, K)

        return (n - 1) * holds(G * E), n * (G - 1) * holds(E), n, G

    def node_dedup_bytes(self, phase: str, direction: str) -> tuple[float, float, int, int]:
        """node_dedup: (bytes to other nodes, bytes forwarded inside the node, nodes n, ranks per node G) of one
        data call (uniform routing, times the imbalance)."""
        K, E = self.top_k, self.local_experts
        inter_rows, intra_rows, n, G = self.node_dedup_rows()
        row = self.hidden * self.wire_bytes
        first_row = self.hidden + FP8_SCALE_BYTES if (phase, direction, self.dispatch_dtype) == (
            "dispatch", "fwd", "fp8") else row
        slots = (min(K, G * E), min(K, E)) if phase == "dispatch" else (0, 0)
        inter = self.tokens * inter_rows * (first_row + slots[0] * SLOT_BYTES)
        intra = self.tokens * intra_rows * (row + slots[1] * SLOT_BYTES)
        return inter * self.imbalance, intra * self.imbalance, n, G

    def a2a_bytes(self, phase: str, direction: str) -> float:
        """Bytes one rank sends to other ranks in one data all-to-all (dispatch | combine, fwd | bwd), the
        busiest rank under imbalance; dedup's dispatch carries `slot_bytes` more in the same call; node_dedup:
        both hops' bytes."""
        if self.dispatch == "node_dedup":
            return sum(self.node_dedup_bytes(phase, direction)[:2])
        P = self.ep_size
        row = self.hidden * self.wire_bytes
        if (phase, direction, self.dispatch_dtype) == ("dispatch", "fwd", "fp8"):
            row = self.hidden + FP8_SCALE_BYTES
        slots = self.slot_bytes if phase == "dispatch" else 0.0
        return self.tokens * self.rows_per_token * (P - 1) / P * row * self.imbalance + slots

    @property
    def slot_bytes(self) -> float:
        """dedup: bytes of the rows' (gate, local expert) slots in each dispatch, forward or backward."""
        if self.dispatch != "dedup":
            return 0.0
        P, slots = self.ep_size, min(self.top_k, self.local_experts)
        return self.tokens * self.rows_per_token * (P - 1) / P * slots * SLOT_BYTES * self.imbalance

    @property
    def bytes_per_step(self) -> float:
        """All-to-all bytes one rank sends per step: 4 data calls per layer-iteration."""
        return self.iterations * self.layers * sum(self.a2a_bytes(p, d) for p in ("dispatch", "combine")
                                                   for d in ("fwd", "bwd"))

    def units(self, phase: str, direction: str) -> float:
        T, K, N, d, f = self.tokens, self.top_k, self.num_experts, self.hidden, self.expert_hidden
        if phase == "route":
            return float(T * N * d)
        if phase in ("permute", "unpermute"):
            return float(T * K * d)
        if phase in ("regroup", "ungroup"):
            return self.rows * d
        if phase == "experts":
            return (6.0 if direction == "fwd" else 12.0) * self.rows * d * f
        if phase == "shared":
            return (6.0 if direction == "fwd" else 12.0) * T * d * self.num_shared_experts * f
        raise KeyError(phase)

    def units2(self, phase: str) -> float:
        """The second size of a phase (see Affine): T*N for the router, weight bytes for the GEMMs."""
        if phase == "route":
            return float(self.tokens * self.num_experts)
        return self.weight_bytes(phase)

    def weight_bytes(self, phase: str) -> float:
        """Expert weights a GEMM phase reads per call (forward; backward reads and writes them as well)."""
        if phase == "experts":
            return 3.0 * self.local_experts * self.hidden * self.expert_hidden * self.wire_bytes
        if phase == "shared":
            return 3.0 * self.num_shared_experts * self.hidden * self.expert_hidden * self.wire_bytes
        return 0.0


# ---------------------------------------------------------------- prediction

def a2a_time(profile: Profile, P: int, bytes_offrank: float, ranks_per_node: int | None = None) -> float:
    """One all-to-all in a group of P ranks, B bytes to other ranks (see module doc)."""
    if P <= 1:
        return 0.0
    intra = profile.links.get("intra")
    if intra is None:
        raise UserError(f"cluster profile {profile.name!r} has no links.intra")
    g = ranks_per_node or profile.ranks_per_node
    inter = profile.links.get("inter")
    if P <= g or inter is None:
        return intra.time(P - 1, bytes_offrank)
    nodes = math.ceil(P / g)
    b_inter = bytes_offrank * (P - g) / (P - 1)
    b_intra = bytes_offrank * (g - 1) / (P - 1)
    return (inter.time(nodes - 1, b_inter)
            + intra.time(g - 1, b_intra + b_inter * (g - 1) / g))


def node_dedup_a2a_time(profile: Profile, w: Workload, phase: str, direction: str) -> float:
    """One node_dedup data call: hop 1 over the inter-node link, then hop 2 inside the node (see module doc)."""
    inter_bytes, intra_bytes, n, G = w.node_dedup_bytes(phase, direction)
    intra, inter = profile.links.get("intra"), profile.links.get("inter") or profile.links.get("intra")
    if intra is None:
        raise UserError(f"cluster profile {profile.name!r} has no links.intra")
    return (inter.time(n - 1, inter_bytes) if n > 1 else 0.0) + (intra.time(G - 1, intra_bytes) if G > 1 else 0.0)


def _overhead(profile: Profile, key: str, peers: int) -> float:
    """Software cost of an all-to-all call site beyond the link (measured profiles; 0 unless given):
    fixed_s + peers * per_unit_s."""
    a = profile.phases.get(key)
    return a.time(peers) if a is not None else 0.0


def predict_iteration(profile: Profile, w: Workload, oversubscription: float | None = None) -> dict[str, float]:
    """Seconds per phase key ('dispatch_fwd', ...) for one layer-iteration on one rank (oversubscription:
    the profile's for the workload's ranks per node unless given)."""
    over = profile.oversubscription(w.ranks_per_node) if oversubscription is None else oversubscription
    rpn = w.ranks_per_node if profile.kind == "cpu" else None
    out: dict[str, float] = {}
    P = w.ep_size
    for key in PHASE_KEYS:
        phase, direction = key.rsplit("_", 1)
        if phase == "shared" and not w.num_shared_experts:
            continue
        if phase == "counts":
            t = 0.0 if P <= 1 else (a2a_time(profile, P, count_exchange_bytes(P, w.local_experts), rpn)
                                     + profile.host_sync_s + _overhead(profile, key, P - 1))
        elif phase in ("dispatch", "combine") and w.dispatch == "node_dedup":
            t = 0.0 if P <= 1 else node_dedup_a2a_time(profile, w, phase, direction) + _overhead(profile, key, P - 1)
        elif phase in ("dispatch", "combine"):
            t = 0.0 if P <= 1 else a2a_time(profile, P, w.a2a_bytes(phase, direction), rpn) + _overhead(
                profile, key, P - 1)
        else:
            t = profile.phase(key, w.dtype).time(w.units(phase, direction), w.units2(phase))
        out[key] = t * over
    return out


def predict_step(profile: Profile, w: Workload, extra_compute_s: float = 0.0) -> dict[str, Any]:
    """Per-step totals: phases (all layers and iterations), step time, communication time and share."""
    it = predict_iteration(profile, w)
    n = w.layers * w.iterations
    phases = {k: v * n for k, v in it.items()}
    comm = sum(v for k, v in phases.items() if k.rsplit("_", 1)[0] in COMM_PHASES)
    step = sum(phases.values()) + extra_compute_s
    return {"phases": phases, "per_iteration": it, "step_s": step, "comm_s": comm,
            "comm_share": comm / step if step > 0 else 0.0, "extra_compute_s": extra_compute_s}


# ---------------------------------------------------------------- fitting

def fit_affine(x, y, *, relative: bool = True) -> tuple[float, float]:
    """Least squares y ~ a + b*x with a, b >= 0; relative=True minimises relative errors (weights 1/y)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    a, b = fit_linear(np.stack([np.ones_like(x), x], 1), y, relative=relative)
    return float(a), float(b)


def fit_linear(X, y, *, relative: bool = True) -> np.ndarray:
    """Non-negative least squares y ~ X @ c (small problems: active-set by enumeration of zeroed columns)."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    w = 1.0 / np.maximum(np.abs(y), 1e-30) if relative else np.ones_like(y)
    Xw, yw = X * w[:, None], y * w
    n = X.shape[1]
    best, best_err = np.zeros(n), math.inf
    # Try every subset of free columns (n <= 3 here), keep the best feasible one.
    for mask in range(1, 2 ** n):
        cols = [i for i in range(n) if mask >> i & 1]
        c, *_ = np.linalg.lstsq(Xw[:, cols], yw, rcond=None)
        if np.any(c < 0):
            continue
        full = np.zeros(n)
        full[cols] = c
        err = float(np.sum((Xw @ full - yw) ** 2))
        if err < best_err * (1 - 1e-12):
            best, best_err = full, err
    return best


def _bandwidth(inv_bw: float) -> float:
    """Bytes per second from a fitted seconds-per-byte slope; a slope <= 0 (time that does not grow with the
    bytes, within the noise) is an unmeasurably fast link: inf."""
    return float(1.0 / inv_bw) if inv_bw > 0 else math.inf


def fit_link(points: list[tuple[int, float, float]], *, latency_model: str = "per_peer",
             source: str = "") -> Link:
    """Fit latency and bandwidth from all-to-all measurements (peers, bytes sent off-rank, seconds).
    latency_model 'per_peer': t = peers*a + B/bw (gloo); 'fixed': t = a + B/bw (NCCL); 'both': t = a0 +
    peers*a1 + B/bw (needs several group sizes)."""
    peers = np.array([p[0] for p in points], float)
    nbytes = np.array([p[1] for p in points], float)
    t = np.array([p[2] for p in points], float)
    if latency_model == "per_peer":
        a, inv_bw = fit_linear(np.stack([peers, nbytes], 1), t)
        return Link(0.0, float(a), _bandwidth(inv_bw), source)
    if latency_model == "fixed":
        a, inv_bw = fit_linear(np.stack([np.ones_like(t), nbytes], 1), t)
        return Link(float(a), 0.0, _bandwidth(inv_bw), source)
    if latency_model == "both":
        a0, a1, inv_bw = fit_linear(np.stack([np.ones_like(t), peers, nbytes], 1), t)
        return Link(float(a0), float(a1), _bandwidth(inv_bw), source)
    raise ValueError(latency_model)


DATA_A2A_KEYS = ("dispatch_fwd", "dispatch_bwd", "combine_fwd", "combine_bwd")


def fit_link_overheads(points: list[tuple[str, int, float, float]], *, latency_model: str = "per_peer",
                       source: str = "") -> tuple[Link, dict[str, float]]:
    """Fit one link and a software overhead per all-to-all call site from (phase key, peers, bytes,
    seconds): t = latency(peers) + o_key(peers) + B/bw. Every call site (count exchange, dispatch and
    combine, forward and backward) gets its own latency term; the link's latency is the smallest of them
    (the cheapest call site), and o_key what a call site costs beyond it (host work, autograd, allocation,
    the larger-message protocol). 'per_peer' (gloo exchanges pairwise): latency and overheads scale with
    the peers; 'fixed' (NCCL): they do not; 'both' (several group sizes): a fixed and a per-peer link latency
    with per-peer overheads of the data call sites only."""
    peers = np.array([p[1] for p in points], float)
    nbytes = np.array([p[2] for p in points], float)
    t = np.array([p[3] for p in points], float)
    if latency_model == "both":
        keys = [k for k in DATA_A2A_KEYS if any(p[0] == k for p in points)]
        onehot = [np.array([1.0 if p[0] == k else 0.0 for p in points]) * peers for k in keys]
        c = fit_linear(np.stack([np.ones_like(t), peers, nbytes, *onehot], 1), t)
        bw = _bandwidth(c[2])
        return Link(float(c[0]), float(c[1]), bw, source), {k: float(v) for k, v in zip(keys, c[3:], strict=True)}
    keys = sorted({p[0] for p in points}, key=lambda k: (k != "counts_fwd", k))
    site = peers if latency_model == "per_peer" else np.ones_like(t)
    onehot = [np.array([1.0 if p[0] == k else 0.0 for p in points]) * site for k in keys]
    c = fit_linear(np.stack([nbytes, *onehot], 1), t)
    bw = _bandwidth(c[0])
    offsets = {k: float(v) for k, v in zip(keys, c[1:], strict=True)}
    base = min(offsets.values()) if offsets else 0.0
    link = Link(base, 0.0, bw, source) if latency_model == "fixed" else Link(0.0, base, bw, source)
    return link, {k: v - base for k, v in offsets.items()}


def overhead_affine(o: float, latency_model: str, source: str) -> Affine:
    """A call-site overhead as a phase Affine whose units are the peers (see `_overhead`)."""
    if latency_model == "per_peer":
        return Affine(0.0, o, source)
    return Affine(o, 0.0, source)


def call_site_overheads(link: Link, observations: list[Observation], latency_model: str,
                        source: str) -> tuple[dict[str, Affine], float]:
    """What the bench's all-to-all call sites took beyond a link fitted on a plain all-to-all sweep (median
    residual per call site): the host sync of the count exchange, and an overhead per data call site
    (dispatch, combine; forward, backward): autograd, allocation, split lists. The overhead is charged per
    peer under 'per_peer' (a sweep at one group size: per-call and per-peer costs look alike) and per call
    otherwise (the sweep's link holds the per-peer cost). Returns (phase overheads, host sync seconds)."""
    residual: dict[str, list[float]] = {}
    for ob in observations:
        phase, P = ob.phase_key.rsplit("_", 1)[0], ob.case.ep_size
        if phase not in COMM_PHASES or P < 2:
            continue
        nbytes = ob.bytes_offrank if phase != "counts" else count_exchange_bytes(P, ob.case.local_experts)
        per = float(P - 1) if (phase != "counts" and latency_model == "per_peer") else 1.0
        t = ob.seconds / ob.oversubscription
        residual.setdefault(ob.phase_key, []).append((t - link.time(P - 1, nbytes)) / per)
    host_sync = max(0.0, float(np.median(residual.pop("counts_fwd", [0.0]))))
    unit = "peer" if latency_model == "per_peer" else "call"
    phases = {key: overhead_affine(max(0.0, float(np.median(vals))), latency_model,
                                   f"{source}; median residual of the grid's calls over the swept link (per {unit})")
              for key, vals in residual.items()}
    return phases, host_sync


@dataclass
class Observation:
    """One measured phase of one case: seconds per layer-iteration (median over repeats of the fastest or
    the slowest rank, `stat`), with what the model needs to predict it. Fastest-rank times are the
    intrinsic cost of a rank that has a core to itself (no oversubscription factor); slowest-rank times
    include the time-sharing of an oversubscribed host (the nominal factor applies)."""

    case: Any  # BenchCase
    phase_key: str
    seconds: float
    bytes_offrank: float = 0.0  # comm phases: the busiest rank's bytes sent
    rows: float = 0.0  # expert phases: the busiest rank's received rows
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    cores_per_node: int = 1
    stat: str = "min"  # min | max over ranks

    @property
    def oversubscription(self) -> float:
        if self.stat == "min":
            return 1.0
        return max(1.0, self.ranks_per_node * self.threads_per_rank / self.cores_per_node)

    def workload(self) -> Workload:
        imb = self.rows / (self.case.tokens * self.case.top_k) if self.rows else 1.0
        return Workload.from_case(self.case, self.ranks_per_node, imbalance=max(imb, 1e-9))


def fit_profile(observations: list[Observation], *, name: str, latency_model: str = "per_peer",
                cores_per_node: int, threads_per_rank: int, ranks_per_node: int,
                description: str = "", source: str = "fitted from bench measurements") -> Profile:
    """A CPU-kind profile whose every coefficient is fitted from `observations` (bench phase times):
    one link (+ a fixed overhead per data all-to-all call site, see fit_link_overheads) from the
    communication phases, (fixed, per-unit) per local phase and direction. Times are
    divided by each observation's oversubscription first, so the coefficients are those of a rank with
    its share of cores to itself."""
    link_pts: list[tuple[str, int, float, float]] = []
    local: dict[str, list[tuple[float, float, float]]] = {}
    for ob in observations:
        t = ob.seconds / ob.oversubscription
        phase = ob.phase_key.rsplit("_", 1)[0]
        P = ob.case.ep_size
        if phase in COMM_PHASES:
            if P <= 1:
                continue
            nbytes = ob.bytes_offrank if phase != "counts" else count_exchange_bytes(P, ob.case.local_experts)
            link_pts.append((ob.phase_key, P - 1, nbytes, t))
        else:
            w = ob.workload()
            direction = ob.phase_key.rsplit("_", 1)[1]
            local.setdefault(ob.phase_key, []).append((w.units(phase, direction), t, w.units2(phase)))
    links = {}
    phases = {}
    if link_pts:
        links["intra"], overheads = fit_link_overheads(link_pts, latency_model=latency_model, source=source)
        for key, o in overheads.items():
            phases[key] = overhead_affine(o, latency_model, f"{source}: overhead of this call site beyond the "
                                          "link (units: peers)")
    for key, pts in sorted(local.items()):
        unit = PHASE_UNITS[key.rsplit("_", 1)[0]]
        name = key.rsplit("_", 1)[0]
        if name in PHASE_UNITS2:
            # Columns ordered [fixed, units2, units]: where the two sizes are collinear in the training data
            # (one d only), the fit keeps the first, i.e. attributes the cost to units2 (see fit_linear).
            c = fit_linear(np.array([[1.0, p[2], p[0]] for p in pts]), np.array([p[1] for p in pts]))
            phases[key] = Affine(float(c[0]), float(c[2]), f"{source} ({len(pts)} points; units {unit}; "
                                 f"units2 {PHASE_UNITS2[name]})", float(c[1]))
            continue
        a, b = fit_affine([p[0] for p in pts], [p[1] for p in pts])
        phases[key] = Affine(a, b, f"{source} ({len(pts)} points; units {unit})")
    gemm = {}
    if "experts_fwd" in phases:
        gemm[observations[0].case.dtype] = Affine(phases["experts_fwd"].fixed_s, phases["experts_fwd"].per_unit_s,
                                                   "experts_fwd fit")
    return Profile(name=name, kind="cpu", ranks_per_node=ranks_per_node, cores_per_node=cores_per_node,
                   threads_per_rank=threads_per_rank, dtype=observations[0].case.dtype if observations else "bf16",
                   links=links, gemm=gemm, phases=phases, description=description,
                   sources={"all": source})


def predict_observation(profile: Profile, ob: Observation) -> float:
    """The model's seconds per layer-iteration for an observed phase, in the observation's setting (its
    ranks per node, its busiest rank's load, its rank statistic)."""
    w = ob.workload()
    over = ob.oversubscription if profile.kind == "cpu" else 1.0
    phase = ob.phase_key.rsplit("_", 1)[0]
    if phase in ("dispatch", "combine") and ob.bytes_offrank:
        # the measured bytes (exact) rather than the expected ones
        return (a2a_time(profile, w.ep_size, ob.bytes_offrank, w.ranks_per_node if profile.kind == "cpu" else None)
                + _overhead(profile, ob.phase_key, w.ep_size - 1)) * over
    return predict_iteration(profile, w, over)[ob.phase_key]
