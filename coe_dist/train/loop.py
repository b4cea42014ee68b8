"""The training loop: one process of a (possibly single-process) DeepSpeed job.

    batch -> embed -> [attention -> (route -> permute -> all-to-all -> experts -> all-to-all
          -> unpermute) x C] x layers -> loss -> backward -> ZeRO step

Launch (see launch/ and slurm/ for the scripts):
    coe-dist train --config configs/tiny.yaml                       # one process
    coe-dist train --config configs/tiny.yaml --nproc 2 --set moe.ep_size=2
    torchrun --nproc_per_node=2 -m coe_dist.train --config configs/tiny.yaml --set moe.ep_size=2
SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 (Slurm's warning before a time limit) saves a checkpoint at the end of
the current step and exits (128 + the signal); `--resume auto` continues from the newest complete checkpoint,
on any layout.

Reliability (docs/reliability.md): a restarted job (torchrun --max-restarts, Slurm requeue) resumes from the
newest complete checkpoint by itself; a collective that times out or loses a peer becomes a one-line error
naming the operation, the step and the silent rank; non-finite loss or gradients stop the run with the last
good state saved, or skip the step (train.nan_policy); router collapse is warned about.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from coe_dist import faults
from coe_dist.atomic_file import DISK_ERRNOS, write_atomic
from coe_dist.config import ConfigError, RunConfig, check_world
from coe_dist.errors import UserError
from coe_dist.faults import fault_point
from coe_dist.kernels import bf16_on_cpu_warning, kernel_report, resolve_dtype
from coe_dist.launcher import ProcessEnv, discover, init_distributed, pick_backend
from coe_dist.model import CoETransformer
from coe_dist.train import checkpoint, guards, memory, rundir
from coe_dist.train.coselection import CoSelection
from coe_dist.train.expert_balance import discard_pending_loads, update_expert_biases
from coe_dist.train.metrics import MetricsLogger
from coe_dist.train.moe_metrics import CommDelta, comm_totals, routing_metrics, start_recording
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
    skipped_steps: list[int] = field(default_factory=list)  # steps whose update was left out (nan_policy=skip)


@dataclass
class Where:
    """What the loop is doing, for the error message when a collective fails."""

    phase: str = "start-up (data, model, engine)"
    step: int = 0


class StopSignal:
    """Remembers a SIGTERM/SIGINT/SIGUSR1; the loop checks it (agreed over ranks) at each step boundary.
    Ctrl-C is a request to stop like SIGTERM, not a KeyboardInterrupt in whatever line runs.

    Copies of one SIGTERM come moments apart: Slurm signals every process of a job step and torchrun passes
    its own copy on, so a repeat within REPEAT_AFTER_S is the same request. A SIGTERM repeated later ends the
    process at once: a rank blocked in a collective whose peer is gone would otherwise wait for SIGKILL."""

    REPEAT_AFTER_S = 10.0

    def __init__(self) -> None:
        self.signum = 0
        self._term_at: float | None = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            now = time.monotonic()
            if self._term_at is not None and now - self._term_at >= self.REPEAT_AFTER_S:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            self._term_at = self._term_at if self._term_at is not None else now
        self.signum = signum


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is visible to this process: use "
                              "train.device=cpu or auto, or check CUDA_VISIBLE_DEVICES and the driver")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def with_dtype_for(cfg: RunConfig, device: torch.device) -> RunConfig:
    """train.dtype=auto resolved for this device (bf16 or fp32): the run's config.yaml and checkpoints record
    what it trained in."""
    dtype = resolve_dtype(cfg.train.dtype, device)
    return cfg if dtype == cfg.train.dtype else dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                                                   dtype=dtype))


def say(penv: ProcessEnv, message: str) -> None:
    if penv.rank == 0:
        print(message, flush=True)


def autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: RunConfig, penv: ProcessEnv | None = None, *, resume: str | None = None, overwrite: bool = False,
          startup_notes: Sequence[str] = ()) -> TrainResult:
    """Train (or resume) one run in this process; `startup_notes`: what the caller set up, for rank 0's log;
    `overwrite`: start afresh in a run dir that holds an earlier run's checkpoints, deleting them."""
    penv = penv or discover()
    dp_size = check_world(cfg, penv.world_size)  # before any collective
    faults.check_spec()
    run_dir = Path(cfg.log.run_dir)
    rundir.check_run_dir(run_dir)
    restarted = faults.restart_count() > 0
    changed = rundir.preflight(cfg, resume, overwrite, restarted)
    if changed:
        say(penv, f"coe-dist: resuming with settings other than its checkpoint's: {'; '.join(changed)}. The "
                  "steps from here train with these, and the run's config.yaml will name only these")
    device = pick_device(cfg.train.device, penv.local_rank)
    cfg = with_dtype_for(cfg, device)
    memory.check_fits(cfg, penv, device)
    lock = rundir.RunLock(run_dir)
    if penv.rank == 0:  # before the process group: a second run on this directory stops here
        lock.acquire(say=lambda m: say(penv, m))
    try:
        if overwrite and not restarted and penv.rank == 0:
            rundir.clear_outputs(run_dir, say=lambda m: say(penv, m))
        return _train_locked(cfg, penv, resume, startup_notes, dp_size, run_dir, device)
    finally:
        lock.release()


def _train_locked(cfg, penv, resume, startup_notes, dp_size, run_dir, device) -> TrainResult:
    backend = pick_backend(cfg.parallel.backend, device.type)
    stop = StopSignal()
    init_distributed(penv, backend, cfg.parallel.timeout_s, config=cfg.to_dict())
    say(penv, f"coe-dist: launcher={penv.source} world={penv.world_size} ep={cfg.moe.ep_size} "
              f"expert-dp={dp_size} backend={backend} device={device} dtype={cfg.train.dtype} "
              f"zero={cfg.parallel.zero_stage}")
    say(penv, f"coe-dist: {kernel_report()}")
    if warning := bf16_on_cpu_warning(device, cfg.train.dtype):
        say(penv, f"coe-dist: {warning}")
    for note in startup_notes:
        say(penv, f"coe-dist: {note}")
    _warn_shared_store(penv)
    heartbeat = guards.Heartbeat(penv.rank, penv.world_size, faults.restart_count())
    where = Where()
    logger = None
    try:
        from coe_dist.data.loader import build_data
        from coe_dist.train.engine import build_engine

        data = build_data(cfg, dp_rank=penv.rank, dp_size=penv.world_size, barrier=dist.barrier)
        model = CoETransformer(cfg.model, cfg.moe, seed=cfg.train.seed)
        if cfg.moe.placement:
            _place_experts(model, cfg, penv)
        if cfg.train.init_from:
            say(penv, f"coe-dist: {_init_weights(model, cfg)}")
        engine = build_engine(model.to(device), cfg, penv.world_size)
        # DeepSpeed made the expert groups without a timeout (torch's default: 30 minutes): give them ours.
        guards.set_group_timeouts(cfg.parallel.timeout_s)
        guard = guards.NonFiniteGuard(cfg.train.nan_policy, cfg.train.max_consecutive_nan)
        where.phase = "resume (checkpoint load)"
        start_step = _maybe_resume(resume, run_dir, model, engine, data, penv, guard, cfg)
        logger = MetricsLogger(run_dir, enabled=penv.rank == 0, tensorboard=cfg.log.tensorboard)
        if penv.rank == 0:
            write_run_info(run_dir, cfg, penv, backend, model)
        params = model.num_params()
        global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * penv.world_size
        say(penv, f"coe-dist: {params['total_local']:,} parameters on rank 0 ({params['expert_local']:,} in its "
                  f"experts); steps {start_step + 1}..{cfg.train.steps} of {global_batch} x {cfg.train.seq_len} "
                  "tokens")
        result = _run(cfg, penv, engine, model, data, logger, device, start_step, stop, guard, heartbeat, where)
        logger, closing = None, logger
        closing.close()  # TensorBoard's writer thread may report a failed write only now
        return result
    except Exception as e:
        err = guards.collective_failure(e, where.phase, where.step, penv.rank, cfg.parallel.timeout_s, heartbeat)
        if err is None:
            err = _disk_failure(e, run_dir)
            if err is None:
                raise
            raise err from None
        guards.exit_without_teardown(1)
        raise err from e
    finally:
        faults.set_step(None)
        if logger is not None:
            logger.close(raise_errors=False)  # after a failure, that failure is the one to report


def _disk_failure(e: BaseException, run_dir: Path) -> rundir.RunDirError | None:
    """One line for a write that the file system refused (full, quota, read-only) anywhere in the run dir:
    metrics, TensorBoard events, samples, config.yaml, run_info.json. None for any other exception."""
    if isinstance(e, UserError) or not isinstance(e, OSError) or e.errno not in DISK_ERRNOS:
        return None
    what = e.filename or f"into log.run_dir={str(run_dir)!r}"
    return rundir.RunDirError(f"could not write {what}: {e.strerror}: free space (or point log.run_dir "
                              "elsewhere) and resume with --resume auto; the saved checkpoints are intact")


def _place_experts(model: CoETransformer, cfg: RunConfig, penv: ProcessEnv) -> None:
    """moe.placement: the plan's slot order in every CoE layer, before any weights are loaded into it."""
    from coe_dist.train.placement import read_plan

    model.set_placement(read_plan(cfg, [layer.layer for layer in model.coe_layers()]))
    say(penv, f"coe-dist: experts placed by {cfg.moe.placement} (a checkpoint saved in another placement is "
              "moved into it on load)")


def _replace_experts(cfg: RunConfig, model: CoETransformer, engine, cosel: CoSelection, saved: Path,
                     penv: ProcessEnv, step: int) -> None:
    """moe.replace_interval: rank 0 plans a placement from the run's co-selection so far (METIS), every rank
    takes it and reloads the checkpoint just saved into it: experts, router rows, biases and Adam moments move,
    the function does not change. Collective."""
    from coe_dist.train.placement import make_plan, mean_rows

    plan = None
    if penv.rank == 0 and cosel.totals:
        layers = [layer.layer for layer in model.coe_layers()]
        plan = make_plan(cosel.totals, layers, cfg.moe.num_experts, cfg.moe.iterations, cfg.moe.ep_size)
    box = [plan]
    if penv.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        say(penv, f"coe-dist: step {step}: no routing statistics yet (log.log_interval); experts stay in place")
        return
    model.set_placement({int(k): order for k, order in box[0]["layers"].items()})
    checkpoint.load(saved, model, engine)
    before, after = mean_rows(box[0])
    say(penv, f"coe-dist: step {step}: experts re-placed by co-selection: rows per token and iteration "
              f"{before:.3f} in order -> {after:.3f} (on the latest sampled tokens)")


def _keep_placement(cfg: RunConfig, meta: dict, model: CoETransformer, penv: ProcessEnv) -> None:
    """A resume without moe.placement keeps the checkpoint's placement (as it keeps any other layout choice
    that costs nothing to keep); `--set moe.placement=PLAN` replaces it."""
    saved = meta.get("placement") or {}
    if cfg.moe.placement or not saved:
        return
    model.set_placement({int(k): order for k, order in saved.items()})
    say(penv, "coe-dist: keeping the checkpoint's expert placement")


def _init_weights(model: CoETransformer, cfg: RunConfig) -> str:
    """train.init_from: the weights of a coe-dist checkpoint (any layout; a new run: step 0, fresh optimizer),
    or the CoE blocks of a reference-layout directory. Returns what was loaded, for the log."""
    src = Path(cfg.train.init_from)
    if (src / "meta.json").is_file() or (src / "checkpoints").is_dir():
        ckpt, _ = checkpoint.resolve_checkpoint(src)
        checkpoint.load_weights(ckpt, model)
        return f"weights from {ckpt} (a new run: step 0, fresh optimizer state)"
    from coe_dist.train.reference_layout import import_reference

    return f"CoE weights of {import_reference(model, cfg.moe, src)} layers from {src}"



def _warn_shared_store(penv: ProcessEnv) -> None:
    """torchrun's agent keeps its rendezvous store across restarts, and torch reads the last attempt's gloo/NCCL
    addresses from it: the restarted job hangs in start-up (pytorch/pytorch#135712). Say how to avoid it."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restarts.isdigit() and int(restarts) > 0:
        say(penv, "coe-dist: warning: torchrun --max-restarts with its shared rendezvous store: a restart can hang "
                  "connecting to the last attempt's ranks (pytorch/pytorch#135712); export "
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun")


def _restarted(penv: ProcessEnv) -> int:
    n = faults.restart_count()
    if n:
        say(penv, f"coe-dist: restart {n} of this job (TORCHELASTIC_RESTART_COUNT/SLURM_RESTART_COUNT): "
                  "resuming from the newest complete checkpoint")
    return n


def _maybe_resume(resume, run_dir, model, engine, data, penv, guard, cfg: RunConfig | None = None) -> int:
    restarted = _restarted(penv)
    path = verified = None  # verified: the meta of the checkpoint newest_verified has just hashed
    if restarted:  # a restart always continues where the job got to, whatever --resume said
        path, verified = checkpoint.newest_verified(run_dir, warn=lambda m: say(penv, m))
        if path is None and resume not in (None, "none", "auto"):
            path = Path(resume)
        _refuse_to_repeat_a_stop(run_dir, path)
    else:
        if penv.rank == 0:  # started by hand: a stop the user has seen no longer holds back restarts
            (run_dir / STOPPED).unlink(missing_ok=True)
        if resume == "auto":
            path, verified = checkpoint.newest_verified(run_dir, warn=lambda m: say(penv, m))
        elif resume and resume != "none":
            path = Path(resume)
    if path is None:
        if resume or restarted:
            say(penv, f"coe-dist: no checkpoint in {run_dir / 'checkpoints'}; starting from step 0")
        return 0
    if not path.is_dir():
        raise checkpoint.CheckpointError(f"--resume {path}: no such checkpoint directory: give a "
                                         "<run_dir>/checkpoints/step_N directory, or --resume auto")
    try:
        verified = verified or checkpoint.verify(path)
        if cfg is not None:  # preflight read this meta.json before start-up; a restart or a race may differ
            rundir.check_against_checkpoint(cfg, verified, path)
            _keep_placement(cfg, verified, model, penv)
        meta = checkpoint.load(path, model, engine, verified)
    except checkpoint.CheckpointError as e:
        raise checkpoint.CheckpointError(f"{e}: resume from another checkpoint, or with --resume auto (which "
                                         "skips damaged ones)") from None
    data.train.load_state_dict(meta["data"])
    guard.skipped_total = int(meta.get("skipped_steps", 0))
    say(penv, f"coe-dist: resumed from {path} (step {meta['step']}, saved at world {meta['world_size']} "
              f"ep {meta['ep_size']})")
    return int(meta["step"])


STOPPED = "stopped.json"  # <run_dir>/stopped.json: why and where the last attempt stopped on bad numerics


def _refuse_to_repeat_a_stop(run_dir: Path, path: Path | None) -> None:
    """A restart would replay the same batches into the same non-finite loss: do not burn the restarts on it."""
    record = run_dir / STOPPED
    if not record.is_file():
        return
    info = json.loads(record.read_text())
    resume_step = int(json.loads((path / "meta.json").read_text())["step"]) if path else 0
    if info.get("step", 0) > resume_step:
        reason = info.get("reason", "non-finite numbers")
        raise guards.NumericsError(f"not restarting automatically: the run stopped at step {info['step']} on "
                                   f"{reason}, which a restart would repeat; change the config and resume by "
                                   f"hand with --resume auto (or delete {record})")


def _save(cfg, run_dir, step, model, engine, data, penv, guard, skipped=None, **more) -> Path:
    skipped = guard.skipped_total if skipped is None else skipped
    extra = {"optimizer_step": step - skipped, "skipped_steps": skipped, "data": data.train.state_dict(),
             "config": cfg.to_dict(), **more}
    extra["config"]["optim"]["betas"] = list(extra["config"]["optim"]["betas"])
    path = checkpoint.save(run_dir, step, model, engine, extra, cfg.log.keep_last)
    say(penv, f"coe-dist: saved checkpoint {path}")
    return path


def _is_log_step(cfg: RunConfig, step: int) -> bool:
    return step % cfg.log.log_interval == 0 or step == cfg.train.steps


class _GradScale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient (fault injection: finite loss, non-finite grads)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _run(cfg, penv, engine, model, data, logger, device, start_step, stop, guard, heartbeat, where) -> TrainResult:
    result = TrainResult(start_step=start_step)
    t, run_dir = cfg.train, Path(cfg.log.run_dir)
    tokens_per_step = t.micro_batch_size * t.grad_accum * penv.world_size * t.seq_len
    window_start, window_tokens = time.perf_counter(), 0
    comm_delta = CommDelta()
    cosel = CoSelection(run_dir, penv.rank, enabled=cfg.log.coselection)
    collapse = guards.CollapseWatch(cfg.log.collapse_share, cfg.log.collapse_steps, cfg.moe.top_k)
    sample_log = SampleLog(run_dir, penv.rank) if cfg.log.sample_log else None
    # ZeRO 1/2 leave out an update whose gradient norm is not finite (engine.was_step_applied() says so);
    # a step to skip gets a nan gradient on purpose, on every rank, so that DeepSpeed's own path drops it.
    ds_skips = cfg.parallel.zero_stage in (1, 2)
    step = start_step
    while step < t.steps:
        where.step = step + 1
        faults.set_step(step + 1)
        fault_point("train.step", step + 1)
        heartbeat.beat(step + 1)
        data_state = data.train.state_dict()  # to save the last good state if this step goes bad
        # lm, aux summed over micro-steps; stop flag; ranks whose loss is not finite
        sums = torch.zeros(4, dtype=torch.float64)
        consumed: list[int] = []
        applied = True
        for micro in range(t.grad_accum):
            where.phase = "forward (expert all-to-all)"
            start_recording(model, _is_log_step(cfg, step + 1) and micro == t.grad_accum - 1, cfg.log.coselection)
            tokens_BL, targets_BL, positions = data.train.next_micro_batch()
            consumed += [data.train.dataset_index(p) for p in positions]
            with autocast(cfg, device):
                out = engine(tokens_BL.to(device), targets_BL.to(device))
            loss, lm_loss = out.loss, out.lm_loss
            injected = fault_point("train.loss", step + 1)
            if injected in ("nan", "inf"):
                loss, lm_loss = loss * float(injected), lm_loss * float(injected)
            if fault_point("train.grad", step + 1) == "inf":
                loss = _GradScale.apply(loss, math.inf)
            sums[:2] += torch.stack([lm_loss.detach(), out.aux_loss.detach()]).double().cpu()
            if micro == t.grad_accum - 1:
                # Global-batch means, whether any rank was asked to stop, and whether any rank's loss is not
                # finite: one small collective per step, before the last backward so a bad step can be dropped.
                sums[2] = stop.signum
                sums[3] = float(not bool(torch.isfinite(sums[:2]).all()))
                where.phase = "step all-reduce (loss, stop flag)"
                if penv.world_size > 1:
                    dist.all_reduce(sums)
                if sums[3] > 0:
                    if not ds_skips:  # ZeRO 0/3 would apply it: stop before the update (nan_policy is stop)
                        applied = False
                        break
                    loss = loss * math.nan
            where.phase = "backward (expert all-to-all, ZeRO gradient reduction)"
            engine.backward(loss)
            where.phase = "optimizer step (ZeRO)"
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            if micro == t.grad_accum - 1 and ds_skips:
                applied = engine.was_step_applied()
        loss_bad = bool(sums[3] > 0)
        if loss_bad and applied:
            raise RuntimeError(f"step {step + 1}: DeepSpeed applied an update with a non-finite loss; is "
                               "zero_optimization.compute_grad_norm false in parallel.deepspeed_config?")
        if applied:  # `applied` agrees over ranks: the all-reduce inside is called by all or by none
            where.phase = "expert-bias update (load all-reduce)"
            update_expert_biases(model.coe_layers(), penv.world_size)
        else:
            discard_pending_loads(model.coe_layers())
        lm, aux = (sums[:2] / (t.grad_accum * penv.world_size)).tolist()
        step += 1
        action = guard.record(step, not applied)
        result.losses.append(lm)
        result.aux_losses.append(aux)
        if sample_log:
            sample_log.write(step, consumed)
        window_tokens += tokens_per_step
        if action != "ok":
            result.skipped_steps.append(step)
            what = (f"non-finite loss (lm {lm:g}, aux {aux:g}) on {int(sums[3])} of {penv.world_size} ranks"
                    if loss_bad else "non-finite gradient norm (loss finite)")
            logger.scalars(step, {"skipped_steps": guard.skipped_total, "skipped": 1.0})
            if action == "stop":
                _stop_on_numerics(cfg, run_dir, step, what, model, engine, data, data_state, penv, guard, where)
            say(penv, f"coe-dist: step {step}: {what}: update skipped ({len(guard.streak)} in a row, "
                      f"{guard.skipped_total} in all; stops after {t.max_consecutive_nan} in a row)")
        if _is_log_step(cfg, step):
            where.phase = "logging (routing-metrics all-reduce)"
            result.tokens_per_s = window_tokens / (time.perf_counter() - window_start)
            _log_step(cfg, penv, engine, model, logger, step, lm, aux, result.tokens_per_s, comm_delta, collapse,
                      guard)
            cosel.add(model, penv.world_size)  # collective, like the routing metrics
            start_recording(model, False)
            window_start, window_tokens = time.perf_counter(), 0
        if cfg.log.eval_batches and (step % cfg.log.eval_interval == 0 or step == t.steps):
            where.phase = "validation (loss all-reduce)"
            result.valid[step] = _validate(cfg, penv, engine, data, logger, device, step)
        if sums[2] > 0 or step == t.steps or (cfg.log.save_interval and step % cfg.log.save_interval == 0):
            where.phase = "checkpoint save"
            saved = _save(cfg, run_dir, step, model, engine, data, penv, guard)
            cosel.save()
            if cfg.moe.replace_interval and step % cfg.moe.replace_interval == 0 and step < t.steps:
                where.phase = "expert re-placement (checkpoint reload)"
                _replace_experts(cfg, model, engine, cosel, saved, penv, step)
        if sums[2] > 0:
            result.stopped_by_signal = int(stop.signum or signal.SIGTERM)
            say(penv, f"coe-dist: stopped by signal at step {step}; resume with --resume auto")
            break
    where.phase = "shutdown"
    result.comm = comm_totals(model)
    say(penv, format_comm_summary(result.comm))
    if result.stopped_by_signal:
        sys.exit(128 + result.stopped_by_signal)
    return result


def _same_position(ckpt: Path, data_state: dict) -> bool:
    """A complete checkpoint of this run at this data position (not a stale one of an earlier run)."""
    try:
        return checkpoint.verify(ckpt).get("data") == data_state
    except (checkpoint.CheckpointError, OSError, ValueError, KeyError):
        return False


def _stop_on_numerics(cfg, run_dir, step, what, model, engine, data, data_state, penv, guard, where) -> None:
    """Save the last good state and raise NumericsError naming the step(s)."""
    where.phase = "checkpoint save (after non-finite numbers)"
    streak = guard.streak
    if cfg.train.nan_policy == "stop":
        # The update of this step was left out: the weights are those after step - 1. Save exactly that state,
        # data position included, so that a resume replays this step (after the config is fixed).
        data.train.load_state_dict(data_state)
        good, skipped = step - 1, guard.skipped_total - 1
        reason = what
    else:  # skip: the skipped steps are done (their updates left out); save the state after them
        good, skipped = step, guard.skipped_total
        reason = f"{what}; {len(streak)} steps in a row skipped ({streak[0]}..{streak[-1]})"
    existing = run_dir / "checkpoints" / f"step_{good}"
    if cfg.train.nan_policy == "stop" and _same_position(existing, data.train.state_dict()):
        path = existing  # saved at the end of the last good step already: leave it as it is
    else:
        path = _save(cfg, run_dir, good, model, engine, data, penv, guard, skipped=skipped,
                     stopped={"step": step, "reason": reason})
    unrecorded = ""
    if penv.rank == 0:
        try:
            write_atomic(run_dir / STOPPED, json.dumps({"step": step, "reason": reason, "checkpoint": str(path)}))
        except OSError as e:  # the stop itself is what to report; say that restarts will not know of it
            unrecorded = f" (not recorded in {run_dir / STOPPED}: {e.strerror}; free space before any restart)"
    fix = ("lower optim.lr, check the data of this step, or set train.nan_policy=skip"
           if cfg.train.nan_policy == "stop" else "lower optim.lr or check the data")
    raise guards.NumericsError(f"stopped at step {step}: {reason}; the last good state (after step {good}) is in "
                               f"{path}{unrecorded}: {fix}, then resume with --resume auto")


class SampleLog:
    """Each rank's consumed dataset indices per step, as JSON lines: proof that a resume skips nothing."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.file = (run_dir / "samples" / f"rank{rank}.jsonl").open("a", buffering=1)

    def write(self, step: int, indices: list[int]) -> None:
        self.file.write(json.dumps({"step": step, "samples": indices}) + "\n")


def _log_step(cfg, penv, engine, model, logger, step, lm, aux, tokens_per_s, comm_delta, collapse, guard) -> None:
    lr = engine.get_lr()[0]
    grad_norm = float(engine.get_global_grad_norm() or 0.0)
    moe_scalars, hists = routing_metrics(model, penv.world_size)  # collective: every rank logs this step
    collapse_scalars, warnings = collapse.update(step, hists)
    logger.scalars(step, {"loss": lm + aux, "lm_loss": lm, "aux_loss": aux, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": tokens_per_s, "skipped_steps": guard.skipped_total,
                          "peak_memory_mib": peak_memory_mib(engine.device), **moe_scalars,
                          **collapse_scalars, **comm_delta(model)})
    for tag, counts in hists.items():
        logger.histogram(step, tag, counts)
    say(penv, f"step {step:>6}/{cfg.train.steps}  loss {lm:.4f}  aux {aux:.5f}  lr {lr:.2e}  "
              f"grad {grad_norm:.3f}  {tokens_per_s:,.0f} tok/s")
    for warning in warnings:
        say(penv, warning)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA max_memory_allocated, or peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
