"""Reproduce the CoE paper's comparison at small scale on GSM8K (configs/repro/), and write docs/repro.md.

    .venv/bin/python benchmarks/repro.py [--seeds 1,2] [--steps 300] [--configs coe-2-4of64,moe-8of64]
    .venv/bin/python benchmarks/repro.py --configs coe-2-4of64,coe-2-4of64+auxfree --seeds 1,2,3
    .venv/bin/python benchmarks/repro.py --configs moe-8of64@continued,coe-2-4of64@upcycled --seeds 1,2
    .venv/bin/python benchmarks/repro.py --summarise runs/paper-repro --out runs/paper-repro/repro.md

Preprocesses ../shared/data/gsm8k (train for training, test for validation) with the GPT-NeoX tokenizer,
trains every config with 2 ranks and ep 2 for each seed, then tabulates the final validation loss
(mean +/- standard error over seeds), parameters, peak memory, tokens/s and wall time, the paired
difference per seed of each compared pair (the same seed means the same data order), and plots validation
loss against step. Each finished run is also kept as one line of <out dir>/repro/runs.jsonl (its curve, final
loss, size, speed, balance, machine and dtype; docs/repro/runs.jsonl in git), and the table is made from all the
lines kept there: seeds trained on another day or machine still count, and run directories need not outlive the
machine. A config name may carry variants, `NAME+VARIANT[+VARIANT]` (VARIANTS below: a set of
`--set` overrides on configs/repro/NAME.yaml). Runs that already finished (their metrics.jsonl reaches the
last step) are not rerun; an interrupted one continues from its last checkpoint (--resume auto). Both only where
the run directory was trained with the settings asked for: one trained otherwise (another --set, variant or
--steps) stops the driver before anything trains; `--runs DIR` keeps such runs apart (e.g. fp32 runs).
A continuation `NAME@HOW` (CONTINUATIONS below) trains configs/repro/NAME.yaml for --continue-steps steps from a
finished run of the same seed (trained first if missing): `train --init-from`, its weights with a fresh optimizer
and schedule; @upcycled first turns the MoE run into a CoE checkpoint (`convert import --from-checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from coe_dist.atomic_file import write_atomic

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CACHE = ROOT / ".cache" / "repro"


def preprocess(tokenizer: Path) -> dict[str, Path]:
    from coe_dist.data.preprocess import preprocess as run

    out = {}
    for split in ("train", "test"):
        prefix = CACHE / f"gsm8k-{split}"
        if not prefix.with_suffix(".idx").is_file():
            run([str(SHARED / "gsm8k" / f"{split}.parquet")], str(tokenizer), str(prefix), ["question", "answer"], 2)
        out[split] = prefix
    return out


def compact_vocabulary(data: dict[str, Path]) -> tuple[dict[str, Path], int]:
    """Renumber the token ids GSM8K uses (train and test: ~14.8k of GPT-NeoX's 50k) to 0..n-1.

    A lossless relabelling that shrinks the output layer 3.4x: at d=128 the 50k-way head and its softmax were
    three quarters of every step, which left the experts (what the comparison is about) a quarter of it.
    Applied alike to every config. Returns the new prefixes and the model.vocab_size to use (n rounded up
    to a multiple of 64). The id map is kept as vocab_map.npy (compact id -> GPT-NeoX id)."""
    import numpy as np

    bins = {split: np.fromfile(prefix.with_suffix(".bin"), dtype=np.uint16) for split, prefix in data.items()}
    used = np.unique(np.concatenate(list(bins.values())))
    np.save(CACHE / "vocab_map.npy", used)
    to_compact = np.zeros(int(used[-1]) + 1, dtype=np.uint16)
    to_compact[used] = np.arange(len(used), dtype=np.uint16)
    out = {}
    for split, prefix in data.items():
        compact = prefix.with_name(prefix.name + "-compact")
        if not compact.with_suffix(".idx").is_file():
            to_compact[bins[split]].tofile(compact.with_suffix(".bin"))
            # Same dtype, same token counts: the index (document sizes and byte offsets) is unchanged. Written
            # whole, last: its presence says the .bin is complete.
            write_atomic(compact.with_suffix(".idx"), prefix.with_suffix(".idx").read_bytes())
        out[split] = compact
    return out, -(-len(used) // 64) * 64


# Config variants: NAME+VARIANT trains configs/repro/NAME.yaml with these overrides added.
VARIANTS = {
    # aux-loss-free balancing (DeepSeek-V3) instead of the aux loss
    "auxfree": ("moe.aux_loss_coef=0", "moe.expert_bias_rate=0.001"),
    # device-limited routing: every token's experts on one of the two ranks (a group = one rank's experts)
    "devlim": ("moe.routing_groups=2", "moe.routing_group_topk=1"),
    # DeepSeek-V2's M of D devices at ep 8: each token's experts in its best 2 (or 1) of 8 groups of 8 (a group = one
    # rank's experts at ep 8, half a rank's at ep 4): a token reaches at most 2 (1) ranks at any ep
    "devlim2of8": ("moe.routing_groups=8", "moe.routing_group_topk=2"),
    "devlim1of8": ("moe.routing_groups=8", "moe.routing_group_topk=1"),
    "sigmoid": ("moe.router_score=sigmoid",),
    # the dispatch rows as e4m3 + a scale per row (one row per token and rank); the combine stays in bf16/fp32
    "fp8": ("moe.dispatch=dedup", "moe.dispatch_dtype=fp8"),
}
# Continuations (issue 14.6): NAME@HOW -> (the run it starts from, `convert import --from-checkpoint` arguments or
# None to start from the run's own weights). The same seed: the same data order and the same source run.
CONTINUATIONS = {
    "moe-8of64@continued": ("moe-8of64", None),
    # the MoE's 7 of 64 routed experts per token become 2 iterations x 3 (each router a copy of the MoE's)
    "coe-2-4of64@upcycled": ("moe-8of64", ["--iterations", "2", "--top-k", "3"]),
}
# <out dir>/repro/runs.jsonl: one line per finished run (run_record), kept in git; the table is made from them
RECORDS = "runs.jsonl"
WALL = "repro_wall.json"  # <run_dir>/repro_wall.json: seconds this harness spent on the run, over its attempts


def config_and_overrides(name: str) -> tuple[Path, list[str]]:
    """`coe-2-4of64+auxfree` -> (configs/repro/coe-2-4of64.yaml, the auxfree overrides)."""
    if "@" in name and name not in CONTINUATIONS:
        raise SystemExit(f"repro: unknown continuation '{name}': use one of {', '.join(CONTINUATIONS)}")
    base, *variants = name.split("@")[0].split("+")
    config = ROOT / "configs" / "repro" / f"{base}.yaml"
    if not config.is_file():
        raise SystemExit(f"repro: {config} does not exist: use a name from configs/repro")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"repro: unknown variant '{unknown[0]}' in '{name}': use one of {', '.join(VARIANTS)}")
    return config, [o for v in variants for o in VARIANTS[v]]


def run_overrides(name: str, seed: int, steps: int, data: dict[str, Path], vocab: int, tokenizer: Path,
                  run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The `--set` overrides of one run: its seed, length, data and paths, then the variant's, then --set's."""
    return [f"train.seed={seed}", f"train.steps={steps}", f"log.run_dir={run_dir}",
            f"data.dataset={data['train']}", f"data.valid_dataset={data['test']}", f"data.tokenizer={tokenizer}",
            f"data.cache_dir={CACHE / 'cache'}", f"model.vocab_size={vocab}",
            f"log.eval_interval={max(1, steps // 6)}", f"log.save_interval={max(1, steps // 6)}",
            "log.keep_last=1", *config_and_overrides(name)[1], *extra]


def settings_mismatch(run_dir: Path, name: str, overrides: list[str]) -> list[str]:
    """`key: trained X, asked Y` for each model, moe, optim or train setting in which the run already in run_dir
    (its config.yaml) differs from what this call would train, train.steps and layout keys included (another
    experiment); [] for a new directory. Without this check a finished run is skipped, and an interrupted one
    resumed, whatever --set asks (a bf16 run standing in for the fp32 one asked for)."""
    from coe_dist.config import load_config
    from coe_dist.train.checkpoint import ABSENT, setting_changes

    saved_at = run_dir / "config.yaml"
    if not saved_at.is_file():
        return []
    asked = load_config(config_and_overrides(name)[0], overrides)
    changes = setting_changes(asked, yaml.safe_load(saved_at.read_text()) or {}, {"train": ("init_from",)})
    return [f"{key}: trained {None if was is ABSENT else was}, asked {now}" for key, was, now in changes]


def train(name: str, seed: int, steps: int, data: dict[str, Path], vocab: int, tokenizer: Path,
          run_dir: Path, init_from: Path | None = None, extra: tuple[str, ...] = ()) -> float:
    """One 2-rank run, resumed from its last checkpoint if it has one; returns the wall time of this attempt
    and adds it to <run_dir>/repro_wall.json."""
    config, _ = config_and_overrides(name)
    args = [sys.executable, "-m", "coe_dist.cli", "train", "--config", str(config), "--nproc", "2",
            "--resume", "auto", *(["--init-from", str(init_from)] if init_from else [])]
    for o in run_overrides(name, seed, steps, data, vocab, tokenizer, run_dir, extra):
        args += ["--set", o]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        with (run_dir.parent / f"{run_dir.name}.log").open("a") as log:
            subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    finally:
        seconds = time.perf_counter() - start
        record_wall_time(run_dir, seconds)
    return seconds


def continuation_start(name: str, seed: int, steps: int, runs: Path, train_source) -> Path:
    """The checkpoint a continuation starts from: the source run (trained by `train_source` if unfinished),
    converted by `convert import --from-checkpoint` for an upcycling."""
    source_name, convert = CONTINUATIONS[name]
    source = runs / f"{source_name}-seed{seed}"
    if not finished(source, steps):
        train_source(source_name, source)
    if convert is None:
        return source
    init = runs / "init" / f"{name}-seed{seed}"  # not a run: outside the *-seed* glob
    if not (init / "checkpoints").is_dir():
        subprocess.run([sys.executable, "-m", "coe_dist.cli", "convert", "import", "--from-checkpoint", str(source),
                        "--output", str(init), "--seed", str(seed), *convert], check=True, cwd=ROOT)
    return init


def record_wall_time(run_dir: Path, seconds: float) -> None:
    path = run_dir / WALL
    total = json.loads(path.read_text())["seconds"] if path.is_file() else 0.0
    write_atomic(path, json.dumps({"seconds": total + seconds}))


def finished(run_dir: Path, steps: int) -> bool:
    m = run_dir / "metrics.jsonl"
    return m.is_file() and any(json.loads(line).get("step") == steps and "valid/loss" in line
                               for line in m.read_text().splitlines())


# The paper's claims, as (config A, config B, what the paper found): A below B, or about equal.
CLAIMS = [
    ("coe-2-4of64", "moe-8of64", "lower", "CoE-2(4/64) beats MoE(8/64) at equal FLOPs (paper: 1.12 vs 1.20)"),
    ("coe-2-4of48", "moe-8of64", "equal", "CoE-2(4/48) matches MoE(8/64) with fewer parameters"),
    ("coe-2-4of64", "coe-2-4of64-shared-gating", "lower", "independent gating beats one shared router"),
    ("coe-2-4of64", "coe-2-4of64-outer-residual", "lower", "the inner residual beats an outer one"),
    ("dense-8of8-c2", "dense-8of8-c1", "lower", "dense control: a second pass helps even without routing"),
    ("coe-2-4of64@upcycled", "moe-8of64@continued", "lower",
     "upcycling: MoE(8/64) turned into CoE-2(4/64) beats the MoE continued for as many tokens (issue 14.6)"),
]


def standard_error(xs: list[float]) -> float:
    """Sample standard deviation / sqrt(n); nan for a single value."""
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


@dataclass
class Result:
    name: str
    finals: list[float]  # final validation loss per seed
    curves: list[list[tuple[int, float]]]  # (step, validation loss) per seed
    params: int  # whole model (dense + every rank's experts)
    expert_params: int
    peak_mib: float  # largest peak RSS of rank 0 over the seeds
    tokens_per_s: float  # median over the logged windows of every seed
    seeds: list[int] | None = None  # the seed of each entry of finals
    wall_s: list[float | None] | None = None  # harness wall time per seed (None: not run by this harness)
    max_load: list[float | None] | None = None  # per seed: worst (layer, iteration) busiest-expert load / mean
    machine: str = ""  # machine_label() of the hardware and dtype every seed trained with

    @property
    def mean(self) -> float:
        return statistics.mean(self.finals)

    @property
    def stderr(self) -> float:
        return standard_error(self.finals)


def _seed_of(run_dir: Path) -> int:
    return int(run_dir.name.rsplit("-seed", 1)[1])


BALANCE_WINDOW = 5  # logging steps averaged for the final expert balance (one logging step is one micro-batch)


def worst_load(recs: list[dict]) -> float | None:
    """The busiest expert's load over the mean load (1 = perfect balance), averaged over the last logging steps,
    for the worst (layer, iteration); None where the run logged no loads."""
    logged = [r for r in recs if any(k.endswith("/load_imbalance") for k in r)][-BALANCE_WINDOW:]
    keys = {k for r in logged for k in r if k.endswith("/load_imbalance")}
    return max((statistics.mean(r[k] for r in logged if k in r) for k in keys), default=None)


def run_record(name: str, run_dir: Path) -> dict:
    """What the summary needs of one finished run, small enough to keep in git next to the table (run
    directories are hundreds of MB and do not outlive the machine that trained them)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # dict: after a resume a step logged twice counts once, with its last value
    curve = sorted({r["step"]: r["valid/loss"] for r in recs if "valid/loss" in r}.items())
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    info = json.loads((run_dir / "run_info.json").read_text())
    local, ep = info["layout"]["parameters_rank0"], info["layout"]["ep_size"]
    config = run_dir / "config.yaml"
    dtype = yaml.safe_load(config.read_text())["train"]["dtype"] if config.is_file() else None
    return {"config": name, "seed": _seed_of(run_dir), "final": curve[-1][1], "curve": [list(c) for c in curve],
            "params": local["dense"] + local["expert_local"] * ep, "expert_params": local["expert_local"] * ep,
            "peak_mib": max((r["peak_memory_mib"] for r in recs if "peak_memory_mib" in r), default=0.0),
            "tokens_per_s": statistics.median(tps) if tps else None,
            "wall_s": json.loads((run_dir / WALL).read_text())["seconds"] if (run_dir / WALL).is_file() else None,
            "max_load": worst_load(recs), "dtype": dtype, "machine": info.get("machine"),
            "date": time.strftime("%Y-%m-%d", time.gmtime((run_dir / "metrics.jsonl").stat().st_mtime))}


def result_of(name: str, records: list[dict]) -> Result:
    """One config's row from its runs' records (any order), all trained on one machine_label()."""
    records = sorted(records, key=lambda r: r["seed"])
    machines = {label_of(r) for r in records}
    if len(machines) > 1:
        raise ValueError(f"{name}: seeds trained on {sorted(machines)}: a row holds the runs of one machine")
    tps = [r["tokens_per_s"] for r in records if r["tokens_per_s"] is not None]
    return Result(name, [r["final"] for r in records], [[tuple(c) for c in r["curve"]] for r in records],
                  records[0]["params"], records[0]["expert_params"], max(r["peak_mib"] for r in records),
                  statistics.median(tps) if tps else math.nan, [r["seed"] for r in records],
                  [r["wall_s"] for r in records], [r["max_load"] for r in records], machines.pop())


def load_result(name: str, dirs: list[Path]) -> Result:
    return result_of(name, [run_record(name, d) for d in dirs])


def machine_label(machine: dict | None, dtype: str | None) -> str:
    """`AMD EPYC (avx2, 2 cores), fp32`: what decides whether two runs' losses compare exactly."""
    if not machine:
        hw = "machine not recorded"
    elif machine.get("gpu"):
        hw = machine["gpu"]
    else:
        hw = f"{machine.get('cpu')} ({machine.get('cpu_isa')}, {machine.get('cores')} cores)"
    return f"{hw}, {dtype or 'dtype not recorded'}"


def label_of(record: dict) -> str:
    return machine_label(record.get("machine"), record.get("dtype"))


def update_records(path: Path, new: list[dict]) -> list[dict]:
    """The records kept at `path` (JSON lines), with `new` replacing those of the same config and seed trained on
    the same hardware and dtype (a seed trained on other hardware is another run: kept beside it); written back
    atomically. Returns them all."""
    def key(r: dict) -> tuple[str, int, str]:
        return r["config"], r["seed"], label_of(r)

    kept = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                kept[key(r)] = r
    kept.update({key(r): r for r in new})
    records = [kept[k] for k in sorted(kept)]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def results_of(records: list[dict]) -> list[Result]:
    """One Result per (machine, config): losses of one model differ between CPUs (kernels differ by ISA) and
    dtypes by more than the gaps measured here, so a mean or a paired difference never mixes machines."""
    by_run: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_run.setdefault((label_of(r), r["config"]), []).append(r)
    return [result_of(name, rs) for (_, name), rs in by_run.items()]


@dataclass
class Paired:
    """A - B per seed that both ran (the same seed: the same data order and initial dense weights)."""

    seeds: list[int]
    diffs: list[float]

    @property
    def mean(self) -> float:
        return statistics.mean(self.diffs)

    @property
    def stderr(self) -> float:
        return standard_error(self.diffs)


def paired(a: Result, b: Result) -> Paired:
    if a.seeds is None or b.seeds is None:
        return Paired([], [])
    b_by_seed = dict(zip(b.seeds, b.finals, strict=True))
    common = [(s, x) for s, x in zip(a.seeds, a.finals, strict=True) if s in b_by_seed]
    return Paired([s for s, _ in common], [x - b_by_seed[s] for s, x in common])


def comparisons(names: list[str]) -> list[tuple[str, str]]:
    """The pairs to difference: the paper's claims, and every NAME+VARIANT against its NAME."""
    pairs = [(a, b) for a, b, _, _ in CLAIMS if a in names and b in names]
    return pairs + [(n, n.split("+")[0]) for n in names if "+" in n and n.split("+")[0] in names]


# Student's t, 97.5th percentile, by degrees of freedom: a two-sided 95% interval on a mean of n - 1 + 1 values.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t_975(dof: int) -> float:
    """The table's value at dof, or at the next smaller dof tabulated (wider: errs toward "not resolved")."""
    return T_975[max(k for k in T_975 if k <= dof)] if dof <= 30 else 1.960


@dataclass
class Difference:
    """A - B with a 95% interval: paired over the seeds both ran where two or more did (the same seed: the same
    data order and initial dense weights, so most of the seed noise cancels), else from the two configs' own
    standard errors (dof of the smaller)."""

    mean: float
    stderr: float  # nan: fewer than two seeds, no interval
    seeds: int
    kind: str  # "paired" or "unpaired"

    @property
    def half_width(self) -> float:
        return t_975(self.seeds - 1) * self.stderr if self.seeds > 1 else math.nan


def difference(a: Result, b: Result) -> Difference:
    d = paired(a, b)
    n = min(len(a.finals), len(b.finals))
    # One shared seed where one side has a single seed: no interval either way, and the same-seed difference is
    # the estimate; the difference of means would set one config's easy seed against the other's hard one.
    if len(d.diffs) > 1 or (d.diffs and n < 2):
        return Difference(d.mean, d.stderr if len(d.diffs) > 1 else math.nan, len(d.diffs), "paired")
    return Difference(a.mean - b.mean, math.hypot(a.stderr, b.stderr), n, "unpaired")


def verdict(a: Result, b: Result, expected: str) -> str:
    """Whether A - B has the paper's sign with 95% confidence; otherwise "not resolved at N seeds"."""
    d = difference(a, b)
    seeds = f"{d.seeds} seed{'s' if d.seeds != 1 else ''}"
    if not abs(d.mean) > d.half_width:  # also the nan case: one seed gives no interval
        return f"holds: no difference resolved at {seeds}" if expected == "equal" else f"not resolved at {seeds}"
    if expected == "equal":  # "A matches B": a lower A is more than the claim, a higher one falls short of it
        return "holds, and more: A is lower" if d.mean < 0 else "does not hold: A is higher"
    return "holds" if d.mean < 0 else "does not hold: reversed"


def summarise(results: list[Result], out_md: Path) -> str:
    """Per machine (hardware and dtype), most runs first: table, balance, paired differences, verdicts and plot;
    the markdown goes after `<!-- table -->` in out_md (or is all of it)."""
    by_machine: dict[str, list[Result]] = {}
    for r in results:
        by_machine.setdefault(r.machine, []).append(r)
    order = sorted(by_machine, key=lambda m: (-sum(len(r.finals) for r in by_machine[m]), m))
    lines = ["Losses are compared only between runs trained on the same hardware and dtype (kernels differ by ISA): "
             "one section per machine."]
    for machine in order:
        runs = sum(len(r.finals) for r in by_machine[machine])
        plot = out_md.parent / "repro" / f"valid_loss-{slug(machine)}.png"
        section = machine_section(by_machine[machine], plot, out_md)
        lines += ["", f"### Trained on {machine}: {runs} run{'s' if runs != 1 else ''}", "", *section]
    text = "\n".join(lines) + "\n"
    old = out_md.read_text() if out_md.is_file() else ""
    out_md.parent.mkdir(parents=True, exist_ok=True)
    marker = "<!-- table -->"
    write_atomic(out_md, old.split(marker)[0] + marker + "\n" + text if marker in old else text)
    return text


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def machine_section(results: list[Result], plot: Path, out_md: Path) -> list[str]:
    """The markdown of one machine's runs."""
    plot_curves(results, plot)
    lines = ["| config | final valid loss, mean ± standard error (seeds) | per seed | params (experts) | "
             "peak RSS rank 0 (MiB) | tokens/s (median) | wall time per run (s) |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r.mean):
        seeds = ", ".join(f"{x:.4f}" for x in r.finals)
        walls = ", ".join("-" if w is None else f"{w:.0f}" for w in (r.wall_s or [None] * len(r.finals)))
        lines.append(f"| {r.name} | {r.mean:.4f} ± {r.stderr:.4f} ({len(r.finals)}) | {seeds} | "
                     f"{r.params / 1e6:.2f} M ({r.expert_params / 1e6:.2f} M) | {r.peak_mib:.0f} | "
                     f"{r.tokens_per_s:,.0f} | {walls} |")
    by_name = {r.name: r for r in results}
    lines += ["", f"Expert balance at the end (the busiest expert's load over the mean, worst layer and iteration, "
              f"mean of the last {BALANCE_WINDOW} logging steps; 1 = perfect):", "",
              "| config | worst max/mean load, mean over seeds | per seed |", "|---|---|---|"]
    for r in sorted(results, key=lambda r: r.name):
        known = [x for x in (r.max_load or []) if x is not None]
        if known:
            per_seed = ", ".join("-" if x is None else f"{x:.2f}" for x in r.max_load)
            lines.append(f"| {r.name} | {statistics.mean(known):.2f} | {per_seed} |")
    pairs = []
    for a, b in comparisons(list(by_name)):
        d = paired(by_name[a], by_name[b])
        if d.diffs:
            per_seed = ", ".join(f"{s}: {x:+.4f}" for s, x in zip(d.seeds, d.diffs, strict=True))
            pairs.append(f"| {a} | {b} | {d.mean:+.4f} ± {d.stderr:.4f} ({len(d.diffs)}) | {per_seed} |")
    if pairs:  # no empty table for a machine without pairs
        lines += ["", "| A | B | paired A - B, mean ± standard error (seeds) | A - B per seed |", "|---|---|---|---|",
                  *pairs]
    claims = [(a, b, expected, claim) for a, b, expected, claim in CLAIMS if a in by_name and b in by_name]
    if claims:
        lines += ["", "Verdicts: A - B with a two-sided 95% Student-t interval, paired over the seeds both configs "
                  "ran (unpaired where they share fewer than two); a claim holds when the interval excludes zero.", "",
                  "| paper's claim | A | B | A - B, mean ± standard error (seeds) | 95% interval | seeds with A < B "
                  "| here |", "|---|---|---|---|---|---|---|"]
    for a, b, expected, claim in claims:
        ra, rb = by_name[a], by_name[b]
        d, p = difference(ra, rb), paired(ra, rb)
        interval = "-" if math.isnan(d.half_width) else \
            f"{d.mean - d.half_width:+.4f} to {d.mean + d.half_width:+.4f}"
        lower = f"{sum(x < 0 for x in p.diffs)} of {len(p.diffs)}" if p.diffs else "-"
        lines.append(f"| {claim} | {a} | {b} | {d.mean:+.4f} ± {d.stderr:.4f} ({d.seeds} {d.kind}) | "
                     f"{interval} | {lower} | {verdict(ra, rb, expected)} |")
    if plot.is_file():
        lines += ["", f"![validation loss against step]({plot.relative_to(out_md.parent)})"]
    return lines


def plot_curves(results: list[Result], path: Path) -> None:
    """Validation loss against step: the mean over seeds per config, the band between the seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(len(c) > 1 for r in results for c in r.curves):
        return  # only records kept without their curves: the plot there is stays
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in sorted(results, key=lambda r: r.name):
        steps = [s for s, _ in max(r.curves, key=len)]
        curves = [c for c in r.curves if [s for s, _ in c] == steps]  # records kept without a curve: left out
        if len(steps) < 2:
            continue
        per_step = list(zip(*[[v for _, v in c] for c in curves], strict=True))
        line, = ax.plot(steps, [statistics.mean(v) for v in per_step], label=f"{r.name} ({len(curves)} seeds)")
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=line.get_color(),
                        alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (GSM8K test)")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def runs_in(root: Path) -> dict[str, list[Path]]:
    """<root>/<config>-seed<S>/ runs that finished (their last record is the final validation), by config."""
    groups: dict[str, list[Path]] = {}
    for d in sorted(p for p in root.glob("*-seed*") if p.is_dir()):
        lines = (d / "metrics.jsonl").read_text().splitlines() if (d / "metrics.jsonl").is_file() else []
        if lines and "valid/loss" in lines[-1]:
            groups.setdefault(d.name.rsplit("-seed", 1)[0], []).append(d)
        else:
            print(f"repro: leaving out {d}: not finished")
    return groups


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--configs", default="", help="comma-separated names from configs/repro, with +variants or as "
                   f"continuations ({', '.join(CONTINUATIONS)}); default: every config")
    p.add_argument("--continue-steps", type=int, default=150, help="steps of a continuation (default 150: half "
                   "the runs' tokens again)")
    p.add_argument("--out", default=str(ROOT / "docs" / "repro.md"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "repro"), help="where the run directories go (default "
                   "runs/repro); runs of other --set values (e.g. train.dtype=fp32) need a directory of their own")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for every run, e.g. train.dtype=fp32 where bf16 matmuls are slow (a CPU without "
                        "AVX-512 BF16/AMX); compare only runs trained alike")
    p.add_argument("--summarise", metavar="DIR", help="only tabulate the runs in DIR (e.g. runs/paper-repro from "
                   "slurm/repro.sh): <config>-seed<S>/ directories")
    args = p.parse_args()
    records_at = Path(args.out).parent / "repro" / RECORDS
    if args.summarise:
        runs = runs_in(Path(args.summarise))
        records = update_records(records_at, [run_record(n, d) for n, ds in runs.items() for d in ds])
        if not records:
            print(f"repro: no <config>-seed<S>/metrics.jsonl under {args.summarise} and no records in {records_at}")
            return 1
        print(summarise(results_of(records), Path(args.out)))
        return 0
    tokenizer = SHARED / "tokenizers" / "gpt-neox-20b.tokenizer.json"
    if not tokenizer.is_file():
        print(f"repro: {tokenizer} not found: this benchmark needs ../shared/data (GSM8K + GPT-NeoX tokenizer)")
        return 1
    data, vocab = compact_vocabulary(preprocess(tokenizer))
    names = args.configs.split(",") if args.configs else sorted(p.stem for p in (ROOT / "configs/repro").glob("*.yaml"))
    for name in names:  # every name checked before the first run starts
        config_and_overrides(name)
    runs, seeds = Path(args.runs).resolve(), [int(s) for s in args.seeds.split(",")]
    planned = [(n, s, args.continue_steps if n in CONTINUATIONS else args.steps) for n in names for s in seeds] + \
        [(CONTINUATIONS[n][0], s, args.steps) for n in names if n in CONTINUATIONS for s in seeds]  # their sources
    clashes = []
    for n, s, steps in planned:
        run_dir = runs / f"{n}-seed{s}"
        bad = settings_mismatch(run_dir, n, run_overrides(n, s, steps, data, vocab, tokenizer, run_dir,
                                                          tuple(args.overrides)))
        if bad:
            clashes.append(f"  {run_dir}: " + "; ".join(bad))
    if clashes:
        print("repro: these run directories hold runs trained with other settings than asked, and would be "
              "skipped or resumed as if they were the runs asked for:\n" + "\n".join(clashes) +
              f"\nfix: give these runs a directory of their own (--runs {runs}-<tag>), or delete those to retrain")
        return 2
    run_dirs: dict[str, list[Path]] = {}
    for name in names:
        for seed in seeds:
            run_dir = runs / f"{name}-seed{seed}"
            run_dirs.setdefault(name, []).append(run_dir)
            steps = args.continue_steps if name in CONTINUATIONS else args.steps
            if finished(run_dir, steps):
                continue

            def run(name: str, run_dir: Path, steps: int, init: Path | None = None, seed: int = seed) -> None:
                print(f"repro: {name} seed {seed}: training (log: {run_dir}.log)", flush=True)
                seconds = train(name, seed, steps, data, vocab, tokenizer, run_dir, init, tuple(args.overrides))
                print(f"repro: {name} seed {seed}: {seconds:.0f} s", flush=True)

            init = None
            if name in CONTINUATIONS:
                init = continuation_start(name, seed, args.steps, runs, lambda n, d: run(n, d, args.steps))
            run(name, run_dir, steps, init)
    records = update_records(records_at, [run_record(n, d) for n, ds in run_dirs.items() for d in ds])
    print(summarise(results_of(records), Path(args.out)))
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
