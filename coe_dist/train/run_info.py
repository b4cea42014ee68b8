"""What a run was: its resolved config, software versions, machine and world layout, written to <run_dir>."""

from __future__ import annotations

import json
import os
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


# The widest matrix ISA a CPU has, best first: losses of the same run differ between them (other kernels).
CPU_ISAS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def machine() -> dict[str, str | int | None]:
    """The hardware a run trained on: the same seed ends at a slightly different loss on another ISA or GPU."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    flags = set(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    return {"cpu": model or platform.processor() or None, "cpu_isa": next((i for i in CPU_ISAS if i in flags), None),
            "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_run_info(run_dir: Path, cfg: RunConfig, penv: ProcessEnv, backend: str, model: torch.nn.Module) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = cfg.to_dict()
    resolved["optim"]["betas"] = list(resolved["optim"]["betas"])
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    layout = {"world_size": penv.world_size, "ep_size": cfg.moe.ep_size,
              "expert_data_parallel": penv.world_size // cfg.moe.ep_size, "launcher": penv.source,
              "master_addr": penv.master_addr, "backend": backend, "parameters_rank0": model.num_params()}
    info = {"versions": versions(), "machine": machine(), "layout": layout}
    write_atomic(run_dir / "run_info.json", json.dumps(info, indent=2))
