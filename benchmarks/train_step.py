"""Training step, end to end: the real trainer (`python -m coe_dist.train` under torchrun, gloo), tokens/s and
model FLOP utilisation (MFU) against the large-GEMM rate of each dtype, measured in the same run.

    .venv/bin/python benchmarks/train_step.py                         # 2 ranks, configs/bench/train-step.yaml
    .venv/bin/python benchmarks/train_step.py --warmup 1 --steps 2    # short run on a busy machine
    .venv/bin/python benchmarks/train_step.py --profile               # + py-spy on rank 0: top self-time frames
    .venv/bin/python benchmarks/train_step.py --variant malloc-off:COE_DIST_MALLOC_TUNING=0   # A/B in one run

Each launch trains warm-up + measured steps (ZeRO-2, bf16 autocast over fp32 weights, 1 thread per rank) and logs
tokens/s every step (metrics.jsonl: the window of one step, logging excluded; log_interval 1 also makes every
step record routing statistics, which a longer interval does on one step in ten); the report is the median over
the measured steps. The run directory is temporary (the final checkpoint is deleted with it).

Model FLOPs per token, forward (backward = 2x forward), d hidden, L sequence, f expert width, V vocabulary:
  attention projections 8 d^2, causal attention scores + values 2 d (L+1), routed experts C K 6 d f,
  shared experts C S 6 d f, router C 2 d N (per CoE layer), dense FFN 6 d F (first_k_dense layers), head 2 d V.
Under bf16 autocast the router and the attention scores/values run in float32 (the router by design; CPU
flash attention computes bf16 attention in float32); everything else is bf16. MFU = the least time the
step's FLOPs take at the large-GEMM rate of their dtype / the measured time:
  MFU = tokens/s / ranks x 3 x (bf16 FLOPs/token / R_bf16 + float32 FLOPs/token / R_fp32),
R_dtype = one large GEMM ([T*K, d] x [d, 2f], forward and both backward layouts, repeated to one CoE
layer's training FLOPs per rank) on one thread per rank, all ranks at once as in training, measured before
and after the training launches (median). As the explanation beside it, the bf16 rate of the model's own
GEMMs per rank at balanced routing ("GEMM set": the attention projections, every local expert at
ep x T x K / N rows for one iteration, the shared expert and the head, each forward and both backward
matmuls, weighted by how often a step runs them) and the MFU it would give (`mfu_gemm_set`).
On a shared machine wall-clock rates drift with the CPU share each phase gets, so the same quantities are also
taken in CPU time: the ranks' user + system seconds over the measured steps (/proc/PID/stat) and the GEMM set on
the process CPU clock give MFU/CPU (it leaves out time a rank is blocked or descheduled: an upper bound on a
quiet machine's MFU), and the system-time share shows page-fault and other kernel work.

--variant LABEL:KEY=VALUE[,KEY=VALUE...] adds a launch per round with environment variables (KEY without a dot)
or config overrides (section.key); launches alternate between variants (--rounds), ratios are to the first.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    from benchmarks import common
    from benchmarks.common import environment, interleaved, rank_of, torchrun_workers, write_json
except ImportError:  # run as a script: benchmarks/ is on sys.path
    import common
    from common import environment, interleaved, rank_of, torchrun_workers, write_json

from coe_dist.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
BF16 = common.GEMM_DTYPES["bf16"]
FP32_PARTS = ("attention scores/values", "router")  # float32 under bf16 autocast (see the module doc)
Linear = tuple[int, int, int]  # (rows m, in features, out features) of one nn.Linear-like matmul


# ----------------------------------------------------------------------------------- FLOPs

def flops_per_token(cfg: RunConfig) -> dict[str, float]:
    """Forward model FLOPs per token by component (see the module doc)."""
    m, e = cfg.model, cfg.moe
    d, L = m.hidden_size, cfg.train.seq_len
    coe_layers = m.num_layers - m.first_k_dense
    return {
        "attention projections": m.num_layers * 8.0 * d * d,
        "attention scores/values": m.num_layers * 2.0 * d * (L + 1),  # token i attends to i + 1 keys
        "routed experts": coe_layers * e.iterations * e.top_k * 6.0 * d * e.expert_hidden_size,
        "shared experts": coe_layers * e.iterations * e.num_shared_experts * 6.0 * d * e.expert_hidden_size,
        "router": coe_layers * e.iterations * 2.0 * d * e.num_experts,
        "dense FFN": m.first_k_dense * 6.0 * d * m.ffn_hidden_size,
        "head": 2.0 * d * m.vocab_size,
    }


def flops_by_dtype(per_token: dict[str, float]) -> dict[str, float]:
    """Forward FLOPs per token split by the dtype they run in under bf16 autocast."""
    fp32 = sum(v for k, v in per_token.items() if k in FP32_PARTS)
    return {"bf16": sum(per_token.values()) - fp32, "fp32": fp32}


# ----------------------------------------------------------------------------------- GEMM rate

def gemm_groups(cfg: RunConfig) -> dict[str, tuple[list[Linear], int]]:
    """One rank's GEMMs of a step, as groups of linears and how many times a step runs each group."""
    m, e = cfg.model, cfg.moe
    d, T = m.hidden_size, cfg.train.micro_batch_size * cfg.train.seq_len
    coe_layers, f = m.num_layers - m.first_k_dense, e.expert_hidden_size
    rows = e.ep_size * T * e.top_k // e.num_experts  # per local expert at balanced routing
    groups = {
        "attention projections": ([(T, d, 3 * d), (T, d, d)], m.num_layers),
        "routed experts": ([(rows, d, 2 * f), (rows, f, d)] * (e.num_experts // e.ep_size), coe_layers * e.iterations),
        "head": ([(T, d, m.vocab_size)], 1),
    }
    if e.num_shared_experts:
        sf = e.num_shared_experts * f
        groups["shared experts"] = ([(T, d, sf), (T, d, sf), (T, sf, d)], coe_layers * e.iterations)
    if m.first_k_dense:
        F = m.ffn_hidden_size
        groups["dense FFN"] = ([(T, d, F), (T, d, F), (T, F, d)], m.first_k_dense)
    return groups


def _gemm_fn(linears: list[Linear]):
    """Forward x W^T and backward dy W, dy^T x of each linear in bf16, with autograd's operand layouts."""
    g = torch.Generator().manual_seed(0)
    ops = [tuple(torch.randn(*s, generator=g).to(BF16) for s in ((m, i), (o, i), (m, o))) for m, i, o in linears]

    def run() -> None:
        for x, w, dy in ops:
            x @ w.t()
            dy @ w
            dy.t() @ x
    return run


def large_gemm_shape(cfg: RunConfig) -> tuple[int, int, int, float]:
    """(m, k, n, FLOPs per timed call) of the limit's GEMM: an iteration's token copies through the widest
    expert matmul, [T*K, d] x [d, 2f], repeated to one CoE layer's training FLOPs per rank."""
    m, e = cfg.model, cfg.moe
    T = cfg.train.micro_batch_size * cfg.train.seq_len
    layer_flops = 3 * T * e.iterations * (e.top_k + e.num_shared_experts) * 6.0 * m.hidden_size * e.expert_hidden_size
    return T * e.top_k, m.hidden_size, 2 * e.expert_hidden_size, layer_flops


def _gemm_worker(job: tuple[dict[str, tuple[list[Linear], int]], tuple[int, int, int, float], int]) -> dict:
    """Median wall and CPU seconds of each group and of each dtype's large GEMM on one thread (in its own
    process, one per rank); FLOPs per call of the large GEMMs."""
    groups, (m, k, n, flops), repeats = job
    torch.set_num_threads(1)
    fns = {name: _gemm_fn(linears) for name, (linears, _) in groups.items()}
    large = {dtype: common.large_gemm(torch_dtype, m, k, n, flops) for dtype, torch_dtype in common.GEMM_DTYPES.items()}
    fns.update({f"large_{dtype}": fn for dtype, (fn, _) in large.items()})
    out: dict = {clock: {name: statistics.median(ts) for name, ts in interleaved(fns, repeats, 1, clock=clock).items()}
                 for clock in ("wall", "cpu")}
    out["large_flops"] = {dtype: f for dtype, (_, f) in large.items()}
    return out


def measure_gemm_rate(groups: dict[str, tuple[list[Linear], int]], large: tuple[int, int, int, float], ranks: int,
                      repeats: int) -> list[dict]:
    """Each rank's rates (FLOP/s), wall and CPU clock, `ranks` processes at once, one thread each: the large
    GEMM of each dtype (the limit) and the GEMM set (the model's own bf16 GEMMs, the explanation)."""
    with multiprocessing.get_context("spawn").Pool(ranks) as pool:
        per_rank = pool.map(_gemm_worker, [(groups, large, repeats)] * ranks)
    flops = {name: 6.0 * sum(m * i * o for m, i, o in linears) for name, (linears, _) in groups.items()}
    total_flops = sum(flops[name] * count for name, (_, count) in groups.items())
    out = []
    for measured in per_rank:
        row = {}
        for clock in ("wall", "cpu"):
            seconds = measured[clock]
            total_s = sum(seconds[name] * count for name, (_, count) in groups.items())
            row[clock] = {"rate": total_flops / total_s, "groups": {k: flops[k] / seconds[k] for k in flops},
                          "large": {d: f / seconds[f"large_{d}"] for d, f in measured["large_flops"].items()}}
        out.append(row)
    return out


# ----------------------------------------------------------------------------------- launches

@dataclass
class Variant:
    label: str
    env: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Variant:
        label, _, items = text.partition(":")
        v = cls(label)
        for item in filter(None, items.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise SystemExit(f"--variant {text!r}: expected LABEL:KEY=VALUE[,KEY=VALUE...]")
            if "." in key:  # section.key: a config override
                v.overrides.append(item)
            else:
                v.env[key] = value
        return v


def train_command(args: argparse.Namespace, run_dir: Path, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "coe_dist.train", "--config", args.config]
    sets = [f"train.steps={args.warmup + args.steps}", f"log.run_dir={run_dir}", "log.log_interval=1",
            "log.eval_batches=0", *args.overrides, *overrides]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def launch(args: argparse.Namespace, variant: Variant, profile_out: Path | None) -> dict:
    """One training launch: per-step tokens/s of the measured steps, the ranks' CPU time over them (user and
    system), rank 0's peak RSS; with `profile_out`, py-spy's raw stacks of rank 0 over the measured steps."""
    with tempfile.TemporaryDirectory(prefix="train-step-") as tmp:
        run_dir, log = Path(tmp) / "run", Path(tmp) / "train.log"
        metrics = run_dir / "metrics.jsonl"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **variant.env}
        with log.open("w") as out:
            agent = subprocess.Popen(train_command(args, run_dir, variant.overrides), stdout=out,
                                     stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            try:
                ranks = _rank_pids(agent, args.nproc)
                _wait_for_step(metrics, args.warmup, agent)
                t0, cpu0 = time.perf_counter(), _cpu_seconds(ranks)
                spy = _start_pyspy(ranks[0], profile_out, args.profile_rate) if profile_out else None
                _wait_for_step(metrics, args.warmup + args.steps, agent)
                wall, cpu1 = time.perf_counter() - t0, _cpu_seconds(ranks)
                if spy is not None:
                    _stop_pyspy(spy, profile_out)
                code = agent.wait()
            finally:  # interrupted or failed: do not leave the training running (torchrun ends its workers)
                if agent.poll() is None:
                    agent.terminate()
                    agent.wait()
        if code != 0:
            raise SystemExit(f"[{variant.label}] training exited {code}:\n{log.read_text()[-4000:]}")
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        measured = [r for r in records if r["step"] > args.warmup and "tokens_per_s" in r]
        return {"tokens_per_s": [r["tokens_per_s"] for r in measured],
                "peak_rss_mib_rank0": max(r.get("peak_memory_mib", 0.0) for r in records),
                "window_s": wall, **{f"{kind}_s": sum(b[i] - a[i] for a, b in zip(cpu0, cpu1, strict=True))
                                     for i, kind in enumerate(("user", "system"))},
                "profiled": profile_out is not None}


def _rank_pids(agent: subprocess.Popen, nproc: int) -> list[int]:
    """torchrun's worker processes, ordered by RANK."""
    while agent.poll() is None:
        ranks = {rank: pid for pid in torchrun_workers(agent.pid) if (rank := rank_of(pid)) is not None}
        if len(ranks) == nproc:
            return [ranks[r] for r in sorted(ranks)]
        time.sleep(0.2)
    raise SystemExit(f"training exited ({agent.returncode}) before its {nproc} ranks were seen")


def _cpu_seconds(pids: list[int]) -> list[tuple[float, float]]:
    """(user, system) CPU seconds of each process so far (all its threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) / tick, int(fields[12]) / tick))  # utime, stime: fields 14 and 15 of stat
    return out


def _wait_for_step(metrics: Path, step: int, agent: subprocess.Popen) -> None:
    """Until rank 0 has logged `step` (a step's record is written at its end)."""
    def logged() -> bool:
        lines = metrics.read_text().split("\n")[:-1] if metrics.is_file() else []  # complete lines only
        return any(json.loads(line)["step"] >= step for line in lines)

    while not logged():
        if agent.poll() is not None:
            raise SystemExit(f"training exited ({agent.returncode}) before step {step}")
        time.sleep(0.2)


def _start_pyspy(pid: int, out: Path, rate: int) -> subprocess.Popen:
    """py-spy on one process: native frames, idle (waiting) time included, raw collapsed stacks."""
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    return subprocess.Popen([pyspy, "record", "--pid", str(pid), "--format", "raw", "--threads", "--idle",
                             "--native", "--rate", str(rate), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop_pyspy(spy: subprocess.Popen, out: Path) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
    _, err = spy.communicate(timeout=120)
    if not out.is_file():
        raise SystemExit(f"py-spy wrote no profile: {err.decode()[-2000:]}")


# ----------------------------------------------------------------------------------- profile report

PHASES = (("optimizer step", "DeepSpeedEngine.step"), ("backward", "DeepSpeedEngine.backward"),
          ("forward", "DeepSpeedEngine.forward"))


def _frame_name(frame: str) -> str:
    """'fn (path/file.py:123)' -> 'fn (path/file.py)'; a TensorIterator loop -> its kernel's name."""
    frame = re.sub(r":\d+\)$", ")", frame)
    if frame.startswith(("c10::function_ref", "std::_Function_handler")):
        kernel = re.search(r"(\w+_kernel)\b", frame)
        return f"{kernel.group(1) if kernel else frame[:80]} ({frame.rsplit('(', 1)[-1]}"
    return frame


def _leaf(frames: list[str]) -> str:
    """The sampled frame; an unsymbolised one ('0x7f.. (lib)', e.g. oneDNN's JIT GEMM kernels, or libc under a
    blocking wait) named by the nearest symbolised frame above it."""
    if not frames[-1].startswith("0x"):
        return _frame_name(frames[-1])
    above = next((f for f in reversed(frames[1:]) if not f.startswith("0x")), "?")
    return f"? {frames[-1].split(' ', 1)[-1]} in {_frame_name(above)}"


def summarize_profile(path: Path, rows: int) -> dict:
    """Shares of rank 0's main-thread samples: top leaf (self-time) frames, top innermost Python frames,
    and the step phase (DeepSpeed engine call) each sample falls in."""
    leaf, python, phase = Counter(), Counter(), Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames[0].endswith("MainThread"):
            continue
        n = int(count)
        leaf[_leaf(frames)] += n
        py = [f for f in frames[1:] if re.search(r"\.py:\d+\)$", f)]
        python[_frame_name(py[-1]) if py else "(no Python frame)"] += n
        phase[next((name for name, fn in PHASES if any(f.startswith(fn + " ") for f in frames)), "other")] += n
    total = sum(leaf.values())
    return {"samples": total, **{key: [(k, v / total) for k, v in c.most_common(rows)]
                                 for key, c in (("phases", phase), ("self", leaf), ("python", python))}}


# ----------------------------------------------------------------------------------- report

def report(results: dict) -> None:
    fl = results["flops_per_token"]
    fwd = sum(fl.values())
    print(f"\nmodel FLOPs per token, forward (training = 3x): {fwd / 1e6:.2f} M")
    for name, value in fl.items():
        if value:
            print(f"  {name:<26}{value / 1e6:9.3f} M {100 * value / fwd:6.1f}%")
    by_dtype = results["flops_per_token_by_dtype"]
    print(f"  of which bf16 {by_dtype['bf16'] / 1e6:.2f} M, float32 {by_dtype['fp32'] / 1e6:.2f} M "
          f"({', '.join(FP32_PARTS)})")
    large, rates = results["large_gemm_rate_per_rank"], results["gemm_rate_per_rank"]
    print(f"large-GEMM rate per rank (1 thread, {results['ranks']} ranks at once), TFLOP/s, wall | CPU clock: "
          + ", ".join(f"{d} {large['wall'][d] / 1e12:.4f} | {large['cpu'][d] / 1e12:.4f}" for d in common.GEMM_DTYPES))
    print(f"GEMM set (the model's own bf16 GEMM shapes), TFLOP/s: {rates['wall'] / 1e12:.4f} wall clock, "
          f"{rates['cpu'] / 1e12:.4f} CPU clock; by part, wall clock (rank 0, before training):")
    for name, r in results["gemm_samples"][0]["wall"]["groups"].items():
        print(f"    {name:<24}{r / 1e12:9.3f}")
    head = (f"{'variant':<20}{'tokens/s':>10}{'n':>4}{'step s':>8}{'MFU':>8}{'MFU/CPU':>9}{'vs set':>8}"
            f"{'sys share':>10}{'CPU/wall':>9}{'rank-0 RSS MiB':>16}{'ratio':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for label, v in results["variants"].items():
        print(f"{label:<20}{v['tokens_per_s']:10.1f}{len(v['steps_tokens_per_s']):4d}{v['step_s']:8.2f}"
              f"{100 * v['mfu']:7.1f}%{100 * v['mfu_cpu']:8.1f}%{100 * v['mfu_gemm_set']:7.1f}%"
              f"{100 * v['system_share']:9.1f}%"
              f"{100 * v['cpu_per_wall']:8.0f}%{v['peak_rss_mib_rank0']:16.0f}{v['ratio_to_first']:7.3f}")
    print("MFU: the step's bf16 and float32 FLOPs at the wall-clock large-GEMM rate of their dtype / the step time; "
          "MFU/CPU: the same in CPU time of the ranks\nagainst the CPU-clock rates (robust to a busy machine; leaves "
          "out time spent blocked, e.g. waiting for the other rank); vs set: MFU against the GEMM set's rate.\n"
          "sys share: kernel time in the ranks' CPU time; CPU/wall: the ranks' CPU time per rank and wall second.")


def print_profile(p: dict) -> None:
    print(f"\npy-spy, rank 0 main thread, measured steps ({p['samples']} samples, idle time included)")
    for title, key in (("phase", "phases"), ("self time (leaf frame)", "self"),
                       ("innermost Python frame", "python")):
        print(f"  {title}:")
        for name, share in p[key]:
            print(f"    {100 * share:5.1f}%  {name}")


def summarize_variant(launches: list[dict], cfg: RunConfig, results: dict, base: float | None) -> dict:
    steps = [t for run_ in launches for t in run_["tokens_per_s"]]
    tps = statistics.median(steps)
    ranks, rates, large = results["ranks"], results["gemm_rate_per_rank"], results["large_gemm_rate_per_rank"]
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * ranks * cfg.train.seq_len
    cpu_s = sum(r["user_s"] + r["system_s"] for r in launches)
    measured_tokens = tokens_per_step * sum(len(r["tokens_per_s"]) for r in launches)
    train_by_dtype = {d: 3 * f for d, f in results["flops_per_token_by_dtype"].items()}
    # The least rank-seconds a token takes: each dtype's FLOPs at that dtype's large-GEMM rate.
    limit_wall, limit_cpu = (common.limit_seconds(train_by_dtype, large[clock]) for clock in ("wall", "cpu"))
    return {"tokens_per_s": tps, "steps_tokens_per_s": steps, "step_s": tokens_per_step / tps,
            "mfu": tps * limit_wall / ranks, "mfu_cpu": measured_tokens * limit_cpu / cpu_s,
            "mfu_gemm_set": results["train_flops_per_token"] * tps / (ranks * rates["wall"]),
            "system_share": sum(r["system_s"] for r in launches) / cpu_s,
            "cpu_per_wall": cpu_s / (ranks * sum(r["window_s"] for r in launches)),
            "ratio_to_first": tps / (base or tps),
            "peak_rss_mib_rank0": max(r["peak_rss_mib_rank0"] for r in launches), "launches": launches}


def run(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.overrides)
    variants = [Variant("default"), *(Variant.parse(v) for v in args.variant)]
    env = environment()
    print(f"torch {env['torch']}, cpu {env['cpu']} ({env['cpu_capability']}), load average "
          f"{env['loadavg_at_start']}; {args.nproc} ranks x 1 thread, warm-up {args.warmup}, measured {args.steps}, "
          f"rounds {args.rounds}", flush=True)
    groups, large = gemm_groups(cfg), large_gemm_shape(cfg)
    gemm = measure_gemm_rate(groups, large, args.nproc, args.gemm_repeats)
    runs: dict[str, list[dict]] = {v.label: [] for v in variants}
    profile_path = Path(args.profile_raw) if args.profile else None
    for r in range(args.rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):  # alternate the order: drift hits all alike
            first = profile_path is not None and r == 0 and v is variants[0]
            runs[v.label].append(launch(args, v, profile_path if first else None))
            print(f"[{v.label}] round {r + 1}: {statistics.median(runs[v.label][-1]['tokens_per_s']):.1f} tokens/s",
                  flush=True)
    gemm += measure_gemm_rate(groups, large, args.nproc, args.gemm_repeats)
    fl = flops_per_token(cfg)
    results: dict = {"environment": env, "args": vars(args), "config": cfg.to_dict(), "ranks": args.nproc,
                     "flops_per_token": fl, "flops_per_token_by_dtype": flops_by_dtype(fl),
                     "train_flops_per_token": 3 * sum(fl.values()),
                     "large_gemm_rate_per_rank": {c: {d: statistics.median(g[c]["large"][d] for g in gemm)
                                                      for d in common.GEMM_DTYPES} for c in ("wall", "cpu")},
                     "gemm_rate_per_rank": {c: statistics.median(g[c]["rate"] for g in gemm) for c in ("wall", "cpu")},
                     "gemm_samples": gemm, "variants": {}}
    base = None
    for label, launches in runs.items():
        results["variants"][label] = summarize_variant(launches, cfg, results, base)
        base = base or results["variants"][label]["tokens_per_s"]
    if profile_path is not None:
        results["profile"] = summarize_profile(profile_path, args.profile_rows)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "bench" / "train-step.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every launch (repeatable)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun processes, gloo)")
    p.add_argument("--warmup", type=int, default=2, help="training steps left out of the measurement")
    p.add_argument("--steps", type=int, default=5, help="measured training steps per launch")
    p.add_argument("--rounds", type=int, default=1, help="launches per variant")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL:KEY=VALUE[,...]",
                   help="another launch configuration to compare with the default (repeatable)")
    p.add_argument("--gemm-repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="py-spy on rank 0 of the first default launch")
    p.add_argument("--profile-rate", type=int, default=25, help="py-spy samples per second")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--profile-raw", default=str(Path(tempfile.gettempdir()) / "train_step.pyspy.txt"),
                   help="where py-spy's raw (collapsed) stacks go")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = p.parse_args(argv)
    results = run(args)
    report(results)
    if "profile" in results:
        print_profile(results["profile"])
    print(f"\nwrote {write_json(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
