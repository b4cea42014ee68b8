"""The reproduction's bookkeeping: the summary table and verdicts (benchmarks/repro.py) against hand-computed
values, and the paper-scale Slurm driver (slurm/repro.sh) in --dry-run."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from coe_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("repro", ROOT / "benchmarks" / "repro.py")
repro = importlib.util.module_from_spec(spec)
sys.modules["repro"] = repro  # dataclasses look their module up there
spec.loader.exec_module(repro)


UNKNOWN_SLUG = "machine-not-recorded-dtype-not-recorded"  # runs whose run_info.json names no machine


def fake_run(root: Path, name: str, seed: int, curve: list[tuple[int, float]], finished: bool = True) -> None:
    d = root / f"{name}-seed{seed}"
    d.mkdir(parents=True)
    recs = []
    for step, loss in curve:
        recs.append({"step": step, "lm_loss": loss + 0.1, "tokens_per_s": 1000.0 * seed,
                     "peak_memory_mib": 100.0 * seed})
        recs.append({"step": step, "valid/loss": loss})
    if not finished:
        recs.append({"step": curve[-1][0] + 1, "lm_loss": 1.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    layout = {"ep_size": 2, "parameters_rank0": {"total_local": 700, "expert_local": 300, "dense": 400}}
    (d / "run_info.json").write_text(json.dumps({"layout": layout}))


def test_summary_table_and_verdicts(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "coe-2-4of64", 1, [(10, 3.0), (20, 2.00)])
    fake_run(runs, "coe-2-4of64", 2, [(10, 3.2), (20, 2.10)])
    fake_run(runs, "moe-8of64", 1, [(10, 3.1), (20, 2.40)])
    fake_run(runs, "moe-8of64", 2, [(10, 3.3), (20, 2.60)])
    fake_run(runs, "coe-2-4of48", 1, [(10, 3.0), (20, 2.45)])
    fake_run(runs, "coe-2-4of48", 2, [(10, 3.0), (20, 2.62)])
    fake_run(runs, "coe-2-4of64", 3, [(10, 3.1), (20, 2.05)])  # a third seed for the first claim
    fake_run(runs, "moe-8of64", 3, [(10, 3.2), (20, 2.50)])
    fake_run(runs, "coe-2-4of64-shared-gating", 1, [(10, 3.0), (20, 2.02)])
    fake_run(runs, "coe-2-4of64-shared-gating", 2, [(10, 3.0), (20, 2.04)])
    fake_run(runs, "dense-8of8-c1", 1, [(10, 3.0), (20, 1.5)], finished=False)  # left out
    groups = repro.runs_in(runs)
    assert sorted(groups) == ["coe-2-4of48", "coe-2-4of64", "coe-2-4of64-shared-gating", "moe-8of64"]
    out = tmp_path / "docs" / "repro.md"
    out.parent.mkdir()
    out.write_text("# intro kept\n<!-- table -->\nold table, replaced\n")
    text = repro.summarise([repro.load_result(n, d) for n, d in groups.items()], out)
    # coe: mean of 2.00, 2.10, 2.05 = 2.05, stdev 0.05, standard error 0.05 / sqrt 3; whole model 400 dense +
    # 2 x 300 experts = 1000 params; peak 100 x seed, tokens/s 1000 x seed (median over seeds: 2000)
    assert "| coe-2-4of64 | 2.0500 ± 0.0289 (3) | 2.0000, 2.1000, 2.0500 | 0.00 M (0.00 M) | 300 | 2,000 | -, -, - |" \
        in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| ")}
    # coe - moe per seed: -0.40, -0.50, -0.45: mean -0.45, standard error 0.05 / sqrt 3 = 0.0289; t(2) = 4.303,
    # half-width 0.1242: -0.5742 to -0.3258 excludes 0: holds
    assert "| -0.4500 ± 0.0289 (3 paired) | -0.5742 to -0.3258 | 3 of 3 | holds |" in rows[
        "CoE-2(4/64) beats MoE(8/64) at equal FLOPs (paper: 1.12 vs 1.20)"]
    # 4of48 - moe: +0.05, +0.02: mean 0.035, se 0.015, t(1) = 12.706: +-0.1906 spans 0: no difference resolved
    assert "| +0.0350 ± 0.0150 (2 paired) | -0.1556 to +0.2256 | 0 of 2 | holds: no difference resolved at 2 seeds |" \
        in rows["CoE-2(4/48) matches MoE(8/64) with fewer parameters"]
    # coe - shared gating over seeds 1 and 2: -0.02, +0.06
    assert "| +0.0200 ± 0.0400 (2 paired) | -0.4882 to +0.5282 | 1 of 2 | not resolved at 2 seeds |" in rows[
        "independent gating beats one shared router"]
    assert not any("inner residual" in r for r in rows)  # no runs of that ablation: no row
    written = out.read_text()
    assert written.startswith("# intro kept\n<!-- table -->\n") and "old table" not in written
    assert (tmp_path / "docs" / "repro" / f"valid_loss-{UNKNOWN_SLUG}.png").stat().st_size > 1000
    coe = repro.load_result("coe-2-4of64", groups["coe-2-4of64"])
    assert (coe.params, coe.expert_params) == (1000, 600)


def test_standard_error_and_paired_differences_by_hand():
    assert repro.standard_error([2.0, 2.1]) == pytest.approx(0.05, rel=1e-12)
    # mean 7/3; stdev sqrt(((4/3)^2 + (1/3)^2 + (5/3)^2) / 2) = sqrt(7/3); / sqrt(3) = sqrt(7) / 3
    assert repro.standard_error([1.0, 2.0, 4.0]) == pytest.approx(7 ** 0.5 / 3, rel=1e-12)
    assert math.isnan(repro.standard_error([1.0]))
    a = repro.Result("a", [2.0, 2.1, 2.3], [], 1, 1, 0.0, 0.0, seeds=[1, 2, 3])
    b = repro.Result("b", [2.2, 2.2, 9.0], [], 1, 1, 0.0, 0.0, seeds=[1, 2, 4])
    d = repro.paired(a, b)  # seeds 1 and 2 only: -0.2, -0.1
    assert d.seeds == [1, 2] and d.diffs == pytest.approx([-0.2, -0.1], abs=1e-12)
    assert (d.mean, d.stderr) == (pytest.approx(-0.15, abs=1e-12), pytest.approx(0.05, rel=1e-9))


def test_variants_paired_rows_and_wall_time(tmp_path):
    runs = tmp_path / "runs"
    for seed, base, aux in ((1, 2.00, 1.90), (2, 2.10, 2.06), (3, 2.30, 2.21)):
        fake_run(runs, "coe-2-4of64", seed, [(10, 3.0), (20, base)])
        fake_run(runs, "coe-2-4of64+auxfree", seed, [(10, 3.0), (20, aux)])
    repro.record_wall_time(runs / "coe-2-4of64+auxfree-seed1", 100.0)
    repro.record_wall_time(runs / "coe-2-4of64+auxfree-seed1", 20.5)  # a resumed run: attempts add up
    groups = repro.runs_in(runs)
    text = repro.summarise([repro.load_result(n, d) for n, d in groups.items()], tmp_path / "out.md")
    # auxfree: 1.90, 2.06, 2.21: mean 2.0567, stdev 0.15503 / sqrt 3 = 0.0895; wall 120.5 s, then none
    assert "| coe-2-4of64+auxfree | 2.0567 ± 0.0895 (3) | 1.9000, 2.0600, 2.2100 |" in text
    assert text.split("| coe-2-4of64+auxfree |")[1].splitlines()[0].endswith("| 120, -, - |")
    # paired: -0.10, -0.04, -0.09: mean -0.0767, stdev 0.03215 / sqrt 3 = 0.0186
    assert ("| coe-2-4of64+auxfree | coe-2-4of64 | -0.0767 ± 0.0186 (3) | 1: -0.1000, 2: -0.0400, 3: -0.0900 |"
            in text)


def test_variant_names():
    config, overrides = repro.config_and_overrides("coe-2-4of64+auxfree+devlim")
    assert config == ROOT / "configs" / "repro" / "coe-2-4of64.yaml"
    assert overrides == ["moe.aux_loss_coef=0", "moe.expert_bias_rate=0.001", "moe.routing_groups=2",
                         "moe.routing_group_topk=1"]
    for variant in repro.VARIANTS:  # every variant is a valid config on the family's CoE and MoE
        for name in ("coe-2-4of64", "moe-8of64"):
            load_config(config.with_name(f"{name}.yaml"), repro.config_and_overrides(f"{name}+{variant}")[1])
    with pytest.raises(SystemExit, match="unknown variant 'fast' in 'coe-2-4of64\\+fast': use one of auxfree"):
        repro.config_and_overrides("coe-2-4of64+fast")
    with pytest.raises(SystemExit, match="coe-9.yaml does not exist"):
        repro.config_and_overrides("coe-9+auxfree")


def test_continuations_start_from_the_finished_source_of_the_same_seed(tmp_path, monkeypatch):
    # The upcycled CoE trains the CoE config; its conversion makes exactly that config's C and K.
    config, overrides = repro.config_and_overrides("coe-2-4of64@upcycled")
    assert config.name == "coe-2-4of64.yaml" and overrides == []
    coe, moe = load_config(config).moe, load_config(config.with_name("moe-8of64.yaml")).moe
    convert = repro.CONTINUATIONS["coe-2-4of64@upcycled"][1]
    assert convert == ["--iterations", str(coe.iterations), "--top-k", str(coe.top_k)]
    assert (moe.iterations, moe.top_k * moe.iterations) == (1, 7) and coe.top_k * coe.iterations == 6
    with pytest.raises(SystemExit, match="unknown continuation 'coe-2-4of64@later'"):
        repro.config_and_overrides("coe-2-4of64@later")

    monkeypatch.setattr(repro, "ROOT", tmp_path)
    trained, converted = [], []
    monkeypatch.setattr(repro.subprocess, "run", lambda args, **kw: converted.append(args))
    runs = tmp_path / "runs" / "repro"
    start = repro.continuation_start("moe-8of64@continued", 2, 20, runs, lambda n, d: trained.append((n, d)))
    assert start == runs / "moe-8of64-seed2" and trained == [("moe-8of64", start)]  # unfinished: trained first
    fake_run(runs, "moe-8of64", 1, [(10, 3.0), (20, 2.5)])
    start = repro.continuation_start("coe-2-4of64@upcycled", 1, 20, runs, lambda n, d: trained.append((n, d)))
    assert len(trained) == 1 and start == runs / "init" / "coe-2-4of64@upcycled-seed1"
    args = converted[0]
    assert args[args.index("--from-checkpoint") + 1] == str(runs / "moe-8of64-seed1")
    assert args[args.index("--output") + 1] == str(start) and args[-4:] == convert
    assert ("coe-2-4of64@upcycled", "moe-8of64@continued") in repro.comparisons(list(repro.CONTINUATIONS))


def test_a_run_trained_with_other_settings_is_not_skipped_or_resumed_as_the_one_asked_for(tmp_path, monkeypatch):
    """The tired user's mistake: the same --seeds and --configs again with another --set (fp32 where bf16 ran).
    Every run directory is checked before anything trains, against the config the trainer writes (its own
    config.yaml, made here by the config loader the trainer uses)."""
    data, vocab, tok = {"train": tmp_path / "t", "test": tmp_path / "v"}, 128, tmp_path / "tok.json"
    runs = tmp_path / "runs"

    def trained(name: str, seed: int, steps: int, *extra: str) -> None:
        run_dir = runs / f"{name}-seed{seed}"
        run_dir.mkdir(parents=True)
        over = repro.run_overrides(name, seed, steps, data, vocab, tok, run_dir, extra)
        cfg = load_config(repro.config_and_overrides(name)[0], over)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))

    trained("coe-2-4of64", 1, 300)
    trained("moe-8of64", 1, 300, "train.dtype=fp32")
    trained("moe-8of64@continued", 1, 150)

    def mismatch(name: str, seed: int, steps: int, *extra: str) -> list[str]:
        run_dir = runs / f"{name}-seed{seed}"
        return repro.settings_mismatch(run_dir, name, repro.run_overrides(name, seed, steps, data, vocab, tok,
                                                                          run_dir, extra))

    assert mismatch("coe-2-4of64", 1, 300) == [] and mismatch("coe-2-4of64", 2, 300, "train.dtype=fp32") == []
    assert mismatch("coe-2-4of64", 1, 300, "train.dtype=fp32") == ["train.dtype: trained bf16, asked fp32"]
    assert mismatch("moe-8of64", 1, 300) == ["train.dtype: trained fp32, asked bf16"]  # the --set left off
    assert mismatch("moe-8of64", 1, 300, "train.dtype=auto", "train.dtype=fp32") == []
    assert mismatch("coe-2-4of64", 1, 300, "train.dtype=auto") == []  # auto: whatever this device resolves it to
    assert mismatch("coe-2-4of64", 1, 400) == ["train.steps: trained 300, asked 400"]
    assert mismatch("moe-8of64@continued", 1, 150) == []  # --init-from's path is not a setting of the function
    assert set(mismatch("coe-2-4of64", 1, 300, *repro.VARIANTS["devlim"])) == {
        "moe.routing_groups: trained 1, asked 2"}  # routing_group_topk 1 is the default: no clash there
    # through main: refused before anything trains (train and preprocessing would fail here: no data, no GPU)
    monkeypatch.setattr(repro, "preprocess", lambda tok: data)
    monkeypatch.setattr(repro, "compact_vocabulary", lambda d: (d, vocab))
    monkeypatch.setattr(repro, "SHARED", tmp_path)
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "gpt-neox-20b.tokenizer.json").write_text("{}")
    monkeypatch.setattr(repro, "train", lambda *a, **k: pytest.fail("trained despite the clash"))
    monkeypatch.setattr(sys, "argv", ["repro.py", "--seeds", "1", "--configs", "coe-2-4of64,moe-8of64@continued",
                                      "--runs", str(runs), "--out", str(tmp_path / "repro.md")])
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert repro.main() == 2
    text = out.getvalue()
    # the continuation's source run, checked before the continuation would train it or start from it
    assert f"{runs / 'moe-8of64-seed1'}: train.dtype: trained fp32, asked bf16" in text
    assert "coe-2-4of64-seed1" not in text and f"--runs {runs}-<tag>" in text


def test_worst_load_averages_the_last_logging_steps_then_takes_the_worst():
    recs = [{"step": s, "moe/layer0/iter0/load_imbalance": a, "moe/layer1/iter1/load_imbalance": b}
            for s, a, b in ((1, 50.0, 50.0), (2, 2.0, 1.0), (3, 4.0, 7.0), (4, 3.0, 1.0), (5, 3.0, 1.0),
                            (6, 3.0, 2.0))] + [{"step": 6, "valid/loss": 1.0}]
    # last 5 logging steps: layer0/iter0 mean 3.0, layer1/iter1 mean 2.4 -> 3.0 (step 1 left out)
    assert repro.worst_load(recs) == pytest.approx(3.0)
    assert repro.worst_load([{"step": 1, "lm_loss": 2.0}]) is None


def test_records_outlive_the_run_directories(tmp_path, monkeypatch):
    """--summarise keeps one record per run next to the table: a seed whose directory is gone still counts, a
    rerun of the same config and seed on the same machine replaces its record (on another machine it is another
    run, in that machine's section), and a record kept without a curve is tabulated but not plotted."""
    runs, out = tmp_path / "runs", tmp_path / "docs" / "repro.md"
    fake_run(runs, "coe-2-4of64", 1, [(10, 3.0), (20, 2.00)])
    fake_run(runs, "coe-2-4of64", 2, [(10, 3.2), (20, 2.10)])
    (runs / "coe-2-4of64-seed2" / "config.yaml").write_text("train:\n  dtype: fp32\n")
    machine = {"cpu": "AMD EPYC", "cpu_isa": "avx2", "cores": 2, "gpu": None}
    info = json.loads((runs / "coe-2-4of64-seed2" / "run_info.json").read_text())
    (runs / "coe-2-4of64-seed2" / "run_info.json").write_text(json.dumps({**info, "machine": machine}))
    monkeypatch.setattr(sys, "argv", ["repro.py", "--summarise", str(runs), "--out", str(out)])
    assert repro.main() == 0
    records_at = tmp_path / "docs" / "repro" / "runs.jsonl"
    kept = [json.loads(line) for line in records_at.read_text().splitlines()]
    assert [(r["config"], r["seed"], r["final"]) for r in kept] == [("coe-2-4of64", 1, 2.0), ("coe-2-4of64", 2, 2.1)]
    assert kept[1]["curve"] == [[10, 3.2], [20, 2.1]] and kept[1]["dtype"] == "fp32"

    # seed 1's directory is gone; seed 2 reran (2.30 now); seed 3 survives only as a record without a curve
    for d in runs.iterdir():
        shutil.rmtree(d)
    fake_run(runs, "coe-2-4of64", 2, [(10, 3.2), (20, 2.30)])
    with records_at.open("a") as f:
        f.write(json.dumps({**kept[0], "seed": 3, "final": 2.5, "curve": [[20, 2.5]], "wall_s": 7.0}) + "\n")
    assert repro.main() == 0
    text = out.read_text()
    unknown, epyc = text.split("### Trained on AMD EPYC (avx2, 2 cores), fp32: 1 run\n")
    # 2.00, 2.30, 2.50: mean 2.2667, stdev 0.25166 / sqrt 3 = 0.1453
    assert "### Trained on machine not recorded, dtype not recorded: 3 runs" in unknown
    assert "| coe-2-4of64 | 2.2667 ± 0.1453 (3) | 2.0000, 2.3000, 2.5000 |" in unknown
    assert "| coe-2-4of64 | 2.1000 ± nan (1) | 2.1000 |" in epyc  # the earlier seed 2, trained elsewhere: kept
    kept = [json.loads(line) for line in records_at.read_text().splitlines()]
    assert sorted((r["seed"], r["final"]) for r in kept) == [(1, 2.0), (2, 2.1), (2, 2.3), (3, 2.5)]
    assert (tmp_path / "docs" / "repro" / f"valid_loss-{UNKNOWN_SLUG}.png").stat().st_size > 1000


def test_no_mean_or_paired_difference_mixes_machines(tmp_path):
    """The same config and seed trained on two machines are two runs; a claim's pair is formed within a machine.
    By hand: on the EPYC, coe - moe per seed = -0.10, -0.20 (mean -0.15); on the Xeon coe alone (no pair)."""
    epyc = {"cpu": "AMD EPYC", "cpu_isa": "avx2", "cores": 2, "gpu": None}
    xeon = {"cpu": "Intel Xeon", "cpu_isa": "amx_bf16", "cores": 2, "gpu": None}

    def rec(config: str, seed: int, final: float, machine: dict, dtype: str) -> dict:
        return {"config": config, "seed": seed, "final": final, "curve": [[20, final]], "params": 1,
                "expert_params": 1, "peak_mib": 1.0, "tokens_per_s": 1.0, "wall_s": None, "max_load": None,
                "dtype": dtype, "machine": machine}

    records = repro.update_records(tmp_path / "runs.jsonl", [
        rec("coe-2-4of64", 1, 2.0, epyc, "fp32"), rec("coe-2-4of64", 2, 2.1, epyc, "fp32"),
        rec("moe-8of64", 1, 2.1, epyc, "fp32"), rec("moe-8of64", 2, 2.3, epyc, "fp32"),
        rec("coe-2-4of64", 1, 9.0, xeon, "bf16"), rec("coe-2-4of64", 2, 9.5, epyc, "bf16")])
    assert len(records) == 6  # none replaced another: machine or dtype differ
    results = repro.results_of(records)
    assert sorted((r.machine, r.name, len(r.finals)) for r in results) == [
        ("AMD EPYC (avx2, 2 cores), bf16", "coe-2-4of64", 1), ("AMD EPYC (avx2, 2 cores), fp32", "coe-2-4of64", 2),
        ("AMD EPYC (avx2, 2 cores), fp32", "moe-8of64", 2), ("Intel Xeon (amx_bf16, 2 cores), bf16", "coe-2-4of64", 1)]
    out = tmp_path / "repro.md"
    text = repro.summarise(results, out)
    fp32 = text.split("### Trained on AMD EPYC (avx2, 2 cores), fp32: 4 runs\n")[1].split("### ")[0]
    assert "| -0.1500 ± 0.0500 (2 paired) |" in fp32
    assert text.count("CoE-2(4/64) beats MoE(8/64)") == 1  # no pair on the other machines
    assert text.count("| paper's claim |") == 1  # nor an empty verdict table
    assert text.count("| A | B | paired") == 1  # nor an empty table of pairs
    with pytest.raises(ValueError, match="a row holds the runs of one machine"):
        repro.result_of("coe-2-4of64", [rec("coe-2-4of64", 1, 2.0, epyc, "fp32"),
                                        rec("coe-2-4of64", 2, 9.0, xeon, "bf16")])


def test_machine_label():
    epyc = {"cpu": "AMD EPYC", "cpu_isa": "avx2", "cores": 2, "gpu": None}
    assert repro.machine_label(epyc, "fp32") == "AMD EPYC (avx2, 2 cores), fp32"
    assert repro.machine_label({**epyc, "gpu": "NVIDIA H200"}, "bf16") == "NVIDIA H200, bf16"
    assert repro.machine_label(None, None) == "machine not recorded, dtype not recorded"
    # what run_info.json records of this machine, against lscpu's reading of it
    from coe_dist.train.run_info import CPU_ISAS, machine

    here = machine()
    flags = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.split("Flags:")[1].split()
    assert here["cpu_isa"] == next((i for i in CPU_ISAS if i in flags), None)
    assert here["cores"] == os.cpu_count() and (here["gpu"] is None) == (not torch.cuda.is_available())


def test_verdict_reversed_unequal_unpaired_and_one_seed():
    a = repro.Result("a", [2.0, 2.1, 2.2], [], 1, 1, 0.0, 0.0, seeds=[1, 2, 3])
    b = repro.Result("b", [1.0, 1.2, 1.3], [], 1, 1, 0.0, 0.0, seeds=[1, 2, 3])
    # paired 1.0, 0.9, 0.9: mean 0.9333, standard error 0.0333, t(2) x 0.0333 = 0.1434 < 0.9333: resolved
    d = repro.difference(a, b)
    assert (d.kind, d.seeds, d.mean, d.half_width) == ("paired", 3, pytest.approx(14 / 15), pytest.approx(4.303 / 30))
    assert repro.verdict(a, b, "lower") == "does not hold: reversed"
    assert repro.verdict(a, b, "equal") == "does not hold: A is higher"
    assert repro.verdict(b, a, "equal") == "holds, and more: A is lower"
    assert repro.verdict(b, a, "lower") == "holds"
    # no seed in common: unpaired, standard errors 0.1 / sqrt 3 and 0.15275 / sqrt 3 added in quadrature
    c = repro.Result("c", [1.0, 1.2, 1.3], [], 1, 1, 0.0, 0.0, seeds=[4, 5, 6])
    d = repro.difference(a, c)
    assert (d.kind, d.stderr) == ("unpaired", pytest.approx((0.01 / 3 + 0.0233333 / 3) ** 0.5, rel=1e-4))
    assert repro.verdict(c, a, "lower") == "holds"
    # one seed each: no interval, however large the gap
    one_a = repro.Result("a", [2.0], [], 1, 1, 0.0, 0.0, seeds=[1])
    one_b = repro.Result("b", [1.0], [], 1, 1, 0.0, 0.0, seeds=[1])
    assert repro.verdict(one_b, one_a, "lower") == "not resolved at 1 seed"
    assert repro.verdict(one_b, one_a, "equal") == "holds: no difference resolved at 1 seed"
    # one seed in common with a config of one seed: the same-seed difference (-1.0), not the difference of the
    # means (-1.1, which brings in a's seeds 2 and 3)
    d = repro.difference(one_b, a)
    assert (d.kind, d.seeds, d.mean) == ("paired", 1, pytest.approx(-1.0)) and math.isnan(d.stderr)
    assert repro.verdict(one_b, a, "lower") == "not resolved at 1 seed"
    # the t table: tabulated, between entries (the smaller dof, wider), and large samples
    assert (repro.t_975(4), repro.t_975(11), repro.t_975(100)) == (2.776, 2.228, 1.960)


def _slurm_repro(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "slurm/repro.sh"), *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_paper_scale_driver_dry_run(tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.parquet").write_bytes(b"")
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    out = _slurm_repro("--data", str(data), "--tokenizer", str(tok), "--partition", "gpu", "--time", "06:00:00",
                       "--out", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    cmds = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("coe-dist")]
    preprocess = [c for c in cmds if c[1] == "preprocess"]
    submits = [c for c in cmds if c[1:3] == ["slurm", "submit"]]
    assert [c[c.index("--output") + 1] for c in preprocess] == [
        f"{tmp_path}/runs/data/gsm8k-{s}" for s in ("train", "test")]
    configs = sorted(p.stem for p in (ROOT / "configs/paper").glob("*.yaml"))
    assert len(configs) == 7 and len(submits) == 14  # every paper config x seeds 1, 2
    seen = sorted((Path(c[c.index("--config") + 1]).stem, c[c.index("--set") + 1]) for c in submits)
    assert seen == sorted((n, f"train.seed={s}") for n in configs for s in (1, 2))
    first = submits[0]
    assert first[first.index("--procs-per-node") + 1] == "8" and "--gpus-per-node" in first
    assert f"data.valid_dataset={tmp_path}/runs/data/gsm8k-test" in first
    # Each submission renders: the config, its overrides and the world of 8 processes are valid together.
    for cmd in (submits[0], submits[-1]):
        rendered = subprocess.run([sys.executable, "-m", "coe_dist.cli", *cmd[1:], "--dry-run"], capture_output=True,
                                  text=True, cwd=ROOT, timeout=120)
        assert rendered.returncode == 0, rendered.stderr
        assert "#SBATCH --gpus-per-node=8" in rendered.stdout and "#SBATCH --partition=gpu" in rendered.stdout


@pytest.mark.parametrize(("args", "message"), [
    ((), "--data DIR is required"),
    (("--data", "/nonexistent", "--tokenizer", "/x"), "/nonexistent/train.parquet does not exist"),
    (("--data", "{data}", "--tokenizer", "{tok}", "--seeds", "1;2"), "--seeds 1;2"),
    (("--data", "{data}", "--tokenizer", "{tok}", "--configs", "coe-9"), "configs/paper/coe-9.yaml does not exist"),
])
def test_paper_scale_driver_refuses_bad_arguments(tmp_path, args, message):
    data = tmp_path / "d"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.parquet").write_bytes(b"")
    (tmp_path / "tok.json").write_text("{}")
    args = [a.format(data=data, tok=tmp_path / "tok.json") for a in args]
    out = _slurm_repro(*args, "--dry-run")
    assert out.returncode == 2 and message in out.stderr, out.stderr
