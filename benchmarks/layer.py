"""Benchmark one CoE layer (forward + backward, bf16 autocast over float32 master weights) on CPU.

For CoE-2(4/N) and MoE(8/N) (same FLOPs), in one run:
  (a) check that `CoELayer` and the paper's reference path (benchmarks/reference_coe.py) agree at the
      same weights in float32 (outputs, aux loss, all gradients), and report the bf16-autocast gap;
  (b) measure the limit: the large-GEMM rate of each dtype the layer's FLOPs run in (bf16 for the experts,
      float32 for the router), one large GEMM per dtype at the layer's total FLOPs ([T*K, d] x [d, 2f] in
      its forward and both backward layouts, repeated); and, as the explanation, the bf16 rate of the
      layer's own GEMMs ("GEMM set": every forward and backward matmul of every expert at T*K/N rows, the
      shared expert, at balanced routing);
  (c) time our layer and the reference (median after warm-up, interleaved with the GEMMs so that drift
      hits all alike) and report the achieved share of the limit, the GEMM set's share of it, and the
      speed-up.

FLOPs counted per iteration, forward: routed 2*T*K*3*d*f and shared 2*T*3*d*(S*f) in bf16, router 2*T*d*N
in float32; backward = 2 x forward. Limit = bf16 FLOPs / large bf16 rate + float32 FLOPs / large float32
rate (seconds); "% of limit" = limit / measured time. Element-wise work, permutation and the weight casts
are overhead, not FLOPs. Two tables: medians and bests (minimum) of the timed calls.

On a shared machine, 2 threads and wall-clock time can be slowed 10x and more by other processes (every
op's OpenMP barrier waits for a descheduled thread): `--threads 1 --clock cpu` (process CPU time) is the
contention-robust measurement. `--malloc-tuning` keeps big blocks in glibc's heap
(coe_dist/train/allocator.py; the trainer does so on CPU).

    .venv/bin/python benchmarks/layer.py                    # full: T=4096, d=512, f=352, N=64, S=1
    .venv/bin/python benchmarks/layer.py --threads 1 --clock cpu [--malloc-tuning]
    .venv/bin/python benchmarks/layer.py --quick            # smoke run on small shapes
    .venv/bin/python benchmarks/layer.py --profile 25       # + torch.profiler table of our layer
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

try:
    from benchmarks import common
    from benchmarks.common import add_layer_shape_args, batch_shape, environment, interleaved, summary, write_json
    from benchmarks.reference_coe import ReferenceCoE
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common
    from common import add_layer_shape_args, batch_shape, environment, interleaved, summary, write_json
    from reference_coe import ReferenceCoE

from coe_dist.config import MoEConfig
from coe_dist.model.coe import CoELayer
from coe_dist.train.allocator import tune_glibc_malloc

BF16 = common.GEMM_DTYPES["bf16"]


def layer_configs(num_experts: int, f: int, shared: int) -> dict[str, MoEConfig]:
    common = dict(num_experts=num_experts, expert_hidden_size=f, num_shared_experts=shared)
    return {
        f"CoE-2(4/{num_experts})": MoEConfig(iterations=2, top_k=4, **common),
        f"MoE(8/{num_experts})": MoEConfig(iterations=1, top_k=8, **common),
    }


def layer_flops(cfg: MoEConfig, tokens: int, d: int) -> dict:
    """Forward FLOPs of one layer call (all iterations); training = 3x, split by the dtype they run in under
    bf16 autocast (the router computes in float32, coe_dist/model/router.py)."""
    f, K, N, S, C = cfg.expert_hidden_size, cfg.top_k, cfg.num_experts, cfg.num_shared_experts, cfg.iterations
    routed = C * 2 * tokens * K * 3 * d * f
    shared = C * 2 * tokens * 3 * d * S * f
    router = C * 2 * tokens * d * N
    return {"routed": routed, "shared": shared, "router": router, "forward": routed + shared + router,
            "train": 3 * (routed + shared + router),
            "train_by_dtype": {"bf16": 3 * (routed + shared), "fp32": 3 * router}}


# ----------------------------------------------------------------------------------- (a) equivalence

def _layer_grads_hf(layer: CoELayer) -> dict[str, torch.Tensor]:
    """Gradients of `layer` under the reference names (ep_size 1)."""
    f = layer.config.expert_hidden_size
    g: dict[str, torch.Tensor] = {}
    for t, router in enumerate(layer.routers):
        g[f"gate.{t}.weight" if layer.config.independent_gating else "gate.weight"] = router.weight.grad
    w13, w2 = layer.experts.w_gate_up_E2FD.grad, layer.experts.w_down_EDF.grad
    for i in range(layer.num_local_experts):
        g[f"experts.{i}.gate_proj.weight"] = w13[i, :f]
        g[f"experts.{i}.up_proj.weight"] = w13[i, f:]
        g[f"experts.{i}.down_proj.weight"] = w2[i]
    if layer.shared_experts is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            g[f"shared_experts.{name}.weight"] = getattr(layer.shared_experts, name).weight.grad
    return g


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale else (a - b).abs().max().item()


def _fwd_bwd(module, u_BLD, grad_BLD, autocast: bool):
    for p in module.parameters():
        p.grad = None
    u = u_BLD.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        h, aux = module(u)
    torch.autograd.backward([h, aux], [grad_BLD, torch.ones_like(aux)])
    return h.detach(), aux.detach(), u.grad


def check_equivalence(layer: CoELayer, ref: ReferenceCoE, u_BLD, grad_BLD) -> dict[str, object]:
    out: dict[str, object] = {}
    for mode, autocast in (("fp32", False), ("bf16_autocast", True)):
        h1, a1, gu1 = _fwd_bwd(layer, u_BLD, grad_BLD, autocast)
        h2, a2, gu2 = _fwd_bwd(ref, u_BLD, grad_BLD, autocast)
        g1, g2 = _layer_grads_hf(layer), dict(ref.named_parameters())
        grad_err = max(_rel(g1[name], p.grad) for name, p in g2.items())
        out[mode] = {"out_rel_err": _rel(h1, h2), "aux_rel_err": _rel(a1, a2),
                     "grad_input_rel_err": _rel(gu1, gu2), "grad_param_max_rel_err": grad_err}
    return out


# ----------------------------------------------------------------------------------- (b) GEMM rate

def make_gemm_set(cfg: MoEConfig, tokens: int, d: int):
    """The layer's GEMMs in bf16 at balanced routing: every forward and backward matmul of every expert
    (m = T*K/N rows each) and of the shared expert, for every iteration, with autograd's operand layouts
    (transposes as strided views). Returns (fn, flops)."""
    f, N, C, S = cfg.expert_hidden_size, cfg.num_experts, cfg.iterations, cfg.num_shared_experts
    g = torch.Generator().manual_seed(0)
    shapes = [(tokens * cfg.top_k // N, f)] * N + ([(tokens, S * f)] if S else [])
    ops, flops = [], 0.0
    for m, width in shapes:
        x = torch.randn(m, d, generator=g).to(BF16)
        w13 = torch.randn(2 * width, d, generator=g).to(BF16)  # [out, in] like nn.Linear
        w2 = torch.randn(d, width, generator=g).to(BF16)
        a = torch.randn(m, width, generator=g).to(BF16)
        dy = torch.randn(m, d, generator=g).to(BF16)
        dh = torch.randn(m, 2 * width, generator=g).to(BF16)
        ops.append((x, w13, w2, a, dy, dh))
        flops += 3 * 2 * m * 3 * d * width

    def run():
        for _ in range(C):
            for x, w13, w2, a, dy, dh in ops:
                x @ w13.t()  # forward gate/up
                a @ w2.t()  # forward down
                dy @ w2  # grad of a
                dy.t() @ a  # grad of w2
                dh @ w13  # grad of x
                dh.t() @ x  # grad of w13
    return run, C * flops


def make_large_gemms(cfg: MoEConfig, tokens: int, d: int, train_flops: float) -> dict[str, tuple]:
    """The limit's GEMMs: per dtype, one large [T*K, d] x [d, 2f] GEMM (an iteration's token copies through
    the widest expert matmul, as if all experts were one) at the layer's total training FLOPs."""
    m, n = tokens * cfg.top_k, 2 * cfg.expert_hidden_size
    return {name: common.large_gemm(dtype, m, d, n, train_flops) for name, dtype in common.GEMM_DTYPES.items()}


# ----------------------------------------------------------------------------------- (c) timing

def profile_layer(layer: CoELayer, u_BLD, grad_BLD, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    _fwd_bwd(layer, u_BLD, grad_BLD, True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _fwd_bwd(layer, u_BLD, grad_BLD, True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _step_fn(module, u_BLD, grad_BLD):
    return lambda: _fwd_bwd(module, u_BLD, grad_BLD, True)


def _rates(times: dict[str, list[float]], stat, fl: dict, gemm_flops: float, large_flops: dict[str, float]) -> dict:
    """Rates (TFLOP/s) and each timed layer's share of the large-GEMM limit, from one statistic of the times."""
    t = {k: stat(v) for k, v in times.items()}
    large = {dtype: large_flops[dtype] / t[f"large_{dtype}"] for dtype in large_flops}
    limit_s = common.limit_seconds(fl["train_by_dtype"], large)
    out = {"large_gemm_tflops": {k: v / 1e12 for k, v in large.items()}, "limit_ms": 1e3 * limit_s,
           "limit_tflops": fl["train"] / limit_s / 1e12, "gemm_set_tflops": gemm_flops / t["gemm_set"] / 1e12}
    # How much the layer's own small GEMMs, alone, lose to one large bf16 GEMM: the explanation beside the limit.
    out["gemm_set_pct_of_large_bf16"] = 100 * out["gemm_set_tflops"] / out["large_gemm_tflops"]["bf16"]
    for name in ("ours", "reference"):
        if name in t:
            out[name] = {"ms": 1e3 * t[name], "tflops": fl["train"] / t[name] / 1e12,
                         "pct_of_limit": 100 * limit_s / t[name],
                         "pct_of_gemm_set": 100 * fl["train"] / t[name] / 1e12 / out["gemm_set_tflops"]}
    if "reference" in t:
        out["ours"]["speedup_vs_reference"] = t["reference"] / t["ours"]
    return out


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_tuned = tune_glibc_malloc() if args.malloc_tuning else False
    torch.manual_seed(args.seed)
    T, d = args.tokens, args.hidden
    B, L = batch_shape(T, args.seq_len)
    env = environment()
    env["malloc_tuned"] = malloc_tuned
    print(f"torch {env['torch']}, threads {env['threads']}, cpu {env['cpu']} ({env['cpu_capability']}), "
          f"load average {env['loadavg_at_start']}, glibc malloc tuned: {malloc_tuned}")
    print(f"T={T} (B={B} x L={L}), d={d}, f={args.ffn}, N={args.experts} routed + S={args.shared} shared; "
          f"repeats {args.repeats} (reference {args.ref_repeats}), warm-up {args.warmup}, clock {args.clock}\n")
    results: dict = {"environment": env, "args": vars(args), "configs": {}}
    for name, cfg in layer_configs(args.experts, args.ffn, args.shared).items():
        layer = CoELayer(cfg, d, seed=args.seed)
        ref = ReferenceCoE(cfg, d)
        ref.load_state_dict(layer.hf_state_dict())
        g = torch.Generator().manual_seed(args.seed + 1)
        u_BLD = torch.randn(B, L, d, generator=g)
        grad_BLD = torch.randn(B, L, d, generator=g)

        eq = check_equivalence(layer, ref, u_BLD, grad_BLD)
        fp32 = eq["fp32"]
        ok = max(fp32.values()) < args.tolerance
        eq["fp32_ok"] = ok
        print(f"[{name}] equivalence fp32: out {fp32['out_rel_err']:.1e}, aux {fp32['aux_rel_err']:.1e}, "
              f"grad(u) {fp32['grad_input_rel_err']:.1e}, grad(W) {fp32['grad_param_max_rel_err']:.1e} "
              f"-> {'OK' if ok else 'MISMATCH'} (tol {args.tolerance:g}); "
              f"bf16-autocast out gap {eq['bf16_autocast']['out_rel_err']:.1e}", flush=True)

        fl = layer_flops(cfg, T, d)
        gemm_fn, gemm_flops = make_gemm_set(cfg, T, d)
        large = make_large_gemms(cfg, T, d, fl["train"])
        fns = {"gemm_set": gemm_fn, **{f"large_{k}": fn for k, (fn, _) in large.items()},
               "ours": _step_fn(layer, u_BLD, grad_BLD)}
        if not args.no_reference:
            fns["reference"] = _step_fn(ref, u_BLD, grad_BLD)
        times = interleaved(fns, args.repeats, args.warmup, {"reference": args.ref_repeats}, clock=args.clock)
        large_flops = {k: flops for k, (_, flops) in large.items()}
        row = {"flops": fl, "equivalence": eq, "times": {k: summary(v) for k, v in times.items()},
               "median": _rates(times, statistics.median, fl, gemm_flops, large_flops),
               "best": _rates(times, min, fl, gemm_flops, large_flops)}
        if args.profile:
            row["profile"] = profile_layer(layer, u_BLD, grad_BLD, args.profile)
            print(row["profile"])
        results["configs"][name] = row
    for stat in ("median", "best"):
        print_table(results, stat)
    return results


def print_table(results: dict, stat: str) -> None:
    head = (f"{'layer':<24}{'GFLOP':>7}{'bf16':>7}{'fp32':>7}{'limit ms':>9}{'ms':>7}{'GFLOP/s':>8}{'% limit':>8}"
            f"{'GEMM set':>9}{'set/bf16':>9}{'speed-up':>9}")
    print(f"\nfwd+bwd per step, bf16 autocast, {stat} ({results['args']['clock']} clock, "
          f"{results['environment']['threads']} threads). Limit: the layer's bf16 and float32 FLOPs at the large-"
          f"GEMM rate of each dtype\n(bf16, fp32 columns, GFLOP/s); GEMM set: the layer's own bf16 GEMMs alone "
          f"(GFLOP/s, and as % of the large bf16 GEMM)")
    print(head)
    print("-" * len(head))
    for name, r in results["configs"].items():
        s = r[stat]
        for variant, label in (("ours", name), ("reference", "  reference")):
            if variant not in s:
                continue
            v = s[variant]
            spd = f"{v['speedup_vs_reference']:8.2f}x" if "speedup_vs_reference" in v else f"{'':>9}"
            if variant == "ours":
                large = s["large_gemm_tflops"]
                fixed = (f"{r['flops']['train'] / 1e9:7.1f}{1e3 * large['bf16']:7.1f}{1e3 * large['fp32']:7.1f}"
                         f"{s['limit_ms']:9.0f}")
                explain = f"{1e3 * s['gemm_set_tflops']:9.1f}{s['gemm_set_pct_of_large_bf16']:8.1f}%"
            else:
                fixed, explain = f"{'':>30}", f"{'':>18}"
            print(f"{label:<24}{fixed}{v['ms']:7.0f}{1e3 * v['tflops']:8.1f}{v['pct_of_limit']:7.1f}%{explain}{spd}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layer_shape_args(p, "routed experts N (same for both configs)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--ref-repeats", type=int, default=3, help="timed calls of the (slow) reference")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=1e-5, help="fp32 relative error allowed")
    p.add_argument("--no-reference", action="store_true", help="skip timing the reference")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="print a profiler table")
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: process CPU time (robust to a busy machine at 1 thread)")
    p.add_argument("--malloc-tuning", action="store_true",
                   help="keep large blocks in glibc's heap (mallopt) so big tensors do not page-fault")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "layer.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.seq_len, args.hidden, args.ffn, args.experts = 512, 256, 128, 96, 16
        args.repeats, args.ref_repeats, args.warmup = 3, 2, 1
    results = run(args)
    path = write_json(args.out, results)
    print(f"\nwrote {path}")
    ok = all(r["equivalence"]["fp32_ok"] for r in results["configs"].values())
    if not ok:
        print("FAIL: our layer and the reference path disagree in float32")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
