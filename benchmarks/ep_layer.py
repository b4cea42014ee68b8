"""Expert-parallel layer benchmark: our CoE/MoE layer beside DeepSpeed's `deepspeed.moe.layer.MoE`, 2 ranks.

    torchrun --standalone --nproc_per_node=2 benchmarks/ep_layer.py            # full: T=4096 tokens/rank
    torchrun --standalone --nproc_per_node=2 benchmarks/ep_layer.py --quick    # smoke run
    ... --only "ours MoE(8/64)" "DS   MoE(8/64)" --profile 25                  # some layers, + op profiles

gloo, bf16 autocast over float32 weights, forward + backward of one layer, d=512, f=352, ep_size 2:
  ours  CoE-2(4/64)+1 shared and MoE(8/64)+1 shared (equal FLOPs; no DeepSpeed counterpart: shared experts);
  matched pairs, ours beside DeepSpeed's layer at the same function and FLOPs (no shared expert):
        MoE(2/8), MoE(2/64), and MoE(8/64) (DeepSpeed 0.19.8's TopKGate also has a general top-k path).
Matched layers hold the same router and expert weights (DeepSpeed's experts are coe_dist's SwiGLU, d->f->d);
ours uses norm_topk_prob=true (DeepSpeed renormalises the chosen gates) and inner_residual=false /
outer_residual=true (the residual is the caller's, as for DeepSpeed's layer), so both compute the same
function: output, grad(input) and grad(router, experts) are compared in float32 before timing.

DeepSpeed settings: drop_tokens=False (its dropless mode: capacity = max tokens per expert over the
expert-parallel group, all-reduced every forward, so nothing is dropped and every expert is padded to that
capacity; no capacity factor is involved), top2_2nd_expert_sampling=False and use_rts=False (deterministic
top-k, the same choice as ours), no noisy gate. The input is float32, as our RMSNorm hands it to the CoE block
under autocast; DeepSpeed dispatches it as is (float32 on the wire), ours casts to bf16 before the all-to-all.
Under autocast DeepSpeed's gate matmul runs in bf16 (F.linear is autocast), ours in float32: a few tokens
route differently in bf16, reported beside the check.

Measured per step (one forward + backward): wall time after a barrier, max over ranks; all-to-all seconds
(wall clock around each blocking gloo call, forward and backward, so waiting for the other rank counts:
exposed time) and bytes sent to the other rank (the own slice is not on the wire):
  ours  from `layer.dispatcher.stats` (the data all-to-alls; the tiny per-expert count exchange is excluded);
  DS    by replacing `deepspeed.moe.sharded_moe._AllToAll` with a timed copy (same forward code, backward
        re-enters it like the original). DeepSpeed's own `wall_clock_breakdown` timers see only the two
        forward all-to-alls, not the backward ones, hence the wrapper. Its capacity all-reduce is excluded.
        Bytes = (P-1)/P of the dispatched [E, C, M] tensor x element size; padding = capacity slots minus the
        token copies really routed there (from the gates' expert counts, all-gathered after the step).
Rounds rotate over the layers (a matched pair runs back to back, alternating which goes first) so drift in
the machine's speed hits all alike; the JSON keeps every step and the same-round DS/ours ratios.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

try:
    from benchmarks.common import add_layer_shape_args, batch_shape, environment, exit_without_destructors, write_json
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import add_layer_shape_args, batch_shape, environment, exit_without_destructors, write_json

from coe_dist.config import MoEConfig
from coe_dist.model.coe import CoELayer
from coe_dist.model.experts import SwiGLU
from coe_dist.parallel.groups import init_deepspeed_comm

BF16 = torch.bfloat16
MIB = 2**20
DTYPE_NAMES = {1: "int8", 2: "bf16", 4: "f32", 8: "f64"}


# ----------------------------------------------------------------------------------- DeepSpeed timing

class DSAllToAllRecorder:
    """Calls of DeepSpeed's MoE all-to-all: (phase, shape, element size, seconds), in call order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...], int, float]] = []
        self.phase = "fwd"

    def reset(self) -> None:
        self.calls.clear()

    @contextmanager
    def backward_phase(self):
        previous, self.phase = self.phase, "bwd"
        try:
            yield
        finally:
            self.phase = previous


def install_ds_all_to_all_timer(recorder: DSAllToAllRecorder) -> None:
    """Swap `sharded_moe._AllToAll` (looked up at call time by MOELayer.forward) for a timed copy."""
    from deepspeed.moe import sharded_moe

    original = sharded_moe._AllToAll
    if getattr(original, "_timed", False):
        return

    class TimedAllToAll(torch.autograd.Function):
        _timed = True

        @staticmethod
        def forward(ctx, group, input):  # noqa: A002 - DeepSpeed's signature
            t0 = time.perf_counter()
            out = original.forward(ctx, group, input)  # DeepSpeed's own code: contiguous, empty_like, a2a
            recorder.calls.append((recorder.phase, tuple(input.shape), input.element_size(),
                                   time.perf_counter() - t0))
            return out

        @staticmethod
        def backward(ctx, *grad_output):
            with recorder.backward_phase():
                return (None, TimedAllToAll.apply(ctx.group, *grad_output))

    sharded_moe._AllToAll = TimedAllToAll


# ----------------------------------------------------------------------------------- layers under test

class Ours:
    kind = "ours"

    def __init__(self, cfg: MoEConfig, d: int, seed: int) -> None:
        self.cfg = cfg
        self.module = CoELayer(cfg, d, seed=seed)

    def forward(self, u_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(u_BLD)

    def reset(self) -> None:
        self.module.dispatcher.stats.reset()

    def weight_grads(self) -> dict[str, torch.Tensor]:
        """Router and local expert weight gradients, as [router, w_gate_up [E, 2F, D], w_down [E, D, F]]."""
        m = self.module
        return {"router": m.routers[0].weight.grad, "w13": m.experts.w_gate_up_E2FD.grad,
                "w2": m.experts.w_down_EDF.grad}

    def comm(self) -> dict:
        """This step's all-to-all seconds and bytes from the dispatcher's stats (no collective)."""
        s = self.module.dispatcher.stats.summary()
        seconds = sum(v for k, v in s.items() if k.endswith("/seconds"))
        sent = sum(v for k, v in s.items() if k.endswith("/bytes_sent"))
        calls = sum(v for k, v in s.items() if k.endswith("/calls"))
        rows = sent / (self.module.hidden_size * BF16.itemsize)  # the wire dtype is the compute dtype, bf16
        per_dir = {k.split("/", 2)[2].rsplit("/", 1)[0]: v for k, v in s.items() if k.endswith("/seconds")}
        return {"a2a_s": seconds, "bytes_sent": sent, "padding_bytes": 0.0, "rows_sent": rows,
                "padding_rows": 0.0, "calls": calls, "wire": "bf16", "per_call_s": per_dir}


class DeepSpeedMoE:
    kind = "deepspeed"

    def __init__(self, num_experts: int, k: int, d: int, f: int, ep_size: int,
                 recorder: DSAllToAllRecorder) -> None:
        from deepspeed.moe.layer import MoE

        self.recorder = recorder
        self.ep_size = ep_size
        self.module = MoE(hidden_size=d, expert=SwiGLU(d, f), num_experts=num_experts, ep_size=ep_size, k=k,
                          capacity_factor=1.0, min_capacity=0, drop_tokens=False, use_rts=False,
                          noisy_gate_policy=None, top2_2nd_expert_sampling=False)
        self.module.set_deepspeed_parallelism()  # what deepspeed.initialize does for MoE modules
        self.num_local = self.module.num_local_experts
        self.rank = dist.get_rank(self.module.deepspeed_moe.ep_group)

    @torch.no_grad()
    def load_from(self, ours: CoELayer) -> None:
        """Same router and expert weights as our layer (same expert layout: rank r holds [r*E, (r+1)*E))."""
        f = ours.config.expert_hidden_size
        self.module.deepspeed_moe.gate.wg.weight.copy_(ours.routers[0].weight)
        for e, expert in enumerate(self.module.deepspeed_moe.experts.deepspeed_experts):
            expert.gate_proj.weight.copy_(ours.experts.w_gate_up_E2FD[e, :f])
            expert.up_proj.weight.copy_(ours.experts.w_gate_up_E2FD[e, f:])
            expert.down_proj.weight.copy_(ours.experts.w_down_EDF[e])

    def forward(self, u_BLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, l_aux, _ = self.module(u_BLD)
        return out, l_aux

    def weight_grads(self) -> dict[str, torch.Tensor]:
        """The same gradients in our layout (see `Ours.weight_grads`)."""
        experts = self.module.deepspeed_moe.experts.deepspeed_experts
        return {"router": self.module.deepspeed_moe.gate.wg.weight.grad,
                "w13": torch.stack([torch.cat([e.gate_proj.weight.grad, e.up_proj.weight.grad]) for e in experts]),
                "w2": torch.stack([e.down_proj.weight.grad for e in experts])}

    def reset(self) -> None:
        self.recorder.reset()

    def comm(self) -> dict:
        """This step's all-to-all seconds and bytes. Collective (all-gathers the gates' expert counts)."""
        moe = self.module.deepspeed_moe
        counts_N = moe.exp_counts.detach().to(torch.int64).reshape(1, -1)
        gathered = [torch.empty_like(counts_N) for _ in range(self.ep_size)]
        dist.all_gather(gathered, counts_N, group=moe.ep_group)
        counts_PN = torch.cat(gathered)
        P, r, E = self.ep_size, self.rank, self.num_local
        own = counts_PN[r, r * E:(r + 1) * E].sum().item()
        to_remote = counts_PN[r].sum().item() - own  # my token copies for the other ranks' experts
        from_remote = counts_PN[:, r * E:(r + 1) * E].sum().item() - own  # theirs at my experts
        calls = self.recorder.calls
        assert len(calls) == 4, f"expected 4 DeepSpeed all-to-alls per step, saw {len(calls)}"
        # Call order: fwd dispatch (mine -> theirs), fwd combine (theirs back), then autograd runs them in
        # reverse: bwd of combine (grads of my copies -> theirs), bwd of dispatch (theirs back).
        real_rows = [to_remote, from_remote, to_remote, from_remote]
        out = {"a2a_s": 0.0, "bytes_sent": 0.0, "padding_bytes": 0.0, "rows_sent": 0.0, "padding_rows": 0.0,
               "calls": len(calls), "per_call_s": {}}
        wire = []
        names = ["dispatch_fwd", "combine_fwd", "combine_bwd", "dispatch_bwd"]
        for name, (_phase, shape, elem, secs), real in zip(names, calls, real_rows, strict=True):
            n_experts, capacity, m = shape
            slots = (n_experts - n_experts // P) * capacity  # rows in the chunks for the other ranks
            out["a2a_s"] += secs
            out["bytes_sent"] += slots * m * elem
            out["padding_bytes"] += (slots - real) * m * elem
            out["rows_sent"] += slots
            out["padding_rows"] += slots - real
            out["per_call_s"][name] = secs
            wire.append(DTYPE_NAMES.get(elem, f"{elem}B"))
        out["capacity"] = calls[0][1][1]
        out["wire"] = "/".join(dict.fromkeys(wire))
        out["wire_by_call"] = dict(zip(names, wire, strict=True))
        return out


def zero_grad(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def fwd_bwd(layer, u_BLD: torch.Tensor, grad_BLD: torch.Tensor, autocast: bool, with_aux: bool = True):
    zero_grad(layer.module)
    u = u_BLD.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        h, aux = layer.forward(u)
    if with_aux:
        torch.autograd.backward([h, aux], [grad_BLD, torch.ones_like(aux)])
    else:
        h.backward(grad_BLD)
    return h.detach(), u.grad


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    err = (a.float() - b.float()).abs().max().item()
    return err / scale if scale else err


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_pair(ours: Ours, ds: DeepSpeedMoE, u_BLD, grad_BLD) -> dict:
    """Output and gradient agreement of a matched pair (only the output is back-propagated: the two
    aux losses differ by design). float32: must agree to round-off; bf16 autocast: informational (the gate
    logits of DeepSpeed's layer run in bf16 under autocast, ours in float32, so a few routes can differ)."""
    res = {}
    for mode, autocast in (("fp32", False), ("bf16_autocast", True)):
        h1, g1 = fwd_bwd(ours, u_BLD, grad_BLD, autocast, with_aux=False)
        h2, g2 = fwd_bwd(ds, u_BLD, grad_BLD, autocast, with_aux=False)
        w1, w2 = ours.weight_grads(), ds.weight_grads()
        res[mode] = {"out_max_rel": _max_rel(h1, h2), "grad_in_max_rel": _max_rel(g1, g2),
                     "grad_w_max_rel": max(_max_rel(w1[k], w2[k]) for k in w1),
                     "out_norm_rel": _norm_rel(h1, h2), "grad_in_norm_rel": _norm_rel(g1, g2)}
    # Tokens whose chosen expert set differs between DeepSpeed's gate under autocast and ours (float32).
    with torch.no_grad():
        x_TD, w_ND, k = u_BLD.reshape(-1, u_BLD.shape[-1]), ours.module.routers[0].weight, ours.cfg.top_k
        with torch.autocast("cpu", dtype=BF16):
            ds_logits = torch.nn.functional.linear(x_TD.float(), w_ND.float())  # as TopKGate.forward
        ours_TK = ours.module.routers[0](x_TD).experts_TK.sort(-1).values
        ds_TK = ds_logits.float().topk(k, -1).indices.sort(-1).values
        res["bf16_autocast"]["ds_gate_logits_dtype"] = str(ds_logits.dtype).removeprefix("torch.")
        res["bf16_autocast"]["routes_differ_frac"] = (ours_TK != ds_TK).any(-1).float().mean().item()
    return res


# ----------------------------------------------------------------------------------- benchmark

def build(args, recorder: DSAllToAllRecorder):
    d, f, P = args.hidden, args.ffn, args.ep
    ours_common = dict(expert_hidden_size=f, ep_size=P)
    variants: dict[str, object] = {}
    pairs: list[tuple[str, str, str]] = []  # (setting, ours name, DS name)
    N = args.experts
    for mode in args.dispatch.split(","):  # copies | dedup | dedup-fp8 | copies-fp8: moe.dispatch(_dtype)
        dispatch, _, wire = mode.partition("-")
        suffix = "" if mode == "copies" else f" {mode}"
        wire_keys = dict(dispatch=dispatch, dispatch_dtype=wire or "bf16")
        variants[f"ours CoE-2(4/{N})+1s{suffix}"] = Ours(
            MoEConfig(num_experts=N, top_k=4, iterations=2, num_shared_experts=args.shared, **wire_keys,
                      **ours_common), d, args.seed)
        variants[f"ours MoE(8/{N})+1s{suffix}"] = Ours(
            MoEConfig(num_experts=N, top_k=8, iterations=1, num_shared_experts=args.shared, **wire_keys,
                      **ours_common), d, args.seed)
    matched = [(2, args.small_experts), (2, N)] + ([] if args.skip_top8 else [(8, N)])
    for k, n in matched:
        setting = f"MoE({k}/{n})"
        cfg = MoEConfig(num_experts=n, top_k=k, iterations=1, num_shared_experts=0, norm_topk_prob=True,
                        inner_residual=False, outer_residual=True, **ours_common)
        ours = Ours(cfg, d, args.seed)
        ds = DeepSpeedMoE(n, k, d, f, P, recorder)
        ds.load_from(ours.module)
        variants[f"ours {setting}"] = ours
        variants[f"DS   {setting}"] = ds
        pairs.append((setting, f"ours {setting}", f"DS   {setting}"))
    if args.only:
        keep = [name for name in variants if any(pat in name for pat in args.only)]
        variants = {name: variants[name] for name in keep}
        pairs = [pair for pair in pairs if pair[1] in variants and pair[2] in variants]
    return variants, pairs


def run(args) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    T, d = args.tokens, args.hidden
    B, L = batch_shape(T, args.seq_len)

    recorder = DSAllToAllRecorder()
    install_ds_all_to_all_timer(recorder)
    variants, pairs = build(args, recorder)

    g = torch.Generator().manual_seed(args.seed * 1000 + 17 + rank)  # every rank routes its own tokens
    u_BLD = torch.randn(B, L, d, generator=g)
    grad_BLD = torch.randn(B, L, d, generator=g)

    checks = {setting: check_pair(variants[o], variants[s], u_BLD, grad_BLD) for setting, o, s in pairs}

    names = list(variants)
    # Rounds rotate over groups (a matched pair is one group) so that drift hits all alike; inside a pair the
    # two layers run back to back, ours first in even rounds and DeepSpeed's first in odd ones.
    in_pair = {name for _, o, s in pairs for name in (o, s)}
    groups = [[o, s] for _, o, s in pairs] + [[name] for name in names if name not in in_pair]
    groups.sort(key=lambda grp: names.index(grp[0]))
    per_step: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.warmup + args.repeats):
        shift = r % len(groups)
        order = [name for grp in groups[shift:] + groups[:shift] for name in (grp if r % 2 == 0 else grp[::-1])]
        for name in order:
            layer = variants[name]
            zero_grad(layer.module)
            layer.reset()
            dist.barrier()
            t0 = time.perf_counter()
            fwd_bwd_timed(layer, u_BLD, grad_BLD)
            step_s = time.perf_counter() - t0
            comm = layer.comm()
            if r >= args.warmup:
                per_step[name].append({"step_s": step_s, **comm})

    profiles = {}
    for name in names if args.profile else []:
        from torch.profiler import ProfilerActivity, profile

        layer = variants[name]
        zero_grad(layer.module)
        layer.reset()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fwd_bwd_timed(layer, u_BLD, grad_BLD)
        layer.comm()  # keeps DeepSpeed's count all-gather in step on both ranks
        profiles[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile)

    local = {"rank": rank, "threads": torch.get_num_threads(), "per_step": per_step, "checks": checks,
             "profiles": profiles}
    gathered: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    if rank != 0:
        return None
    results = aggregate(args, gathered, variants, pairs, B, L)
    if args.profile:
        results["profiles_rank0"] = gathered[0]["profiles"]
    return results


def fwd_bwd_timed(layer, u_BLD, grad_BLD) -> None:
    u = u_BLD.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        h, aux = layer.forward(u)
    torch.autograd.backward([h, aux], [grad_BLD, torch.ones_like(aux)])


def aggregate(args, gathered: list[dict], variants: dict, pairs, B: int, L: int) -> dict:
    world = len(gathered)
    results: dict = {
        "environment": environment(),
        "code": code_version(),
        "args": vars(args),
        "world_size": world,
        "threads_per_rank": [g["threads"] for g in gathered],
        "shape": {"tokens_per_rank": B * L, "batch": B, "seq_len": L, "hidden": args.hidden, "ffn": args.ffn},
        "method": {
            "step_time": "forward+backward of one layer after a barrier; per step max over ranks; median",
            "a2a_time": "per step max over ranks of the summed all-to-all wall clock (fwd+bwd, exposed, incl. "
                        "waiting for the other rank); share = median a2a / median step",
            "bytes": "per step per rank (mean over ranks) sent to other ranks, fwd+bwd data all-to-alls",
            "ours_source": "layer.dispatcher.stats (coe_dist.parallel.comm_stats)",
            "deepspeed_source": "timed replacement of deepspeed.moe.sharded_moe._AllToAll; bytes from the "
                                "[E, C, M] dispatched tensor, padding = capacity slots - routed token copies",
            "deepspeed_settings": "drop_tokens=False (capacity = max expert load over the ep group), "
                                  "use_rts=False, top2_2nd_expert_sampling=False, noisy_gate_policy=None",
        },
        "layers": {},
        "matched": {},
    }
    for name, layer in variants.items():
        steps = [g["per_step"][name] for g in gathered]  # [rank][step]
        n = len(steps[0])
        step_max = [max(steps[r][i]["step_s"] for r in range(world)) for i in range(n)]
        a2a_max = [max(steps[r][i]["a2a_s"] for r in range(world)) for i in range(n)]

        def mean_over_ranks(key: str, steps=steps, n=n) -> float:
            return statistics.median(statistics.fmean(steps[r][i][key] for r in range(world)) for i in range(n))

        step_med, a2a_med = statistics.median(step_max), statistics.median(a2a_max)
        row = {
            "kind": layer.kind,
            "step_ms": 1e3 * step_med, "step_ms_min": 1e3 * min(step_max), "step_ms_max": 1e3 * max(step_max),
            "a2a_ms": 1e3 * a2a_med, "a2a_share": a2a_med / step_med,
            "bytes_sent": mean_over_ranks("bytes_sent"), "padding_bytes": mean_over_ranks("padding_bytes"),
            "rows_sent": mean_over_ranks("rows_sent"), "padding_rows": mean_over_ranks("padding_rows"),
            "bytes_sent_per_rank": [steps[r][-1]["bytes_sent"] for r in range(world)],
            "padding_bytes_per_rank": [steps[r][-1]["padding_bytes"] for r in range(world)],
            "a2a_calls_per_step": steps[0][-1]["calls"],
            "wire": steps[0][-1]["wire"],
            "a2a_ms_by_call": {k: 1e3 * statistics.median(max(steps[r][i]["per_call_s"][k] for r in range(world))
                                                          for i in range(n))
                               for k in steps[0][-1]["per_call_s"]},
            "step_ms_all": [1e3 * s for s in step_max],
            "steps": n,
        }
        if layer.kind == "ours":
            cfg = layer.cfg
            row["config"] = {k: getattr(cfg, k) for k in ("num_experts", "top_k", "iterations", "num_shared_experts",
                                                           "expert_hidden_size", "ep_size", "norm_topk_prob",
                                                           "inner_residual", "outer_residual", "capacity_factor")}
        else:
            row["capacity_per_rank"] = [steps[r][-1]["capacity"] for r in range(world)]
            row["wire_by_call"] = steps[0][-1]["wire_by_call"]
            row["config"] = {"num_experts": layer.module.num_experts, "k": layer.module.deepspeed_moe.gate.k,
                             "ep_size": layer.ep_size, "drop_tokens": False, "use_rts": False,
                             "top2_2nd_expert_sampling": False, "capacity_factor": 1.0, "min_capacity": 0}
        results["layers"][name] = row
    tol = args.tolerance
    for setting, o, s in pairs:
        checks = [g["checks"][setting] for g in gathered]
        fp32_err = max(max(c["fp32"][k] for k in ("out_max_rel", "grad_in_max_rel", "grad_w_max_rel"))
                       for c in checks)
        # Same-round ratios: the two layers of a pair run back to back in every round, so slow drift of the
        # machine's speed between rounds cancels in each ratio.
        ours_ms, ds_ms = results["layers"][o]["step_ms_all"], results["layers"][s]["step_ms_all"]
        paired = [b / a for a, b in zip(ours_ms, ds_ms, strict=True)]
        results["matched"][setting] = {
            "ours": o, "deepspeed": s,
            "speedup": results["layers"][s]["step_ms"] / results["layers"][o]["step_ms"],
            "speedup_paired_median": statistics.median(paired),
            "speedup_paired_range": [min(paired), max(paired)],
            "rounds_ours_faster": sum(r > 1 for r in paired), "rounds": len(paired),
            "bytes_ratio_ds_over_ours": results["layers"][s]["bytes_sent"] / results["layers"][o]["bytes_sent"],
            "equivalence": checks, "fp32_max_rel_err": fp32_err, "fp32_ok": fp32_err < tol,
        }
    results["dispatch_modes"] = dispatch_mode_ratios(results["layers"])
    m = results["matched"]
    results["target"] = {
        "ours_faster_at_every_matched_setting": all(v["speedup"] > 1 for v in m.values()),
        "ours_zero_padding_bytes": all(r["padding_bytes"] == 0 for r in results["layers"].values()
                                       if r["kind"] == "ours"),
        "matched_outputs_agree_fp32": all(v["fp32_ok"] for v in m.values()),
    }
    return results


def dispatch_mode_ratios(layers: dict) -> dict:
    """Each `--dispatch` mode against copies, same model: same-round ratios (medians) of step time, exposed
    all-to-all time (per step medians) and bytes sent."""
    out = {}
    for name, row in layers.items():
        base, _, mode = name.partition("+1s ")
        if not mode or f"{base}+1s" not in layers:
            continue
        ref = layers[f"{base}+1s"]
        out[name] = {
            "step_ratio_paired_median": statistics.median(
                a / b for a, b in zip(row["step_ms_all"], ref["step_ms_all"], strict=True)),
            "step_ms": row["step_ms"], "copies_step_ms": ref["step_ms"],
            "a2a_ms": row["a2a_ms"], "copies_a2a_ms": ref["a2a_ms"],
            "bytes_ratio": row["bytes_sent"] / ref["bytes_sent"],
        }
    return out


def code_version() -> dict:
    """The commit and the uncommitted files of the code under test (the tree changes between runs)."""
    import subprocess

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD").strip(),
            "uncommitted_coe_dist": git("status", "--porcelain", "--", "../coe_dist").splitlines()}


def print_table(results: dict, args) -> None:
    sh = results["shape"]
    n = next(iter(results["layers"].values()))["steps"]
    print(f"\nfwd+bwd of one layer, {results['world_size']} ranks (gloo, {results['threads_per_rank'][0]} thread/rank),"
          f" ep {args.ep}, bf16 autocast, fp32 input; T={sh['tokens_per_rank']} tokens/rank, d={sh['hidden']}, "
          f"f={sh['ffn']}")
    print(f"medians of {n} steps after {args.warmup} warm-up rounds; step and a2a ms: max over ranks; "
          "MiB: sent per rank per step (fwd+bwd)")
    head = (f"{'layer':<32}{'step ms':>9}{'a2a ms':>8}{'a2a %':>7}{'MiB sent':>10}{'pad MiB':>9}{'pad %':>7}"
            f"{'wire':>10}{'cap':>6}{'DS/ours':>12}")
    print(head)
    print("-" * len(head))
    speedup_of = {v["ours"]: v["speedup"] for v in results["matched"].values()}
    for name, r in results["layers"].items():
        pad_pct = 100 * r["padding_bytes"] / r["bytes_sent"] if r["bytes_sent"] else 0.0
        cap = str(max(r["capacity_per_rank"])) if "capacity_per_rank" in r else "-"
        spd = f"{speedup_of[name]:.2f}x" if name in speedup_of else ""
        print(f"{name:<32}{r['step_ms']:9.1f}{r['a2a_ms']:8.1f}{100 * r['a2a_share']:6.1f}%"
              f"{r['bytes_sent'] / MIB:10.2f}{r['padding_bytes'] / MIB:9.2f}{pad_pct:6.1f}%{r['wire']:>10}{cap:>6}"
              f"{spd:>12}")
    print("\nmatched settings (same weights; fp32 check of output, grad(input), grad(router, experts): max rel err):")
    for setting, v in results["matched"].items():
        ok = "OK" if v["fp32_ok"] else "MISMATCH"
        bf = max(c["bf16_autocast"]["out_norm_rel"] for c in v["equivalence"])
        flips = max(c["bf16_autocast"]["routes_differ_frac"] for c in v["equivalence"])
        print(f"  {setting:<10} DS/ours step time {v['speedup']:.2f}x (same-round ratios: median "
              f"{v['speedup_paired_median']:.2f}x, ours faster in {v['rounds_ours_faster']}/{v['rounds']} rounds); "
              f"DS sends {v['bytes_ratio_ds_over_ours']:.2f}x the bytes;\n"
              f"  {'':<10} fp32 {v['fp32_max_rel_err']:.1e} {ok}; bf16-autocast: out gap (norm) {bf:.1e}, "
              f"{100 * flips:.1f}% of tokens routed differently (DS gate logits in bf16)")
    for name, v in results["dispatch_modes"].items():
        print(f"  {name}: step time {v['step_ratio_paired_median']:.3f}x copies (same-round median), "
              f"a2a {v['a2a_ms']:.1f} vs {v['copies_a2a_ms']:.1f} ms, bytes {v['bytes_ratio']:.3f}x")
    t = results["target"]
    faster = "YES" if t["ours_faster_at_every_matched_setting"] else "NO"
    print(f"target: ours faster at every matched setting: {faster}; "
          f"zero padding bytes (ours): {'YES' if t['ours_zero_padding_bytes'] else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layer_shape_args(p, "routed experts N of the large settings")
    p.add_argument("--small-experts", type=int, default=8, help="routed experts of the small matched setting")
    p.add_argument("--ep", type=int, default=0, help="expert-parallel size (default: world size)")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per layer")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--skip-top8", action="store_true", help="skip the matched MoE(8/N) pair")
    p.add_argument("--tolerance", type=float, default=1e-5, help="fp32 relative error allowed (matched pairs)")
    p.add_argument("--only", nargs="+", metavar="SUBSTRING",
                   help="time only the layers whose name contains one of these (e.g. 'MoE(8/64)' 'CoE')")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile one step of every layer and print ROWS ops (rank 0)")
    p.add_argument("--quick", action="store_true", help="fewer tokens and steps (smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dispatch", default="copies",
                   help="comma-separated moe.dispatch modes for our CoE-2(4/N) and MoE(8/N) layers: copies, dedup, "
                        "dedup-fp8, copies-fp8 (ratios against copies in the JSON's dispatch_modes)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ep_layer.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.seq_len, args.repeats, args.warmup = 1024, 256, 3, 1

    dist.init_process_group("gloo")
    import deepspeed

    # deepspeed.init_distributed as the trainer calls it (without DeepSpeed's shared-memory op, which only its
    # inference all-reduce uses and which it would JIT-build at every start).
    init_deepspeed_comm("gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    args.ep = args.ep or dist.get_world_size()
    if args.ep < 2 or dist.get_world_size() % args.ep:
        raise SystemExit(f"--ep {args.ep}: need an expert-parallel size >= 2 dividing the world size "
                         f"{dist.get_world_size()}; launch with torchrun --nproc_per_node=2")
    torch.manual_seed(args.seed)
    results = run(args)
    status = 0
    if results is not None:
        env = results["environment"]
        print(f"torch {env['torch']}, deepspeed {deepspeed.__version__}, cpu {env['cpu']} "
              f"({env['cpu_capability']})")
        results["environment"]["deepspeed"] = deepspeed.__version__
        for name, table in results.get("profiles_rank0", {}).items():
            print(f"\n=== profile, rank 0: {name}\n{table}")
        print_table(results, args)
        path = write_json(args.out, results)
        print(f"\nwrote {path}")
        status = 0 if results["target"]["matched_outputs_agree_fp32"] else 1
    flag = torch.tensor([status])
    dist.broadcast(flag, 0)
    dist.barrier()
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    exit_without_destructors(main())
