"""The training loop: one process of a (possibly single-process) DeepSpeed job.

    batch -> embed -> [attention -> (route -> permute -> all-to-all -> experts -> all-to-all
          -> unpermute) x C] x layers -> loss -> backward -> ZeRO step

Launch (see launch/ and slurm/ for the scripts):
    coe-dist train --config configs/tiny.yaml                       # one process
    coe-dist train --config configs/tiny.yaml --nproc 2 --set moe.ep_size=2
    torchrun --nproc_per_node=2 -m coe_dist.train --config configs/tiny.yaml --set moe.ep_size=2
SIGTERM or SIGUSR1 (Slurm's warning before a time limit) saves a checkpoint at the end of the current
step and exits; `--resume auto` continues from the newest complete checkpoint, on any layout.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from coe_dist.config import RunConfig, check_world
from coe_dist.launcher import ProcessEnv, discover, init_distributed, pick_backend
from coe_dist.model import CoETransformer
from coe_dist.train import checkpoint
from coe_dist.train.metrics import MetricsLogger
from coe_dist.train.moe_metrics import CommDelta, routing_metrics, start_recording
from coe_dist.train.run_info import write_run_info


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # global-batch mean LM loss per step run here
    aux_losses: list[float] = field(default_factory=list)
    valid: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    comm: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    start_step: int = 0
    stopped_by_signal: int = 0


class StopSignal:
    """Remembers a SIGTERM/SIGUSR1; the loop checks it (agreed over ranks) at each step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum


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


def autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: RunConfig, penv: ProcessEnv | None = None, *, resume: str | None = None) -> TrainResult:
    penv = penv or discover()
    dp_size = check_world(cfg, penv.world_size)  # before any collective
    device = pick_device(cfg.train.device, penv.local_rank)
    backend = pick_backend(cfg.parallel.backend, device.type)
    stop = StopSignal()
    init_distributed(penv, backend, cfg.parallel.timeout_s)
    say(penv, f"coe-dist: launcher={penv.source} world={penv.world_size} ep={cfg.moe.ep_size} "
              f"expert-dp={dp_size} backend={backend} device={device} dtype={cfg.train.dtype} "
              f"zero={cfg.parallel.zero_stage}")

    from coe_dist.data.loader import build_data
    from coe_dist.train.engine import build_engine

    run_dir = Path(cfg.log.run_dir)
    data = build_data(cfg, dp_rank=penv.rank, dp_size=penv.world_size, barrier=dist.barrier)
    model = CoETransformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    if cfg.train.init_from:
        from coe_dist.train.convert import import_reference

        n = import_reference(model, cfg.moe, Path(cfg.train.init_from))
        say(penv, f"coe-dist: CoE weights of {n} layers from {cfg.train.init_from}")
    engine = build_engine(model.to(device), cfg, penv.world_size)
    start_step = _maybe_resume(resume, run_dir, model, engine, data, penv)
    logger = MetricsLogger(run_dir, enabled=penv.rank == 0, tensorboard=cfg.log.tensorboard)
    if penv.rank == 0:
        write_run_info(run_dir, cfg, penv, backend, model)
    params = model.num_params()
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * penv.world_size
    say(penv, f"coe-dist: {params['total_local']:,} parameters on rank 0 ({params['expert_local']:,} in its "
              f"experts); steps {start_step + 1}..{cfg.train.steps} of {global_batch} x {cfg.train.seq_len} tokens")
    try:
        return _run(cfg, penv, engine, model, data, logger, device, start_step, stop)
    finally:
        logger.close()


def _maybe_resume(resume, run_dir, model, engine, data, penv) -> int:
    if not resume or resume == "none":
        return 0
    path = (checkpoint.find_resumable(run_dir, warn=lambda m: say(penv, m)) if resume == "auto"
            else Path(resume))
    if path is None:
        say(penv, f"coe-dist: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        return 0
    meta = checkpoint.load(path, model, engine)
    data.train.load_state_dict(meta["data"])
    say(penv, f"coe-dist: resumed from {path} (step {meta['step']}, saved at world {meta['world_size']} "
              f"ep {meta['ep_size']})")
    return int(meta["step"])


def _save(cfg, run_dir, step, model, engine, data, penv) -> None:
    extra = {"optimizer_step": step, "data": data.train.state_dict(), "config": cfg.to_dict()}
    extra["config"]["optim"]["betas"] = list(extra["config"]["optim"]["betas"])
    path = checkpoint.save(run_dir, step, model, engine, extra, cfg.log.keep_last)
    say(penv, f"coe-dist: saved checkpoint {path}")


def _is_log_step(cfg: RunConfig, step: int) -> bool:
    return step % cfg.log.log_interval == 0 or step == cfg.train.steps


def _run(cfg, penv, engine, model, data, logger, device, start_step, stop) -> TrainResult:
    result = TrainResult(start_step=start_step)
    t, run_dir = cfg.train, Path(cfg.log.run_dir)
    tokens_per_step = t.micro_batch_size * t.grad_accum * penv.world_size * t.seq_len
    window_start, window_tokens = time.perf_counter(), 0
    comm_delta = CommDelta()
    sample_log = SampleLog(run_dir, penv.rank) if cfg.log.sample_log else None
    step = start_step
    while step < t.steps:
        sums = torch.zeros(3, dtype=torch.float64)  # lm, aux summed over micro-steps; stop flag
        consumed: list[int] = []
        for micro in range(t.grad_accum):
            start_recording(model, _is_log_step(cfg, step + 1) and micro == t.grad_accum - 1)
            tokens_BL, targets_BL, positions = data.train.next_micro_batch()
            consumed += [data.train.dataset_index(p) for p in positions]
            with autocast(cfg, device):
                out = engine(tokens_BL.to(device), targets_BL.to(device))
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            sums[:2] += torch.stack([out.lm_loss.detach(), out.aux_loss.detach()]).double().cpu()
        sums[2] = stop.signum
        # Global-batch means, and whether any rank was asked to stop: one small collective per step.
        if penv.world_size > 1:
            dist.all_reduce(sums)
        lm, aux = (sums[:2] / (t.grad_accum * penv.world_size)).tolist()
        step += 1
        result.losses.append(lm)
        result.aux_losses.append(aux)
        if sample_log:
            sample_log.write(step, consumed)
        window_tokens += tokens_per_step
        if _is_log_step(cfg, step):
            result.tokens_per_s = window_tokens / (time.perf_counter() - window_start)
            _log_step(cfg, penv, engine, model, logger, step, lm, aux, result.tokens_per_s, comm_delta)
            start_recording(model, False)
            window_start, window_tokens = time.perf_counter(), 0
        if cfg.log.eval_batches and (step % cfg.log.eval_interval == 0 or step == t.steps):
            result.valid[step] = _validate(cfg, penv, engine, data, logger, device, step)
        if sums[2] > 0 or step == t.steps or (cfg.log.save_interval and step % cfg.log.save_interval == 0):
            _save(cfg, run_dir, step, model, engine, data, penv)
        if sums[2] > 0:
            result.stopped_by_signal = int(stop.signum or signal.SIGTERM)
            say(penv, f"coe-dist: stopped by signal at step {step}; resume with --resume auto")
            break
    result.comm = _comm_summary(model)
    say(penv, format_comm_summary(result.comm))
    if result.stopped_by_signal:
        sys.exit(128 + result.stopped_by_signal)
    return result


class SampleLog:
    """Each rank's consumed dataset indices per step, as JSON lines: proof that a resume skips nothing."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.file = (run_dir / "samples" / f"rank{rank}.jsonl").open("a", buffering=1)

    def write(self, step: int, indices: list[int]) -> None:
        self.file.write(json.dumps({"step": step, "samples": indices}) + "\n")


def _log_step(cfg, penv, engine, model, logger, step, lm, aux, tokens_per_s, comm_delta) -> None:
    lr = engine.get_lr()[0]
    grad_norm = float(engine.get_global_grad_norm() or 0.0)
    moe_scalars, hists = routing_metrics(model, penv.world_size)  # collective: every rank logs this step
    logger.scalars(step, {"loss": lm + aux, "lm_loss": lm, "aux_loss": aux, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": tokens_per_s, **moe_scalars, **comm_delta(model)})
    for tag, counts in hists.items():
        logger.histogram(step, tag, counts)
    say(penv, f"step {step:>6}/{cfg.train.steps}  loss {lm:.4f}  aux {aux:.5f}  lr {lr:.2e}  "
              f"grad {grad_norm:.3f}  {tokens_per_s:,.0f} tok/s")


@torch.no_grad()
def evaluate(cfg: RunConfig, engine_or_model, batches, device: torch.device, world_size: int) -> float:
    """Mean LM loss over the held-out batches of all ranks."""
    total = torch.zeros(2, dtype=torch.float64)
    for tokens_BL, targets_BL in batches:
        with autocast(cfg, device):
            out = engine_or_model(tokens_BL.to(device), targets_BL.to(device))
        total += torch.tensor([out.lm_loss.item() * targets_BL.numel(), targets_BL.numel()], dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def _validate(cfg, penv, engine, data, logger, device, step) -> float:
    engine.eval()
    loss = evaluate(cfg, engine, data.valid_batches(cfg.log.eval_batches), device, penv.world_size)
    engine.train()
    ppl = math.exp(min(loss, 50.0))
    logger.scalars(step, {"valid/loss": loss, "valid/perplexity": ppl})
    say(penv, f"valid  {step:>6}/{cfg.train.steps}  loss {loss:.4f}  ppl {ppl:.2f}")
    return loss


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
