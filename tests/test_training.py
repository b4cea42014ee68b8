"""The LM learns, bf16 matches fp32 at the start, and expert-parallel training equals one process."""

from __future__ import annotations

import pytest
import torch
import yaml

from coe_dist.config import load_config
from coe_dist.data.loader import build_data
from coe_dist.model import CoETransformer

from trainrun import TINY, losses, run_train

FAST = ("train.dtype=fp32", "log.log_interval=1", "log.eval_batches=0", "data.num_documents=400")


def test_tiny_lm_learns(tmp_path):
    """The README's job, shortened: loss on the embedded corpus falls well below its start."""
    proc = run_train(2, tmp_path, "train.steps=60", "log.log_interval=1", "log.eval_interval=60")
    curve = losses(tmp_path)
    first, last = curve[1], curve[60]
    assert last < 0.5 * first, curve
    assert (tmp_path / "checkpoints" / "step_60" / "meta.json").is_file()
    # train.dtype: auto (the tiny config's) trained in bf16 only where this CPU has it natively, and said so
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    want = "bf16" if torch.cuda.is_available() or {"avx512_bf16", "amx_bf16"} & set(flags) else "fp32"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["dtype"] == want
    assert f" dtype={want} " in proc.stdout


def test_bf16_first_step_loss_within_2_percent_of_fp32(tmp_path):
    cfg = load_config(TINY, ["moe.ep_size=1", f"data.cache_dir={tmp_path}", "data.num_documents=200"])
    batch = build_data(cfg, dp_rank=0, dp_size=1).train.next_micro_batch()
    model = CoETransformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    with torch.no_grad():
        fp32 = model(batch[0], batch[1]).loss.item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(batch[0], batch[1]).loss.item()
    assert abs(bf16 - fp32) / fp32 < 0.02, (bf16, fp32)


@pytest.mark.parametrize("zero_stage", [2])
def test_ep2_training_equals_one_process_with_grad_accum(tmp_path, zero_stage):
    """5 ZeRO steps on world 2 (ep 2) == world 1 (ep 1) accumulating the same global batch."""
    common = (*FAST, "train.steps=5", f"parallel.zero_stage={zero_stage}")
    run_train(1, tmp_path / "w1", *common, "moe.ep_size=1", "train.grad_accum=2")
    run_train(2, tmp_path / "w2", *common, "moe.ep_size=2", "train.grad_accum=1")
    one, two = losses(tmp_path / "w1"), losses(tmp_path / "w2")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert abs(one[step] - two[step]) / one[step] < 1e-4, (step, one[step], two[step])
    # And it trained: 5 steps from near ln V (5.6 nats at V = 264) fell to 4.3 (-25%) when this was written;
    # under a 15% drop the updates did not reach the weights (or the learning rate was lost).
    assert one[5] < 0.85 * one[1], one


def test_ep_size_not_dividing_world_fails_before_any_collective(tmp_path):
    """Launched on 2 ranks with ep_size 4 (8 experts): refused with both numbers, no hang."""
    proc = run_train(2, tmp_path, "moe.ep_size=4", check=False, timeout=120)
    assert proc.returncode != 0
    assert "moe.ep_size=4 does not divide the world size 2" in proc.stderr
