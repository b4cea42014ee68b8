"""Overlap of the expert-parallel all-to-alls with compute: exposed against in-flight all-to-all time.

    torchrun --standalone --nproc_per_node=2 benchmarks/overlap.py     # ep 2
    torchrun --standalone --nproc_per_node=4 benchmarks/overlap.py     # ep 4 (added to the same JSON)
    torchrun --standalone --nproc_per_node=2 benchmarks/overlap.py --tokens 512 --repeats 2 --warmup 1  # smoke

One CoE-2(4/64) layer + 1 shared expert, d=512, f=352, 4096 tokens per rank, bf16 autocast over fp32
weights, gloo, ep = world size (torchrun gives each rank one thread); forward + backward of the same weights
under four settings:
    sync      moe.overlap=false: every all-to-all waited for as soon as it is issued (the path before overlap)
    shared    moe.overlap=true: the shared expert runs while the dispatch all-to-all is in flight
    chunks2   + moe.a2a_chunks=2: chunk c+1's dispatch is in flight while chunk c's experts run
    chunks4   + moe.a2a_chunks=4
Measured per step and rank, over the data all-to-alls of forward and backward (the small per-iteration count
exchange is excluded):
    step       wall time of forward + backward after a barrier
    exposed    wall time blocked in the all-to-alls' wait() (`layer.dispatcher.stats`): what overlap leaves
    in flight  issue-to-completion time of the same all-to-alls, taken from gloo's completion callbacks
               (`layer.dispatcher.in_flight_s`); a sum, so two exchanges in flight at once count twice
    hidden     1 - exposed / in flight (median over steps of each); about 0 for sync, where exposed can even
               exceed in flight a little (it also counts waking up after the completion)
Per step the max over ranks; then median, min and max over steps. Settings run round-robin, rotated every
round, so drift in the machine's speed hits all alike. Before timing, one float32 step of every setting is
compared with sync (output, input and weight gradients; max relative error; chunks only change the order of
some float32 sums).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

try:
    from benchmarks.common import add_layer_shape_args, batch_shape, environment, exit_without_destructors, write_json
    from benchmarks.ep_layer import code_version, zero_grad
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import add_layer_shape_args, batch_shape, environment, exit_without_destructors, write_json
    from ep_layer import code_version, zero_grad

from coe_dist.config import MoEConfig
from coe_dist.model.coe import CoELayer

BF16 = torch.bfloat16
SETTINGS: dict[str, dict] = {
    "sync": dict(overlap=False),
    "shared": dict(overlap=True),
    "chunks2": dict(overlap=True, a2a_chunks=2),
    "chunks4": dict(overlap=True, a2a_chunks=4),
}


def build(args) -> dict[str, CoELayer]:
    """One layer per setting, same seed: the same router, expert and shared weights in every one."""
    common = dict(num_experts=args.experts, top_k=4, iterations=2, num_shared_experts=args.shared,
                  expert_hidden_size=args.ffn, ep_size=dist.get_world_size())
    return {name: CoELayer(MoEConfig(**common, **extra), args.hidden, seed=args.seed)
            for name, extra in SETTINGS.items()}


def fwd_bwd(layer: CoELayer, u_BLD: torch.Tensor, grad_BLD: torch.Tensor, autocast: bool = True):
    zero_grad(layer)
    u = u_BLD.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        h, aux = layer(u)
    torch.autograd.backward([h, aux], [grad_BLD, torch.ones_like(aux)])
    return h.detach(), u.grad


def reset(layer: CoELayer) -> None:
    layer.dispatcher.stats.reset()
    layer.dispatcher.in_flight_s.clear()


def comm(layer: CoELayer) -> dict:
    """This step's exposed and in-flight seconds, per direction (dispatch_fwd, ...) and in total."""
    exposed: dict[str, float] = {}
    for (_, direction), rec in layer.dispatcher.stats.records.items():
        exposed[direction] = exposed.get(direction, 0.0) + rec.seconds
    in_flight: dict[str, float] = {}
    for (_, direction), seconds in layer.dispatcher.in_flight_s.items():
        in_flight[direction] = in_flight.get(direction, 0.0) + seconds
    calls = sum(rec.calls for rec in layer.dispatcher.stats.records.values())
    return {"exposed_s": sum(exposed.values()), "in_flight_s": sum(in_flight.values()), "calls": calls,
            "exposed_s_by_direction": exposed, "in_flight_s_by_direction": in_flight}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    err = (a.float() - b.float()).abs().max().item()
    return err / scale if scale else err


def check(layers: dict[str, CoELayer], u_BLD: torch.Tensor, grad_BLD: torch.Tensor) -> dict[str, float]:
    """float32 max relative error of every setting against sync: output, input grad, every weight grad."""
    def run(layer: CoELayer) -> list[torch.Tensor]:
        h, g = fwd_bwd(layer, u_BLD, grad_BLD, autocast=False)
        return [h, g] + [p.grad.clone() for p in layer.parameters()]

    want = run(layers["sync"])
    return {name: max(_max_rel(a, b) for a, b in zip(run(layer), want, strict=True))
            for name, layer in layers.items() if name != "sync"}


def run(args) -> dict | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    B, L = batch_shape(args.tokens, args.seq_len)
    layers = build(args)
    g = torch.Generator().manual_seed(args.seed * 1000 + 17 + rank)  # every rank routes its own tokens
    u_BLD = torch.randn(B, L, args.hidden, generator=g)
    grad_BLD = torch.randn(B, L, args.hidden, generator=g)
    errors = check(layers, u_BLD, grad_BLD)

    names = list(layers)
    per_step: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(args.warmup + args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            layer = layers[name]
            reset(layer)
            dist.barrier()
            t0 = time.perf_counter()
            fwd_bwd(layer, u_BLD, grad_BLD)
            step_s = time.perf_counter() - t0
            if r >= args.warmup:
                per_step[name].append({"step_s": step_s, **comm(layer)})

    local = {"threads": torch.get_num_threads(), "per_step": per_step, "errors": errors}
    gathered: list[dict] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    return aggregate(args, gathered, layers, B, L) if rank == 0 else None


def spread_ms(values: list[float]) -> dict:
    return {"median": 1e3 * statistics.median(values), "min": 1e3 * min(values), "max": 1e3 * max(values),
            "all": [1e3 * v for v in values]}


def aggregate(args, gathered: list[dict], layers: dict[str, CoELayer], B: int, L: int) -> dict:
    world = len(gathered)
    out: dict = {
        "environment": environment(),
        "code": code_version(),
        "args": vars(args),
        "world_size": world,
        "ep_size": world,
        "threads_per_rank": [g["threads"] for g in gathered],
        "shape": {"tokens_per_rank": B * L, "batch": B, "seq_len": L, "hidden": args.hidden, "ffn": args.ffn},
        "method": {
            "step": "forward+backward of one layer after a barrier; per step max over ranks",
            "exposed": "wall time blocked in wait() of the data all-to-alls (fwd+bwd); per step max over ranks",
            "in_flight": "issue-to-completion time of the same all-to-alls (gloo completion callbacks), summed; "
                         "per step max over ranks",
            "hidden_share": "1 - median exposed / median in flight",
            "fp32_max_rel_err_vs_sync": "one float32 step per setting against sync, max over ranks of the max "
                                        "relative error over output, input grad and weight grads",
        },
        "settings": {},
    }
    for name, layer in layers.items():
        steps = [g["per_step"][name] for g in gathered]  # [rank][step]
        n = len(steps[0])

        def per_step_max(key: str, steps=steps, n=n) -> list[float]:
            return [max(steps[r][i][key] for r in range(world)) for i in range(n)]

        def by_direction(key: str, steps=steps, n=n) -> dict[str, float]:
            directions = steps[0][0][key]
            return {d: 1e3 * statistics.median(max(steps[r][i][key][d] for r in range(world)) for i in range(n))
                    for d in directions}

        exposed, in_flight = per_step_max("exposed_s"), per_step_max("in_flight_s")
        cfg = layer.config
        out["settings"][name] = {
            "config": {k: getattr(cfg, k) for k in ("num_experts", "top_k", "iterations", "num_shared_experts",
                                                     "expert_hidden_size", "ep_size", "overlap", "a2a_chunks")},
            "step_ms": spread_ms(per_step_max("step_s")),
            "exposed_ms": spread_ms(exposed),
            "in_flight_ms": spread_ms(in_flight),
            "hidden_share": 1 - statistics.median(exposed) / statistics.median(in_flight),
            "exposed_ms_by_direction": by_direction("exposed_s_by_direction"),
            "in_flight_ms_by_direction": by_direction("in_flight_s_by_direction"),
            "a2a_calls_per_step": steps[0][0]["calls"],
            "fp32_max_rel_err_vs_sync": (max(g["errors"][name] for g in gathered) if name != "sync" else 0.0),
            "steps": n,
        }
    return out


def print_table(results: dict) -> None:
    sh, settings = results["shape"], results["settings"]
    n = next(iter(settings.values()))["steps"]
    print(f"\nfwd+bwd of one CoE-2(4/{settings['sync']['config']['num_experts']}) layer + "
          f"{settings['sync']['config']['num_shared_experts']} shared, ep {results['ep_size']} (gloo, "
          f"{results['threads_per_rank'][0]} thread/rank), bf16 autocast; T={sh['tokens_per_rank']} tokens/rank, "
          f"d={sh['hidden']}, f={sh['ffn']}; medians of {n} steps [min-max], max over ranks")
    head = (f"{'setting':<9}{'step ms':>9}{'[min-max]':>17}{'exposed a2a ms':>16}{'in flight ms':>14}"
            f"{'hidden':>8}{'vs sync':>9}{'fp32 err':>10}")
    print(head)
    print("-" * len(head))
    sync_ms = settings["sync"]["step_ms"]["median"]
    for name, s in settings.items():
        step = s["step_ms"]
        spread = f"[{step['min']:.0f}-{step['max']:.0f}]"
        print(f"{name:<9}{step['median']:9.1f}{spread:>17}"
              f"{s['exposed_ms']['median']:16.1f}{s['in_flight_ms']['median']:14.1f}"
              f"{100 * s['hidden_share']:7.1f}%{sync_ms / step['median']:8.2f}x{s['fp32_max_rel_err_vs_sync']:10.1e}")


def save(path: str, results: dict) -> Path:
    """Results of each ep size under its own key ("ep2", "ep4"): runs at other sizes stay in the file."""
    existing = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    existing[f"ep{results['ep_size']}"] = results
    return write_json(path, existing)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layer_shape_args(p)
    p.add_argument("--repeats", type=int, default=15, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="fp32 max relative error allowed against sync (exit 1 above it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "overlap.json"))
    args = p.parse_args(argv)

    dist.init_process_group("gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    if dist.get_world_size() < 2:
        raise SystemExit("benchmarks/overlap.py needs ep >= 2: launch with torchrun --nproc_per_node=2 (or 4)")
    torch.manual_seed(args.seed)
    results = run(args)
    status = 0
    if results is not None:
        env = results["environment"]
        print(f"torch {env['torch']}, cpu {env['cpu']} ({env['cpu_capability']}), load {env['loadavg_at_start']}")
        print_table(results)
        print(f"\nwrote {save(args.out, results)}")
        worst = max(s["fp32_max_rel_err_vs_sync"] for s in results["settings"].values())
        status = 0 if worst < args.tolerance else 1
    flag = torch.tensor([status])
    dist.broadcast(flag, 0)
    dist.barrier()
    dist.destroy_process_group()
    return int(flag.item())


if __name__ == "__main__":
    exit_without_destructors(main())
