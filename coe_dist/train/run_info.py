"""What a run was: its resolved config, software versions and world layout, written to <run_dir>."""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import torch
import yaml

from coe_dist.atomic_file import write_atomic
from coe_dist.config import RunConfig
from coe_dist.launcher import ProcessEnv

PACKAGES = ("coe-dist", "torch", "deepspeed", "megatron-core", "tokenizers", "tensorboard", "mpi4py")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["cuda"] = torch.version.cuda or "none"
    return out


def write_run_info(run_dir: Path, cfg: RunConfig, penv: ProcessEnv, backend: str, model: torch.nn.Module) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = cfg.to_dict()
    resolved["optim"]["betas"] = list(resolved["optim"]["betas"])
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    layout = {"world_size": penv.world_size, "ep_size": cfg.moe.ep_size,
              "expert_data_parallel": penv.world_size // cfg.moe.ep_size, "launcher": penv.source,
              "master_addr": penv.master_addr, "backend": backend, "parameters_rank0": model.num_params()}
    write_atomic(run_dir / "run_info.json", json.dumps({"versions": versions(), "layout": layout}, indent=2))
