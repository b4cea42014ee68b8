"""Unpermute's weighted sum out[t] = sum_k g[t,k] * y[t,k] (float32 accumulation of bf16 expert outputs),
forward and forward + backward: the shipped `_WeightedSum` (K multiply-adds over [T, D] rows) against the
former one [1, K] x [K, D] product per token (torch.bmm on a float32 copy of y).

    .venv/bin/python benchmarks/unpermute.py [--repeats 15] [--out benchmarks/results/unpermute.json]

Shapes: the paper layer (T = 4096, d = 512; K = 3 for CoE-2(4/64), 7 for MoE(8/64)) and the scaling bench's
grid (T = 1024, d = 128 and 256, K = 1, 2, 4). One thread, interleaved, medians.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

try:
    from benchmarks.common import environment, interleaved, summary, write_json
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import environment, interleaved, summary, write_json

from coe_dist.parallel.dispatch import _WeightedSum

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 512, 3), (4096, 512, 7), (4096, 512, 1), (1024, 128, 1), (1024, 128, 2), (1024, 128, 4),
          (1024, 256, 1), (1024, 256, 2), (1024, 256, 4)]


def bmm(y_TKD: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    return torch.bmm(w_TK.unsqueeze(1), y_TKD.to(w_TK.dtype)).squeeze(1)


def weighted_sum(y_TKD: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
    return _WeightedSum.apply(y_TKD, w_TK)


def measure(T: int, D: int, K: int, repeats: int, clock: str) -> dict:
    y = torch.randn(T, K, D).to(torch.bfloat16).requires_grad_(True)
    w = torch.rand(T, K, requires_grad=True)
    g = torch.randn(T, D)
    fns = {}
    for name, op in (("bmm", bmm), ("weighted_sum", weighted_sum)):
        fns[f"{name}/fwd"] = lambda op=op: op(y, w)
        fns[f"{name}/fwd+bwd"] = lambda op=op: torch.autograd.grad(op(y, w), (y, w), g)
    times = interleaved(fns, repeats, warmup=2, clock=clock)
    return {name: summary(t) for name, t in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time (robust to other jobs on the machine)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/unpermute.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    print(f"{'T':>5} {'d':>4} {'K':>2} | {'bmm fwd':>8} {'new fwd':>8} {'x':>5} | "
          f"{'bmm f+b':>8} {'new f+b':>8} {'x':>5}")
    for T, D, K in SHAPES:
        r = measure(T, D, K, args.repeats, args.clock)
        ms = {k: v["median_s"] * 1e3 for k, v in r.items()}
        fwd_x = ms["bmm/fwd"] / ms["weighted_sum/fwd"]
        both_x = ms["bmm/fwd+bwd"] / ms["weighted_sum/fwd+bwd"]
        print(f"{T:>5} {D:>4} {K:>2} | {ms['bmm/fwd']:>8.2f} {ms['weighted_sum/fwd']:>8.2f} {fwd_x:>5.2f} | "
              f"{ms['bmm/fwd+bwd']:>8.2f} {ms['weighted_sum/fwd+bwd']:>8.2f} {both_x:>5.2f}", flush=True)
        rows.append({"tokens": T, "hidden": D, "top_k": K, "times": r, "speedup_fwd": fwd_x,
                     "speedup_fwd_bwd": both_x})
    out = write_json(args.out, {"benchmark": "unpermute", "clock": args.clock, "repeats": args.repeats,
                                "environment": environment(), "rows": rows})
    print(f"ms, medians of {args.repeats}; x = bmm / weighted_sum (> 1: the shipped op is faster). wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
