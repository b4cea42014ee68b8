"""Benchmark cases: one CoE layer shape + routing + expert-parallel size, and the grids that expand into them.

A grid is a mapping of keys to lists of values (YAML or command line); every combination is a case:

    iterations (C), top_k (K), total_k (C*K: K = total_k // C, overrides top_k), num_experts (N),
    hidden (d), expert_hidden (f), tokens (T, per rank), dtype (bf16|fp32: wire and expert compute),
    ep_size (P: sub-groups of consecutive ranks), routing (learned-random | forced-balanced | skewed),
    zipf (exponent of the skewed routing), num_shared_experts (S), layers (L),
    dispatch (copies | dedup: a row per token copy, or per token and destination rank, as moe.dispatch),
    dispatch_dtype (bf16 | fp8: forward dispatch rows in the compute dtype, or e4m3 + a float32 scale per row,
    as moe.dispatch_dtype; the combine stays in the compute dtype)

A case's key names dispatch and dispatch_dtype only when they are not the defaults (copies, bf16), so the
keys, seeds and tables of the cases from before the modes stay what they were.

Also here: the routing tables of the forced-balanced and skewed modes, and the analytic byte counts.

Shape legend: T = tokens on a rank, K = experts per token, N = routed experts, P = ranks in the
expert-parallel group, E = N/P experts per rank, d = hidden, f = expert width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from coe_dist.bench.model import FP8_SCALE_BYTES, SLOT_BYTES, Workload, count_exchange_bytes
from coe_dist.config import ConfigError

ROUTINGS = ("learned-random", "forced-balanced", "skewed")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
DISPATCHES = ("copies", "dedup")
DISPATCH_DTYPES = ("bf16", "fp8")
# fp8_wire quantizes float rows (scale = max|row| / 448) and dequantizes them to the compute dtype.
FP8_COMPUTE_DTYPES = ("bf16", "fp32")
DATA_A2A_KEYS = ("dispatch_fwd", "dispatch_bwd", "combine_fwd", "combine_bwd")


@dataclass(frozen=True, kw_only=True)
class BenchCase:
    iterations: int = 2  # C
    top_k: int = 2  # K
    num_experts: int = 8  # N
    hidden: int = 128  # d
    expert_hidden: int = 128  # f
    tokens: int = 256  # T per rank
    dtype: str = "bf16"
    ep_size: int = 2  # P
    routing: str = "forced-balanced"
    zipf: float = 1.0  # exponent for routing=skewed
    num_shared_experts: int = 0  # S
    layers: int = 1  # L
    dispatch: str = "copies"  # copies | dedup
    dispatch_dtype: str = "bf16"  # bf16 (rows in the compute dtype) | fp8

    @property
    def key(self) -> str:
        """Stable, readable id, e.g. C2K2N8_d128f128_T256_bf16_P2_forced-balanced (+ _dedup, _fp8 when set)."""
        route = self.routing + (f"{self.zipf:g}" if self.routing == "skewed" else "")
        shared = f"S{self.num_shared_experts}" if self.num_shared_experts else ""
        layers = f"_L{self.layers}" if self.layers != 1 else ""
        mode = (f"_{self.dispatch}" if self.dispatch != "copies" else "") + (
            f"_{self.dispatch_dtype}" if self.dispatch_dtype != "bf16" else "")
        return (f"C{self.iterations}K{self.top_k}N{self.num_experts}{shared}_d{self.hidden}f{self.expert_hidden}"
                f"_T{self.tokens}_{self.dtype}_P{self.ep_size}_{route}{layers}{mode}")

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def wire_bytes(self) -> int:
        """Bytes per element of the compute dtype (the rows' dtype but for fp8 forward dispatch rows)."""
        return DTYPE_BYTES[self.dtype]

    @property
    def slots(self) -> int:
        """dedup: (gate, local expert) slots per row, S = min(K, E)."""
        return min(self.top_k, self.local_experts)

    def row_bytes(self, key: str) -> int:
        """Bytes of one row in a data all-to-all (`key` one of DATA_A2A_KEYS): d elements of the compute
        dtype; the forward dispatch with fp8, d e4m3 bytes and a float32 scale; dedup's dispatch (forward,
        and backward with the gradients) S slots of a float32 gate and a float32 id more."""
        row = self.hidden * self.wire_bytes
        if key == "dispatch_fwd" and self.dispatch_dtype == "fp8":
            row = self.hidden + FP8_SCALE_BYTES
        if key.startswith("dispatch") and self.dispatch == "dedup":
            row += self.slots * SLOT_BYTES
        return row

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f.type for f in dataclasses.fields(BenchCase)}
# Command-line and YAML names that differ from the field names.
ALIASES = {"C": "iterations", "K": "top_k", "N": "num_experts", "d": "hidden", "f": "expert_hidden",
           "T": "tokens", "P": "ep_size", "S": "num_shared_experts", "L": "layers", "experts": "num_experts",
           "ffn": "expert_hidden"}
GRID_KEYS = (*FIELDS, "total_k")


def validate_case(case: BenchCase, world_size: int | None = None) -> None:
    """Fail before any collective, naming the key and the fix."""
    def check(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"bench case {case.key}: {msg}")

    for name in ("iterations", "top_k", "num_experts", "hidden", "expert_hidden", "tokens", "ep_size", "layers"):
        check(getattr(case, name) >= 1, f"{name}={getattr(case, name)} must be >= 1")
    check(case.top_k <= case.num_experts, f"top_k={case.top_k} > num_experts={case.num_experts}")
    check(case.num_experts % case.ep_size == 0,
          f"num_experts={case.num_experts} is not divisible by ep_size={case.ep_size}")
    check(case.dtype in DTYPES, f"dtype={case.dtype!r} must be one of {', '.join(DTYPES)}")
    check(case.routing in ROUTINGS, f"routing={case.routing!r} must be one of {', '.join(ROUTINGS)}")
    check(case.num_shared_experts >= 0, "num_shared_experts must be >= 0")
    check(case.dispatch in DISPATCHES,
          f"dispatch={case.dispatch!r} must be one of {', '.join(DISPATCHES)}: set dispatch (--dispatch) to copies "
          "(a row per token copy) or dedup (a row per token and destination rank)")
    check(case.dispatch_dtype in DISPATCH_DTYPES,
          f"dispatch_dtype={case.dispatch_dtype!r} must be one of {', '.join(DISPATCH_DTYPES)}: set dispatch_dtype "
          "(--dispatch-dtype) to bf16 (rows in the compute dtype) or fp8 (e4m3 + a float32 scale per row)")
    check(case.dispatch_dtype != "fp8" or case.dtype in FP8_COMPUTE_DTYPES,
          f"dispatch_dtype=fp8 with dtype={case.dtype!r}: fp8 rows are quantized from and dequantized to a "
          f"float compute dtype; set dtype to one of {', '.join(FP8_COMPUTE_DTYPES)}, or dispatch_dtype to bf16")
    if case.routing == "forced-balanced":
        check((case.tokens * case.top_k) % case.num_experts == 0,
              f"forced-balanced routing needs tokens*top_k ({case.tokens}*{case.top_k}) divisible by "
              f"num_experts={case.num_experts}")
    if case.routing == "skewed":
        check(case.zipf >= 0, f"zipf={case.zipf} must be >= 0")
    if world_size is not None:
        check(world_size % case.ep_size == 0,
              f"ep_size={case.ep_size} does not divide the world size {world_size}: launch a multiple of "
              f"{case.ep_size} processes")


def _values(key: str, raw: Any) -> list:
    """One grid key's values: a list, a scalar, or a comma-separated string, converted to the field type."""
    if isinstance(raw, str) and "," in raw:
        raw = [v.strip() for v in raw.split(",") if v.strip()]
    values = raw if isinstance(raw, (list, tuple)) else [raw]
    kind = "int" if key == "total_k" else FIELDS[key]  # annotations are strings here
    convert = {"int": int, "float": float, "str": str}[kind]
    out = []
    for v in values:
        if isinstance(v, bool) or (kind == "int" and isinstance(v, float) and not v.is_integer()):
            raise ConfigError(f"bench grid key '{key}': {v!r} is not a valid {kind}")
        try:
            out.append(convert(v))
        except (TypeError, ValueError):
            raise ConfigError(f"bench grid key '{key}': {v!r} is not a valid {kind}") from None
    return out


def normalise_grid(raw: dict[str, Any]) -> dict[str, list]:
    """Aliases -> field names; scalars -> one-element lists; unknown keys fail with the valid ones."""
    grid: dict[str, list] = {}
    for key, value in (raw or {}).items():
        name = ALIASES.get(key, key)
        if name not in GRID_KEYS:
            raise ConfigError(f"unknown bench grid key '{key}'; valid: {', '.join(GRID_KEYS)}")
        grid[name] = _values(name, value)
    return grid


def expand_grid(grid: dict[str, list]) -> list[BenchCase]:
    """Every combination of the grid's values; total_k fixes C*K (K = total_k // C; C not dividing it is
    skipped). Duplicates are dropped, order kept."""
    grid = dict(grid)
    total_k = grid.pop("total_k", None)
    keys = list(grid)
    cases: list[BenchCase] = []
    seen = set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        targets = total_k or [None]
        for tk in targets:
            v = dict(values)
            if tk is not None:
                c = v.get("iterations", BenchCase.iterations)
                if tk % c:
                    continue
                v["top_k"] = tk // c
            if v.get("routing", BenchCase.routing) != "skewed":
                v.pop("zipf", None)
            case = BenchCase(**v)
            if case not in seen:
                seen.add(case)
                cases.append(case)
    return cases


def load_grid(path: str | Path | None, overrides: dict[str, Any] | None = None) -> tuple[list[BenchCase], dict]:
    """Cases from a YAML file (keys `grid:` mapping and/or `cases:` list of mappings, plus `bench:` settings
    such as warmup/repeats) with command-line overrides applied to the grid. A `cases:` entry inherits the
    grid: it expands over every key it does not set. Returns (cases, settings)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"bench grid file {str(p)!r} does not exist: pass e.g. configs/bench/ci.yaml")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"bench grid file {str(p)!r} must hold a mapping with 'grid:' and/or 'cases:'")
    settings = dict(raw.get("bench") or {})
    grid = normalise_grid(raw.get("grid") or {})
    for key, value in (overrides or {}).items():
        if value is not None:
            grid.update(normalise_grid({key: value}))
    cases = expand_grid(grid) if (grid or not raw.get("cases")) else []
    for extra in raw.get("cases") or []:
        # An extra case inherits the grid (every combination of the keys it does not set).
        more = {**grid, **normalise_grid(extra)}
        if "top_k" in normalise_grid(extra):
            more.pop("total_k", None)
        cases += [c for c in expand_grid(more) if c not in cases]
    if not cases:
        raise ConfigError("the bench grid is empty: give at least one value per key")
    return cases, settings


# ---------------------------------------------------------------- routing tables

def stable_seed(*parts: object) -> int:
    """A seed from any printable parts, the same in every process (unlike hash() of strings)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:6], "little")


def forced_balanced_table(tokens: int, top_k: int, num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """[T, K] expert ids, K distinct per token, every expert chosen exactly T*K/N times: copy i (= t*K + k)
    goes to expert (i + shift) % N, then the token order is shuffled (counts unchanged)."""
    shift = int(torch.randint(num_experts, (1,), generator=generator))
    flat = (torch.arange(tokens * top_k) + shift) % num_experts
    table = flat.view(tokens, top_k)
    return table[torch.randperm(tokens, generator=generator)].contiguous()


def zipf_table(tokens: int, top_k: int, num_experts: int, exponent: float,
               generator: torch.Generator) -> torch.Tensor:
    """[T, K] distinct expert ids per token, drawn without replacement with popularity (e+1)^-exponent:
    expert 0 (on rank 0 of the group) is the hottest. exponent 0 = uniform random."""
    weights = (torch.arange(num_experts, dtype=torch.float64) + 1.0).pow(-exponent)
    return torch.multinomial(weights.expand(tokens, num_experts), top_k, replacement=False,
                             generator=generator)


# ---------------------------------------------------------------- analytic counts

def analytic_bytes_per_a2a(case: BenchCase, key: str = "combine_fwd") -> int | None:
    """Bytes one rank sends to other ranks in one data all-to-all (`key`: dispatch_fwd, dispatch_bwd,
    combine_fwd, combine_bwd) under forced-balanced routing: T*K copies, (P-1)/P of them off-rank, a row
    of `case.row_bytes(key)` each. None for dispatch=dedup: its rows, the distinct (token, other rank) pairs,
    depend on which experts the table gives each token (tests/test_bench_dispatch.py counts them from it)."""
    if case.dispatch == "dedup":
        return None
    copies = case.tokens * case.top_k
    assert (copies * (case.ep_size - 1)) % case.ep_size == 0
    return copies * (case.ep_size - 1) // case.ep_size * case.row_bytes(key)


def counts_bytes(case: BenchCase) -> int:
    """Bytes one rank sends in the count exchange (see count_exchange_bytes)."""
    return count_exchange_bytes(case.ep_size, case.local_experts)


def rounds_per_step(case: BenchCase) -> dict[str, int]:
    """All-to-all calls per training step (forward + backward), all layers: per iteration one count
    exchange, dispatch and combine forward, dispatch and combine backward."""
    n = case.layers * case.iterations if case.ep_size > 1 else 0  # ep 1: no exchange (local copies)
    return {"counts": n, "data": 4 * n, "total": 5 * n}


def expected_bytes_per_step(case: BenchCase) -> int:
    """Bytes sent by one rank per step in the data all-to-alls (dispatch/combine x fwd/bwd per layer and
    iteration), expected for uniform routing: copies, T*K*(P-1)/P rows each (exact for forced-balanced);
    dedup, the cost model's distinct ranks per token (`Workload.rows_per_token`; forced-balanced routing
    gives a token consecutive experts, which share ranks more often than uniform draws)."""
    if case.dispatch == "dedup":
        return round(Workload.from_case(case).bytes_per_step)
    row_sum = sum(case.row_bytes(key) for key in DATA_A2A_KEYS)
    return case.layers * case.iterations * case.tokens * case.top_k * row_sum * (case.ep_size - 1) // case.ep_size


def expert_flops(rows: int, case: BenchCase, backward: bool = False) -> float:
    """SwiGLU expert FLOPs for `rows` token copies: 2*rows*(d*2f + f*d) forward, twice that backward."""
    fwd = 6.0 * rows * case.hidden * case.expert_hidden
    return 2 * fwd if backward else fwd
