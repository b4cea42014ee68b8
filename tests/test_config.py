"""Config loading, overrides and validation: every bad value fails with exit code 2 naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coe_dist.cli import main
from coe_dist.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
# Run configs (configs/bench holds bench grids and configs/profiles cluster profiles, not run configs).
CONFIGS = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs/paper").glob("*.yaml"),
                  *(ROOT / "configs/repro").glob("*.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_paper_configs_match_the_paper():
    coe = load_config(ROOT / "configs/paper/coe-2-4of64.yaml")
    moe = load_config(ROOT / "configs/paper/moe-8of64.yaml")
    small = load_config(ROOT / "configs/paper/coe-2-4of48.yaml")
    for cfg in (coe, moe, small):
        assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads) == (4, 1024, 8)
        assert (cfg.moe.expert_hidden_size, cfg.moe.num_shared_experts) == (704, 1)
    # Equal compute: expert FFNs per token = C * (K + S).
    def ffns(c):
        return c.moe.iterations * (c.moe.top_k + c.moe.num_shared_experts)

    assert ffns(coe) == ffns(moe) == ffns(small) == 8
    assert (coe.moe.num_experts + 1, moe.moe.num_experts + 1, small.moe.num_experts + 1) == (64, 64, 48)


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.steps=7", "moe.capacity_factor=1.5",
                                                    "moe.inner_residual=false", "moe.outer_residual=on",
                                                    "optim.betas=[0.8,0.9]"])
    assert cfg.train.steps == 7 and cfg.moe.capacity_factor == 1.5
    assert cfg.moe.inner_residual is False and cfg.moe.outer_residual is True
    assert cfg.optim.betas == (0.8, 0.9)
    assert load_config(None, ["moe.capacity_factor=null"]).moe.capacity_factor is None


BAD = [
    # (overrides, words the message must contain)
    (["moe.top_kk=2"], ["moe.top_kk", "Did you mean 'top_k'"]),
    (["modle.hidden_size=8"], ["modle", "Did you mean 'model'"]),
    (["moe.top_k=9"], ["moe.top_k=9", "num_experts=8"]),
    (["moe.ep_size=3"], ["num_experts=8", "ep_size=3"]),
    (["moe.iterations=0"], ["moe.iterations=0", ">= 1"]),
    (["model.hidden_size=-8"], ["model.hidden_size=-8", "> 0"]),
    (["moe.expert_hidden_size=0"], ["moe.expert_hidden_size=0"]),
    (["model.hidden_size=130"], ["hidden_size=130", "num_heads=4"]),
    (["moe.inner_residual=false", "moe.outer_residual=false"], ["inner_residual", "outer_residual"]),
    (["train.steps=abc"], ["train.steps", "integer"]),
    (["moe.inner_residual=maybe"], ["moe.inner_residual", "true or false"]),
    (["parallel.zero_stage=3", "moe.ep_size=2"], ["zero_stage=3", "ep_size=2"]),
    (["parallel.zero_stage=5"], ["parallel.zero_stage=5"]),
    (["moe.aux_loss_type=local"], ["moe.aux_loss_type", "seq, global"]),
    (["train.seq_len=4096"], ["train.seq_len=4096", "max_seq_len"]),
    (["train.dtype=fp8"], ["train.dtype"]),
    (["moe.capacity_factor=-1"], ["moe.capacity_factor=-1.0"]),
    (["optim.lr=0"], ["optim.lr"]),
    (["model.first_k_dense=9"], ["model.first_k_dense=9"]),
    (["train.steps"], ["section.key=value"]),
    (["moe.dispatch=node", "moe.ep_size=2"], ["moe.dispatch='node'", "copies, dedup, node_dedup"]),
    (["moe.dispatch=node_dedup", "moe.ep_size=4", "moe.ranks_per_node=3"],
     ["moe.ranks_per_node=3", "moe.ep_size=4", "one must divide the other"]),
    (["moe.ranks_per_node=-1"], ["moe.ranks_per_node=-1", ">= 0"]),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_exit_code_2(overrides, words, capsys):
    args = ["train", "--config", str(ROOT / "configs/tiny.yaml")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("coe-dist: config error:") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)


def test_bad_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_ep_size_must_divide_world_before_launch(capsys):
    """--nproc 3 with ep_size 2 fails before torchrun starts any process."""
    code = main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "--nproc", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "ep_size=2" in err and "world size 3" in err


def test_config_error_object_names_key():
    with pytest.raises(ConfigError, match=r"moe\.num_experts=6 is not divisible by moe\.ep_size=4"):
        load_config(None, ["moe.num_experts=6", "moe.ep_size=4", "moe.top_k=2"])


def test_cli_help_works():
    out = subprocess.run([sys.executable, "-m", "coe_dist.cli", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "preprocess" in out.stdout
    out = subprocess.run([sys.executable, "-m", "coe_dist.cli", "train", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--set" in out.stdout and "--nproc" in out.stdout


def test_ranks_per_node_from_the_launcher_and_node_layout():
    from coe_dist.parallel.groups import node_layout, ranks_per_node

    assert ranks_per_node(3, {"LOCAL_WORLD_SIZE": "8"}) == 3  # the config wins
    assert ranks_per_node(0, {"LOCAL_WORLD_SIZE": "4", "SLURM_NTASKS_PER_NODE": "8"}) == 4  # torchrun's first
    assert ranks_per_node(0, {"SLURM_NTASKS_PER_NODE": "8"}) == 8
    assert ranks_per_node(0, {"SLURM_NTASKS_PER_NODE": "4(x2)", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2
    with pytest.raises(ValueError, match="set moe.ranks_per_node"):
        ranks_per_node(0, {})
    # (nodes, ranks per node) of an ep group: spanning nodes, inside one, and a layout that splits a node
    assert node_layout(8, 2) == (4, 2) and node_layout(4, 8) == (1, 4) and node_layout(4, 4) == (1, 4)
    with pytest.raises(ValueError, match="ranks_per_node=3 and moe.ep_size=4"):
        node_layout(4, 3)
