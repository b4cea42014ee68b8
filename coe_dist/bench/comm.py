"""`coe-dist bench comm`: run a grid of CoE layer cases on every rank of the job and measure each phase.

Each rank runs this (torchrun, srun, mpirun: `coe_dist.launcher.discover()`). Per case, the world is split
into expert-parallel groups of `ep_size` consecutive ranks (all groups of all sizes are created up front,
by every rank, in the same order). Cases run round-robin (the order rotates every round) after the
warm-up rounds, so drift in the machine's speed hits all cases alike; rank 0 gathers every measurement
and writes the outputs (see outputs.py, plots.py, report.py).

`--calibrate` adds microbenchmarks (all-to-all at several message sizes, grouped expert GEMMs at several
sizes) and writes a cluster profile YAML fitted from them and from the grid (local phases).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from coe_dist.bench import outputs
from coe_dist.bench.grid import DTYPES, BenchCase, stable_seed, validate_case
from coe_dist.bench.layer import BenchLayer, _Tape, backward
from coe_dist.bench.machine import cpu_model, load_average
from coe_dist.bench.model import COMM_PHASES, Affine, Profile, call_site_overheads, fit_linear, fit_link, fit_profile
from coe_dist.bench.timing import PhaseTimer, barrier, wall

# ---------------------------------------------------------------- process group

def start(backend: str = "auto", device: str = "auto", timeout_s: float = 300.0):
    """Join the job's process group. Returns (rank, world, local_rank, device, backend)."""
    from coe_dist.launcher import discover, init_distributed, pick_backend

    penv = discover()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(penv.local_rank)
        dev = torch.device("cuda", penv.local_rank)
    else:
        dev = torch.device("cpu")
    chosen = pick_backend(backend, dev.type)
    init_distributed(penv, chosen, timeout_s)
    return penv.rank, penv.world_size, penv.local_rank, dev, chosen


def node_layout() -> tuple[list[str], int]:
    """Host name of every rank and the number of ranks on the busiest node."""
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts, max(hosts.count(h) for h in set(hosts))


def make_groups(sizes: list[int], world: int, rank: int) -> dict[int, Any]:
    """This rank's expert-parallel group for every size: consecutive ranks, as `groups.py` lays them out.
    Every rank calls new_group for every group, in the same order (torch.distributed requires it)."""
    mine: dict[int, Any] = {}
    for P in sorted(set(sizes)):
        if P == world:
            mine[P] = dist.group.WORLD
            continue
        for g in range(world // P):
            ranks = list(range(g * P, (g + 1) * P))
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[P] = group
    return mine


def node_local_groups(sizes: list[int], world: int, ranks_per_node: int, rank: int) -> dict[int, Any | None]:
    """Groups for the link sweep: P consecutive ranks inside one node, as many as fit in each node; a rank
    left over (P not dividing the ranks per node) gets None and waits while the others measure. Every
    rank calls new_group for every group, in the same order."""
    mine: dict[int, Any | None] = {}
    for P in sorted(set(sizes)):
        mine[P] = None
        for node_start in range(0, world, ranks_per_node):
            for start in range(node_start, node_start + ranks_per_node - P + 1, P):
                ranks = list(range(start, start + P))
                group = dist.group.WORLD if P == world else dist.new_group(ranks)
                if rank in ranks:
                    mine[P] = group
    return mine


def _threads(requested: int | None, ranks_per_node: int, device: torch.device) -> int:
    if device.type == "cuda":
        return torch.get_num_threads()
    n = requested or max(1, (os.cpu_count() or 1) // ranks_per_node)
    torch.set_num_threads(n)
    return n


def environment(world: int, ranks_per_node: int, threads: int, device: torch.device, backend: str,
                hosts: list[str]) -> dict[str, Any]:
    meta = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "world": world, "nodes": len(set(hosts)), "ranks_per_node": ranks_per_node,
        "threads_per_rank": threads, "cores_per_node": os.cpu_count() or 1, "device": str(device),
        "backend": backend, "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_model(),
        "hosts": sorted(set(hosts)),
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    meta["load_average"] = load_average()
    return meta


# ---------------------------------------------------------------- the grid

class CaseState:
    def __init__(self, case: BenchCase, rank: int, group, device: torch.device, seed: int) -> None:
        self.case, self.group, self.device = case, group, device
        ep_rank = dist.get_rank(group)
        self.layers = [BenchLayer(case, layer, ep_rank, device, stable_seed(seed, case.key), rank)
                       for layer in range(case.layers)]
        gen = torch.Generator().manual_seed(stable_seed(seed, case.key, "input", rank))
        self.x = torch.randn(case.tokens, case.hidden, generator=gen).to(device)
        self.grad = torch.randn(case.tokens, case.hidden, generator=gen).to(device)

    def step(self) -> tuple[list, float]:
        timer = PhaseTimer(self.device)
        tape = _Tape()
        barrier(dist.group.WORLD, self.device)
        t0 = wall()
        h = self.x
        for layer in self.layers:
            h = layer.forward(h, tape, timer, self.group)
        backward(tape, h, self.grad, timer, self.group, self.device)
        records = timer.resolve()
        return records, wall() - t0


def run_grid(cases: list[BenchCase], *, rank: int, world: int, device: torch.device, groups: dict[int, Any],
             warmup: int, repeats: int, seed: int = 0, log=print) -> tuple[list[dict], dict[str, list[float]]]:
    """Every case `warmup + repeats` times, round-robin; returns this rank's measurement rows and step walls."""
    states = [CaseState(c, rank, groups[c.ep_size], device, seed) for c in cases]
    rows: list[dict] = []
    walls: dict[str, list[float]] = {c.key: [] for c in cases}
    t_start = time.perf_counter()
    for r in range(warmup + repeats):
        shift = r % len(states)
        for st in states[shift:] + states[:shift]:
            records, step_wall = st.step()
            if r < warmup:
                continue
            walls[st.case.key].append(step_wall)
            for rec in records:
                rows.append({"case": st.case.key, "rank": rank, "repeat": r - warmup, "layer": rec.layer,
                             "iteration": rec.iteration, "phase": rec.phase, "direction": rec.direction,
                             "seconds": rec.seconds, "bytes_sent": rec.bytes_sent,
                             "bytes_received": rec.bytes_received, "rows": rec.rows})
        if rank == 0 and (r + 1) % max(1, (warmup + repeats) // 4) == 0:
            log(f"bench: round {r + 1}/{warmup + repeats} ({time.perf_counter() - t_start:.1f} s)")
    return rows, walls


def gather_rows(rows: list[dict], walls: dict[str, list[float]], rank: int) -> tuple[list[dict], dict]:
    """All ranks' rows on rank 0 (others get empty results); step walls are rank 0's."""
    everything: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(rows, everything, dst=0)
    if rank != 0:
        return [], {}
    return [r for part in everything for r in part], walls


# ---------------------------------------------------------------- calibration microbenchmarks

def _medians(times: list[float], idle: bool = False) -> tuple[float, float]:
    """Median over repeats of the fastest and of the slowest rank's time (all ranks of the world that
    measured: an idle rank's inf / -inf never wins the min / max)."""
    lo = torch.tensor(times, dtype=torch.float64)
    hi = lo.clone()
    if idle:
        lo.fill_(math.inf)
        hi.fill_(-math.inf)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return statistics.median(lo.tolist()), statistics.median(hi.tolist())


def calibrate_a2a(groups: dict[int, Any | None], device: torch.device, dtype: torch.dtype, sizes: list[int],
                  repeats: int, warmup: int = 2) -> list[dict]:
    """Even all-to-all in every group size at every message size (bytes each rank holds, own slice
    included); returns rows (P, bytes_total, bytes_offrank, seconds = median of the fastest rank, and of
    the slowest). Ranks of different groups of one size run at the same time, as in the bench; a rank in no
    group of a size (None) only keeps the barriers."""
    from coe_dist.parallel.dispatch import _all_to_all

    el = torch.tensor([], dtype=dtype).element_size()
    out = []
    for P, group in sorted(groups.items()):
        if P < 2:
            continue
        for size in sizes:
            rows_per_peer = max(1, size // (el * P * 64))
            x = torch.randn(rows_per_peer * P, 64, device=device).to(dtype)
            splits = [rows_per_peer] * P
            times = []
            for i in range(warmup + repeats):
                barrier(dist.group.WORLD, device)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                if group is not None:
                    _all_to_all(x, splits, splits, group)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            total = rows_per_peer * P * 64 * el
            fastest, slowest = _medians(times, idle=group is None)
            out.append({"P": P, "bytes_total": total, "bytes_offrank": total * (P - 1) // P,
                        "seconds": fastest, "seconds_slowest_rank": slowest})
    return out


def calibrate_gemm(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int]], rows: list[int],
                   experts: list[int], repeats: int, warmup: int = 2) -> list[dict]:
    """Grouped SwiGLU experts forward and backward (the bench's expert phase) on every rank at once, for
    every (d, f) shape, number of local experts and total rows."""
    out = []
    for E in experts:
        out += _calibrate_gemm(device, dtype, shapes, rows, E, repeats, warmup)
    return out


def _calibrate_gemm(device, dtype, shapes, rows, experts: int, repeats: int, warmup: int) -> list[dict]:
    from coe_dist.model.experts import GroupedExperts

    out = []
    for d, f in shapes:
        ex = GroupedExperts(experts, d, f).to(device=device, dtype=dtype)
        with torch.no_grad():
            for p in ex.parameters():
                p.normal_(0, 0.02)
        for R in rows:
            counts = torch.full((experts,), R // experts, dtype=torch.int64, device=device)
            x = torch.randn(int(counts.sum()), d, device=device).to(dtype).requires_grad_(True)
            g = torch.randn(x.shape[0], d, device=device).to(dtype)
            tf, tb = [], []
            for i in range(warmup + repeats):
                barrier(dist.group.WORLD, device)
                t0 = time.perf_counter()
                y = ex(x, counts)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                torch.autograd.grad(y, [x, *ex.parameters()], g)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t2 = time.perf_counter()
                if i >= warmup:
                    tf.append(t1 - t0)
                    tb.append(t2 - t1)
            rows_total = int(counts.sum())
            (fwd, fwd_slow), (bwd, bwd_slow) = _medians(tf), _medians(tb)
            out.append({"d": d, "f": f, "experts": experts, "rows": rows_total,
                        "flops_fwd": 6.0 * rows_total * d * f,
                        "weight_bytes": 3.0 * experts * d * f * x.element_size(), "fwd_s": fwd, "bwd_s": bwd,
                        "fwd_s_slowest_rank": fwd_slow, "bwd_s_slowest_rank": bwd_slow})
    return out


def build_profile(name: str, run: dict[str, Any], a2a: list[dict], gemm: list[dict], dtype: str) -> Profile:
    """Profile of this machine from the fastest rank's times (a rank with a core to itself): the link from
    the all-to-all sweep, the expert GEMMs from the GEMM sweep, the other local phases and the call-site
    overheads of the data all-to-alls (residuals over the swept link) from the grid run."""
    meta = run["meta"]
    kind = "gpu" if str(meta["device"]).startswith("cuda") else "cpu"
    src = f"measured by `coe-dist bench comm --calibrate` on {meta['date']} ({meta['world']} ranks, {meta['cpu']})"
    sizes = {r["P"] for r in a2a}
    latency_model = ("both" if len(sizes) > 1 else "per_peer") if kind == "cpu" else "fixed"
    link = fit_link([(r["P"] - 1, r["bytes_offrank"], r["seconds"]) for r in a2a],
                    latency_model=latency_model, source=src + f"; all-to-all sweep (fastest rank), latency "
                                                              f"model {latency_model}")
    obs = outputs.observations(run, "min")
    grid_prof = fit_profile(obs, name=name, latency_model=latency_model if latency_model != "both" else "per_peer",
                            cores_per_node=meta["cores_per_node"], threads_per_rank=meta["threads_per_rank"],
                            ranks_per_node=meta["ranks_per_node"], source=src + "; bench grid (fastest rank)")
    phases = {k: v for k, v in grid_prof.phases.items() if k.rsplit("_", 1)[0] not in COMM_PHASES}
    # Call-site overheads and host sync: what the grid's all-to-alls took beyond the swept link.
    overheads, host_sync = call_site_overheads(link, obs, latency_model, src)
    phases.update(overheads)
    # Expert phases from the GEMM sweep: fixed + FLOPs + local expert weight bytes.
    X = np.array([[1.0, r["flops_fwd"], r["weight_bytes"]] for r in gemm])
    cf = fit_linear(X, np.array([r["fwd_s"] for r in gemm]))
    cb = fit_linear(X * np.array([1.0, 2.0, 1.0]), np.array([r["bwd_s"] for r in gemm]))
    phases["experts_fwd"] = Affine(float(cf[0]), float(cf[1]), src + "; grouped-GEMM sweep, forward (units: FLOPs; "
                                   "units2: local expert weight bytes)", float(cf[2]))
    phases["experts_bwd"] = Affine(float(cb[0]), float(cb[1]), src + "; grouped-GEMM sweep, backward (units: FLOPs; "
                                   "units2: local expert weight bytes)", float(cb[2]))
    return Profile(
        name=name, kind=kind, ranks_per_node=meta["ranks_per_node"],
        cores_per_node=meta["cores_per_node"] if kind == "cpu" else None,
        threads_per_rank=meta["threads_per_rank"] if kind == "cpu" else None, dtype=dtype,
        links={"intra": link}, gemm={dtype: Affine(float(cf[0]), float(cf[1]), src + "; grouped-GEMM sweep, forward")},
        host_sync_s=host_sync, phases=phases,
        description=(f"Measured on {', '.join(meta['hosts'])}: {meta['cpu']} ({meta['cores_per_node']} cores), "
                     f"torch {meta['torch']}, {meta['backend']}, {meta['world']} ranks x "
                     f"{meta['threads_per_rank']} thread(s); fastest-rank times, i.e. a rank with a core to "
                     f"itself (the model multiplies by the oversubscription when ranks share cores)."),
        sources={"links.intra": link.source, "gemm": src + "; grouped-GEMM sweep",
                 "phases": src + "; bench grid fit and GEMM sweep",
                 "host_sync_s": src + "; median residual of the grid's count exchanges over the swept link "
                                      "(the .tolist() host sync and the call's own overhead)"},
    )


def profile_from_run(run_dir: str | Path, name: str) -> Profile:
    """Rebuild the profile of a calibrated run from its summary.json (no new measurements)."""
    run = outputs.load_run(run_dir)
    cal = run.get("calibration")
    if not cal:
        raise ValueError(f"{run_dir}: no calibration data (run `coe-dist bench comm --calibrate`)")
    return build_profile(name, run, cal["a2a"], cal["gemm"], run["cases"][0]["config"]["dtype"])


# ---------------------------------------------------------------- entry point

def run(args) -> int:
    """The body of `coe-dist bench comm` on one rank (args from cli.py)."""
    from coe_dist.bench.grid import load_grid

    cases, settings = load_grid(args.grid, args.grid_overrides)
    warmup = args.warmup if args.warmup is not None else int(settings.get("warmup", 2))
    repeats = args.repeats if args.repeats is not None else int(settings.get("repeats", 10))
    rank, world, _, device, backend = start(args.backend, args.device, args.timeout_s)
    for c in cases:
        validate_case(c, world)
    hosts, ranks_per_node = node_layout()
    threads = _threads(args.threads, ranks_per_node, device)
    out_dir = Path(args.out)
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    log(f"bench: {len(cases)} cases x ({warmup} warm-up + {repeats} repeats) on {world} ranks "
        f"({backend}, {device}, {threads} threads per rank) -> {out_dir}")
    groups = make_groups([c.ep_size for c in cases], world, rank)
    meta = environment(world, ranks_per_node, threads, device, backend, hosts)
    rows, walls = run_grid(cases, rank=rank, world=world, device=device, groups=groups, warmup=warmup,
                           repeats=repeats, seed=args.seed, log=log)
    rows, walls = gather_rows(rows, walls, rank)
    a2a = gemm = None
    if args.calibrate:
        dtype_name = cases[0].dtype
        dtype = DTYPES[dtype_name]
        cal = settings.get("calibrate") or {}
        sizes = [int(s) for s in cal.get("a2a_bytes", [2 ** k for k in range(10, 23, 2)])]
        # Every group size of one node: two or more sizes separate a per-call from a per-peer latency.
        sizes_groups = node_local_groups(list(range(2, ranks_per_node + 1)), world, ranks_per_node, rank)
        log(f"bench: calibrating all-to-all ({len(sizes)} sizes, groups {sorted(sizes_groups)}) and GEMMs")
        a2a = calibrate_a2a(sizes_groups, device, dtype, sizes, repeats=max(5, repeats))
        shapes = [tuple(s) for s in cal.get("gemm_shapes", [(c.hidden, c.expert_hidden) for c in cases[:1]] +
                                            [(256, 256), (512, 512)])]
        gemm = calibrate_gemm(device, dtype, sorted(set(shapes)), [int(r) for r in cal.get("gemm_rows",
                              [256, 1024, 4096])], experts=[int(e) for e in _as_list(cal.get("gemm_experts", [2, 4]))],
                              repeats=max(5, repeats))
    if rank == 0:
        meta.update({"warmup": warmup, "repeats": repeats, "grid": args.grid, "seed": args.seed,
                     "load_average_end": load_average()})
        write_outputs(out_dir, rows, cases, walls, meta, report=args.report, a2a=a2a, gemm=gemm)
        if args.calibrate:
            run_data = outputs.load_run(out_dir)
            prof = build_profile(args.profile_name or f"{socket.gethostname()}-measured", run_data, a2a, gemm,
                                 cases[0].dtype)
            target = Path(args.profile_out) if args.profile_out else out_dir / "profile.yaml"
            prof.save(target)
            log(f"bench: wrote cluster profile {target}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]



def write_outputs(out_dir: Path, rows: list[dict], cases: list[BenchCase], walls: dict[str, list[float]],
                  meta: dict[str, Any], *, report: str | None = None, a2a=None, gemm=None) -> dict[str, Path]:
    """Everything a run leaves in its directory (rank 0)."""
    from coe_dist.bench import plots
    from coe_dist.bench import report as report_mod

    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = outputs.summarise(rows, cases, walls)
    data = {"meta": meta, "cases": summaries}
    if a2a is not None:
        data["calibration"] = {"a2a": a2a, "gemm": gemm}
    written = {
        "measurements": outputs.write_measurements(out_dir / "measurements.csv", rows),
        "summary": outputs.write_json(out_dir / "summary.json", data),
        "summary_csv": outputs.write_summary_csv(out_dir / "summary.csv", summaries),
    }
    tb = outputs.write_tensorboard(out_dir / "tensorboard", summaries, rows)
    if tb is not None:
        written["tensorboard"] = tb
    written.update(plots.run_plots(data, out_dir / "plots"))
    if report is not None:
        target = Path(report) if report else out_dir / "report.md"
        written["report"] = report_mod.write_run_report(data, out_dir, target)
    return written
