"""The benchmarks' denominator (benchmarks/common.py): the large-GEMM limit per dtype and the FLOPs split by
dtype, checked against numbers computed here by hand."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from coe_dist.config import MoEConfig, load_config

from trainrun import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmarks import each other as scripts do
import common  # noqa: E402
import layer  # noqa: E402
import train_step  # noqa: E402


def test_limit_is_each_dtypes_flops_at_its_own_rate() -> None:
    # 6 GFLOP of bf16 at 3 GFLOP/s and 1 GFLOP of float32 at 0.5 GFLOP/s: 2 s + 2 s.
    assert common.limit_seconds({"bf16": 6e9, "fp32": 1e9}, {"bf16": 3e9, "fp32": 0.5e9}) == 4.0
    assert common.limit_seconds({"bf16": 6e9, "fp32": 0.0}, {"bf16": 3e9}) == 2.0  # no float32 work: no rate needed


@pytest.mark.parametrize(("target", "passes"), [(100.0, 1), (1000.0, 7)])
def test_large_gemm_runs_the_three_layouts_to_the_target_flops(target: float, passes: int) -> None:
    fn, flops = common.large_gemm(torch.float32, 4, 3, 2, target)
    assert flops == passes * 3 * 2 * 4 * 3 * 2  # three matmuls of 2*m*k*n per pass
    fn()


def test_layer_flops_split_by_dtype() -> None:
    """CoE-2(4/64) + 1 shared at the benchmark's shape: experts and shared expert in bf16, the router in
    float32 (3x forward for training)."""
    cfg = MoEConfig(iterations=2, top_k=4, num_experts=64, expert_hidden_size=352, num_shared_experts=1)
    fl = layer.layer_flops(cfg, tokens=4096, d=512)
    bf16 = 3 * 2 * (2 * 4096 * 4 * 3 * 512 * 352 + 2 * 4096 * 3 * 512 * 352)
    fp32 = 3 * 2 * 2 * 4096 * 512 * 64
    assert fl["train_by_dtype"] == {"bf16": bf16, "fp32": fp32}
    assert fl["train"] == bf16 + fp32 and math.isclose(fl["train"] / 1e9, 134.5, rel_tol=1e-3)  # docs/performance.md


def test_train_step_flops_split_by_dtype() -> None:
    """configs/bench/train-step.yaml, per token, forward (docs/performance.md's table): float32 = attention
    scores/values 2 d (L+1) and router C 2 d N, per layer; the rest bf16."""
    cfg = load_config(str(ROOT / "configs" / "bench" / "train-step.yaml"))
    split = train_step.flops_by_dtype(train_step.flops_per_token(cfg))
    d, L, layers, C, N = 512, 512, 4, 2, 64
    fp32 = layers * (2 * d * (L + 1) + C * 2 * d * N)
    assert split["fp32"] == fp32 and math.isclose(fp32 / 1e6, 2.62, abs_tol=0.01)
    assert math.isclose(split["bf16"] / 1e6, 51.92, abs_tol=0.01)


def test_every_results_file_names_the_machine_it_was_measured_on(tmp_path) -> None:
    """Times and losses compare only within one machine: write_json adds the environment where a benchmark did
    not (the CPU model as /proc/cpuinfo gives it), keeps one a benchmark recorded, and writes the file whole."""
    out = common.write_json(tmp_path / "r.json", {"rows": [1]})
    written = json.loads(out.read_text())
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    assert written["rows"] == [1] and written["environment"]["cpu"] == cpu
    assert written["environment"]["torch"] == torch.__version__
    kept = json.loads(common.write_json(tmp_path / "r.json", {"environment": {"cpu": "given"}}).read_text())
    assert kept["environment"] == {"cpu": "given"} and [p.name for p in tmp_path.iterdir()] == ["r.json"]
