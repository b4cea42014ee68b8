"""fp8 dispatch rows against full-precision rows on the tiny config's loss, over seeds (issue 15.4).

    .venv/bin/python benchmarks/fp8_wire_loss.py [--seeds 1,2,3] [--steps 150] [--set train.dtype=fp32]

For each seed, two 2-rank runs of configs/tiny.yaml (ep 2, moe.dispatch=dedup) that differ only in
moe.dispatch_dtype (the compute dtype's rows, or e4m3 rows with a float32 scale each); the same seed means the
same initial weights and data order, so the per-seed difference is paired. Prints the final validation losses,
mean ± standard error per setting and the paired difference, and writes JSON. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIRES = ("bf16", "fp8")  # bf16 = rows in the compute dtype (fp32 under train.dtype=fp32)


def final_valid(run_dir: Path) -> float | None:
    m = run_dir / "metrics.jsonl"
    if not m.is_file():
        return None
    valid = [json.loads(line)["valid/loss"] for line in m.read_text().splitlines() if "valid/loss" in line]
    return valid[-1] if valid else None


def train(run_dir: Path, seed: int, wire: str, args) -> None:
    sets = [f"train.seed={seed}", f"train.steps={args.steps}", "train.micro_batch_size=4", "moe.ep_size=2",
            "moe.dispatch=dedup", f"moe.dispatch_dtype={wire}", f"log.run_dir={run_dir}",
            f"log.eval_interval={args.steps}", "log.tensorboard=false", *args.overrides]
    cmd = [sys.executable, "-m", "coe_dist.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--nproc", "2", "--resume", "auto"]
    for s in sets:
        cmd += ["--set", s]
    print(f"fp8_wire_loss: seed {seed} {wire}: training", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def stderr(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else math.nan


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--runs", default=str(ROOT / "runs" / "fp8-wire"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fp8_wire_loss.json"))
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    finals: dict[str, list[float]] = {w: [] for w in WIRES}
    for seed in seeds:
        for wire in WIRES:
            run_dir = Path(args.runs) / f"{wire}-seed{seed}"
            if final_valid(run_dir) is None or not (run_dir / "checkpoints" / f"step_{args.steps}").is_dir():
                train(run_dir, seed, wire, args)
            finals[wire].append(final_valid(run_dir))
    diffs = [f - b for f, b in zip(finals["fp8"], finals["bf16"], strict=True)]
    print("| dispatch rows | final valid loss, mean ± s.e. | per seed |\n|---|---|---|")
    for wire in WIRES:
        xs = finals[wire]
        label = "e4m3 + scale" if wire == "fp8" else "the compute dtype"
        print(f"| {label} | {statistics.mean(xs):.4f} ± {stderr(xs):.4f} | {', '.join(f'{x:.4f}' for x in xs)} |")
    print(f"| fp8 - compute dtype, paired | {statistics.mean(diffs):+.4f} ± {stderr(diffs):.4f} | "
          f"{', '.join(f'{d:+.4f}' for d in diffs)} |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "seeds": seeds, "finals": finals, "diffs": diffs},
                                         indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
