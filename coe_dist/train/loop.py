"""The training loop: one process of a (possibly single-process) DeepSpeed job.

    batch -> embed -> [attention -> (route -> permute -> all-to-all -> experts -> all-to-all
          -> unpermute) x C] x layers -> loss -> backward -> ZeRO step

Launch (see launch/ and slurm/ for the scripts):
    coe-dist train --config configs/tiny.yaml                       # one process
    coe-dist train --config configs/tiny.yaml --nproc 2 --set moe.ep_size=2
    torchrun --nproc_per_node=2 -m coe_dist.train --config configs/tiny.yaml --set moe.ep_size=2
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from coe_dist.config import RunConfig, check_world
from coe_dist.launcher import ProcessEnv, discover, init_distributed, pick_backend
from coe_dist.model import CoETransformer
from coe_dist.train.metrics import MetricsLogger
from coe_dist.train.run_info import write_run_info


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # global-batch mean LM loss per step
    aux_losses: list[float] = field(default_factory=list)
    comm: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def say(penv: ProcessEnv, message: str) -> None:
    if penv.rank == 0:
        print(message, flush=True)


def train(cfg: RunConfig, penv: ProcessEnv | None = None) -> TrainResult:
    penv = penv or discover()
    dp_size = check_world(cfg, penv.world_size)  # before any collective
    device = pick_device(cfg.train.device, penv.local_rank)
    backend = pick_backend(cfg.parallel.backend, device.type)
    init_distributed(penv, backend, cfg.parallel.timeout_s)
    say(penv, f"coe-dist: launcher={penv.source} world={penv.world_size} ep={cfg.moe.ep_size} "
              f"expert-dp={dp_size} backend={backend} device={device} dtype={cfg.train.dtype} "
              f"zero={cfg.parallel.zero_stage}")

    from coe_dist.data.loader import build_data
    from coe_dist.train.engine import build_engine

    data = build_data(cfg, dp_rank=penv.rank, dp_size=penv.world_size, barrier=dist.barrier)
    model = CoETransformer(cfg.model, cfg.moe, seed=cfg.train.seed).to(device)
    engine = build_engine(model, cfg, penv.world_size)
    logger = MetricsLogger(cfg.log.run_dir, enabled=penv.rank == 0, tensorboard=cfg.log.tensorboard)
    if penv.rank == 0:
        write_run_info(Path(cfg.log.run_dir), cfg, penv, backend, model)
    params = model.num_params()
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * penv.world_size
    say(penv, f"coe-dist: {params['total_local']:,} parameters on rank 0 ({params['expert_local']:,} in its "
              f"experts); {cfg.train.steps} steps of {global_batch} x {cfg.train.seq_len} tokens")
    try:
        return _run(cfg, penv, engine, model, data, logger, device)
    finally:
        logger.close()


def _autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _run(cfg, penv, engine, model, data, logger, device) -> TrainResult:
    result = TrainResult()
    t = cfg.train
    tokens_per_step = t.micro_batch_size * t.grad_accum * penv.world_size * t.seq_len
    window_start, window_tokens = time.perf_counter(), 0
    for step in range(t.steps):
        sums = torch.zeros(2, dtype=torch.float64)  # lm, aux summed over micro-steps
        for _ in range(t.grad_accum):
            tokens_BL, targets_BL, _ids = data.train.next_micro_batch()
            with _autocast(cfg, device):
                out = engine(tokens_BL.to(device), targets_BL.to(device))
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            sums += torch.stack([out.lm_loss.detach(), out.aux_loss.detach()]).double().cpu()
        # Global-batch mean over micro-steps and ranks: what one process on the whole batch would report.
        if penv.world_size > 1:
            dist.all_reduce(sums)
        lm, aux = (sums / (t.grad_accum * penv.world_size)).tolist()
        result.losses.append(lm)
        result.aux_losses.append(aux)
        window_tokens += tokens_per_step
        if (step + 1) % cfg.log.log_interval == 0 or step + 1 == t.steps:
            elapsed = time.perf_counter() - window_start
            result.tokens_per_s = window_tokens / elapsed
            grad_norm = engine.get_global_grad_norm()
            logger.scalars(step + 1, {"loss": lm + aux, "lm_loss": lm, "aux_loss": aux,
                                      "lr": engine.get_lr()[0], "grad_norm": float(grad_norm or 0.0),
                                      "tokens_per_s": result.tokens_per_s})
            say(penv, f"step {step + 1:>6}/{t.steps}  loss {lm:.4f}  aux {aux:.5f}  lr {engine.get_lr()[0]:.2e}  "
                      f"{result.tokens_per_s:,.0f} tok/s")
            window_start, window_tokens = time.perf_counter(), 0
    result.comm = _comm_summary(model)
    say(penv, format_comm_summary(result.comm))
    return result


def _comm_summary(model) -> dict[str, float]:
    out: dict[str, float] = {}
    for layer in model.coe_layers():
        out.update(layer.dispatcher.stats.summary())
    return out


def format_comm_summary(comm: dict[str, float]) -> str:
    """A table of all-to-all time and bytes per (layer, iteration, direction), rank 0's view."""
    rows = sorted({k.rsplit("/", 1)[0] for k in comm if k.startswith("comm/")})
    dropped = {k: v for k, v in comm.items() if k.endswith("dropped_tokens")}
    if not rows and not dropped:
        return "all-to-all: none (ep_size 1: experts are local)"
    lines = [f"{'all-to-all (rank 0)':<40}{'calls':>8}{'seconds':>10}{'MiB sent':>11}{'MiB recv':>11}"]
    for row in rows:
        lines.append(f"{row.removeprefix('comm/'):<40}{comm[row + '/calls']:>8.0f}{comm[row + '/seconds']:>10.3f}"
                     f"{comm[row + '/bytes_sent'] / 2**20:>11.2f}{comm[row + '/bytes_received'] / 2**20:>11.2f}")
    for key, value in dropped.items():
        lines.append(f"{key}: {value:.0f} token copies dropped")
    return "\n".join(lines)
