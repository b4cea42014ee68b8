"""Reproduce the CoE paper's comparison at small scale on GSM8K (configs/repro/), and write docs/repro.md.

    .venv/bin/python benchmarks/repro.py [--seeds 1,2] [--steps 300] [--configs coe-2-4of64,moe-8of64]

Preprocesses ../shared/data/gsm8k (train for training, test for validation) with the GPT-NeoX tokenizer,
trains every config with 2 ranks and ep 2 for each seed, then tabulates the final validation loss
(mean +/- half the spread over seeds), parameters, peak memory and tokens/s, and plots validation loss
against step. Runs that already finished (their metrics.jsonl reaches the last step) are not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

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
            # Same dtype, same token counts: the index (document sizes and byte offsets) is unchanged.
            compact.with_suffix(".idx").write_bytes(prefix.with_suffix(".idx").read_bytes())
        out[split] = compact
    return out, -(-len(used) // 64) * 64


def train(config: Path, seed: int, steps: int, data: dict[str, Path], vocab: int, tokenizer: Path,
          run_dir: Path) -> float:
    """One 2-rank run; returns its wall time. Peak RSS of the ranks is read by the caller from rusage."""
    args = [sys.executable, "-m", "coe_dist.cli", "train", "--config", str(config), "--nproc", "2"]
    for o in (f"train.seed={seed}", f"train.steps={steps}", f"log.run_dir={run_dir}",
              f"data.dataset={data['train']}", f"data.valid_dataset={data['test']}", f"data.tokenizer={tokenizer}",
              f"data.cache_dir={CACHE / 'cache'}", f"model.vocab_size={vocab}", f"log.eval_interval={max(1, steps // 6)}"):
        args += ["--set", o]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (run_dir.parent / f"{run_dir.name}.log").open("w") as log:
        subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - start


def finished(run_dir: Path, steps: int) -> bool:
    m = run_dir / "metrics.jsonl"
    return m.is_file() and any(json.loads(line).get("step") == steps and "valid/loss" in line
                               for line in m.read_text().splitlines())


def summarise(run_dirs: dict[str, list[Path]], out_md: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, dirs in run_dirs.items():
        finals, tps = [], []
        for d in dirs:
            recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            valid = [(r["step"], r["valid/loss"]) for r in recs if "valid/loss" in r]
            finals.append(valid[-1][1])
            tps.append(statistics.median(r["tokens_per_s"] for r in recs if "tokens_per_s" in r))
            ax.plot(*zip(*valid, strict=True), label=f"{name} ({d.name})", alpha=0.8)
        info = json.loads((dirs[0] / "run_info.json").read_text())
        peak = max(r.get("peak_memory_mib", 0.0) for r in recs)  # rank 0's peak RSS
        rows.append((name, statistics.mean(finals), (max(finals) - min(finals)) / 2, len(finals),
                     info["layout"]["parameters_rank0"], peak, statistics.median(tps)))
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (GSM8K test)")
    ax.legend(fontsize=7)
    plot = out_md.parent / "repro" / "valid_loss.png"
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=120, bbox_inches="tight")
    lines = ["| config | final valid loss (mean ± half-spread) | seeds | params on rank 0 (total / experts) | "
             "peak RSS per rank (MiB) | tokens/s (median) |", "|---|---|---|---|---|---|"]
    for name, mean, half, n, params, peak, tps in sorted(rows, key=lambda r: r[1]):
        lines.append(f"| {name} | {mean:.4f} ± {half:.4f} | {n} | {params['total_local']:,} / "
                     f"{params['expert_local']:,} | {peak:.0f} | {tps:,.0f} |")
    table = "\n".join(lines)
    out_md.write_text(out_md.read_text().split("<!-- table -->")[0] + "<!-- table -->\n" + table + "\n"
                      if out_md.is_file() and "<!-- table -->" in out_md.read_text() else table + "\n")
    print(table)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--configs", default="", help="comma-separated names from configs/repro (default: all)")
    p.add_argument("--out", default=str(ROOT / "docs" / "repro.md"))
    args = p.parse_args()
    tokenizer = SHARED / "tokenizers" / "gpt-neox-20b.tokenizer.json"
    if not tokenizer.is_file():
        print(f"repro: {tokenizer} not found: this benchmark needs ../shared/data (GSM8K + GPT-NeoX tokenizer)")
        return 1
    data, vocab = compact_vocabulary(preprocess(tokenizer))
    names = args.configs.split(",") if args.configs else sorted(p.stem for p in (ROOT / "configs/repro").glob("*.yaml"))
    run_dirs: dict[str, list[Path]] = {}
    for name in names:
        for seed in (int(s) for s in args.seeds.split(",")):
            run_dir = ROOT / "runs" / "repro" / f"{name}-seed{seed}"
            run_dirs.setdefault(name, []).append(run_dir)
            if finished(run_dir, args.steps):
                continue
            seconds = train(ROOT / "configs/repro" / f"{name}.yaml", seed, args.steps, data, vocab, tokenizer,
                            run_dir)
            print(f"repro: {name} seed {seed}: {seconds:.0f} s", flush=True)
    summarise(run_dirs, Path(args.out))
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
