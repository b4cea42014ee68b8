"""`coe-dist check`: a healthy 2-rank check passes; a slow rank, a layer that computes something else and a full
run directory each fail with one line naming what and where.

Launches: one healthy 2-rank check of every item (module fixture), one 2-rank check of the gemm and layer items
with two injected faults, one single-process disk check on a 1 MiB tmpfs (root). The rest runs in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coe_dist.check.disk import checkpoint_bytes, model_params
from coe_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# The tiny model at a tenth of its batch: the items' work is small, the process start dominates.
FAST = ("train.micro_batch_size=1", "train.seq_len=32", "data.num_documents=200", "model.max_seq_len=32")


def _check(tmp: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 600):
    cmd = [sys.executable, "-m", "coe_dist.cli", "check", "--config", TINY, "--set", f"log.run_dir={tmp / 'run'}"]
    for override in FAST:
        cmd += ["--set", override]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, cwd=tmp,
                          env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("check: ")]
    return proc, {line.split()[2]: line for line in lines if line.split()[1] in ("PASS", "WARN", "FAIL")}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("healthy")
    # bf16 stated: the default (auto) is fp32 on CPUs without native bf16, and this keeps bf16 training and its
    # layer tolerance tested on every machine
    proc, verdicts = _check(tmp, "--nproc", "2", "--steps", "2", "--set", "train.dtype=bf16")
    report = json.loads((tmp / "run" / "check" / "check.json").read_text())
    return proc, verdicts, {v["item"]: v for v in report["items"]}


def test_healthy_check_passes_every_item(healthy):
    proc, verdicts, _ = healthy
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(verdicts) == ["versions", "kernels", "disk", "gemm", "a2a", "layer", "train", "cost"]
    assert ", bf16; profile" in proc.stdout
    # Speed may only warn on this shared machine; correctness and the checkpoint must pass.
    assert all(not line.split()[1] == "FAIL" for line in verdicts.values()), verdicts
    for item in ("versions", "disk", "layer", "train"):
        assert verdicts[item].split()[1] == "PASS", verdicts[item]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_healthy_check_numbers(healthy):
    _, _, items = healthy
    train = items["train"]["data"]
    assert train["resumed_loss"] == train["losses"][-1]  # bitwise, read back from the JSON
    # The disk item's size, computed from the config, against the checkpoint the train item wrote.
    assert abs(items["disk"]["data"]["checkpoint_bytes"] - train["checkpoint_bytes"]) < 0.01 * train["checkpoint_bytes"]
    layer = items["layer"]["data"]
    assert all(max(e.values()) < layer["tolerance"] for e in layer["errors_per_rank"])
    assert len(items["gemm"]["data"]["tflops_per_rank"]) == 2
    assert 0 < items["cost"]["data"]["prediction"]["a2a_share"] < 1


def test_slow_rank_and_wrong_layer_fail_naming_rank_1(tmp_path):
    fault = "check.gemm@rank1:sleep=2,check.layer@rank1:corrupt"
    proc, verdicts = _check(tmp_path, "--nproc", "2", "--items", "gemm,layer", env={"COE_DIST_FAULT": fault})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    gemm, layer = verdicts["gemm"], verdicts["layer"]
    assert gemm.startswith("check: FAIL gemm") and "rank 1 (" in gemm and "rank 0 (" not in gemm.split(";")[-1]
    assert "far below the fastest rank" in gemm
    assert layer.startswith("check: FAIL layer") and "rank 1 (" in layer and "different layer" in layer
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_run_directory_fails(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        proc, verdicts = _check(tmp_path, "--items", "versions,disk", "--set", "moe.ep_size=1",
                                "--set", f"log.run_dir={mount / 'run'}", "--out", str(tmp_path / "out"))
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert verdicts["versions"].split()[1] == "PASS"
    line = verdicts["disk"]
    assert line.startswith("check: FAIL disk") and "not enough space" in line and "log.keep_last" in line
    need = 3 * checkpoint_bytes(load_config(TINY, [f"log.run_dir={mount}"]))  # keep_last 2 + 1
    assert f"need {need / 2 ** 30:.2f} GiB" in line


def test_unwritable_run_directory_fails(tmp_path):
    import dataclasses

    import torch

    from coe_dist.check.disk import check_disk
    from coe_dist.check.verdict import Context

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A run dir below a regular file: load_config refuses that path itself, so it is set after loading.
    cfg = load_config(TINY, [f"log.run_dir={tmp_path / 'ok'}"])
    cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, run_dir=str(blocker / "run")))

    v = check_disk(Context(cfg, 0, 1, 0, torch.device("cpu"), "gloo", None, tmp_path, hosts=["here"]))
    assert v.status == "FAIL" and "rank 0 (here) cannot write it" in v.text and "log.run_dir" in v.text


@pytest.mark.parametrize("overrides", [(), ("model.first_k_dense=1", "moe.independent_gating=false",
                                           "moe.num_shared_experts=0")])
def test_parameter_count_matches_the_model(overrides):
    import dataclasses

    from coe_dist.model import CoETransformer

    cfg = load_config(TINY, list(overrides))
    model = CoETransformer(cfg.model, dataclasses.replace(cfg.moe, ep_size=1))
    assert model_params(cfg) == sum(p.numel() for p in model.parameters())


def test_bad_items_and_steps_are_config_errors(tmp_path):
    from coe_dist.cli import main

    assert main(["check", "--config", TINY, "--items", "gemm,speed"]) == 2
    assert main(["check", "--config", TINY, "--steps", "1"]) == 2


@pytest.mark.cuda
def test_check_on_cuda_passes(tmp_path):
    """One GPU: the layer in bf16 and fp32 against float64 on CPU, the GEMM rate against the GPU profile."""
    for dtype in ("bf16", "fp32"):
        proc, verdicts = _check(tmp_path, "--items", "versions,kernels,gemm,layer", "--set", "moe.ep_size=1",
                                "--set", f"train.dtype={dtype}", "--set", "train.device=cuda")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert verdicts["layer"].split()[1] == "PASS" and "on cuda" in verdicts["layer"], verdicts["layer"]
        assert "cuda" in verdicts["versions"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="with CUDA the script runs its GPU parts (minutes)")
def test_gpu_check_script_on_cpu_says_no_cuda_and_writes_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable, "GPU_CHECK_QUICK": "1",
                                            "GPU_CHECK_OUT": str(out), "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout
    result = json.loads(out.read_text())
    assert result["cuda"] is False and set(result["parts"]) == {"check", "megatron", "train_step"}
    assert result["parts"]["check"]["exit_code"] == 0
    assert [v["item"] for v in result["check"]["items"]] == ["versions", "kernels", "disk"]
    for part in ("megatron_layer", "train_step"):  # a CPU-only run says so, and names the machine it ran on
        assert result[part]["cuda"] is False and set(result[part]) == {"cuda", "environment"}, result[part]
        assert result[part]["environment"]["cpu_count"] >= 1 and result[part]["environment"]["torch"]
    assert not list(tmp_path.glob("gpu-check.*")), "the script removes its work directory"
