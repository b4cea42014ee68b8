"""Checkpoints that do not depend on the parallel layout, written atomically, verified on load.

A checkpoint is a directory `<run_dir>/checkpoints/step_<N>/`:
    dense.pt              every non-expert parameter by name: fp32 value + Adam moments (written by rank 0)
    experts-<r>.pt        the routed experts of EP rank r, one entry per GLOBAL expert id (written by the
                          first expert-data-parallel replica), so any other ep_size can pick its own experts
    meta.json             step, optimizer step, data-loader position, config, layout, sha256 of each file
ZeRO partitions are gathered with DeepSpeed's `safe_get_full_*` API and scattered back with `safe_set_full_*`,
so a run saved at ep 2 resumes at ep 1 or ep 4, or on another world size, weights and optimizer state alike.

Atomicity: everything is written into `.tmp-step_<N>-<pid>/`, which is renamed to `step_<N>` once complete,
and only then is `latest` (a one-line file) replaced. A crash mid-write leaves a `.tmp-*` directory that no
resume ever picks. Files are read with `torch.load(weights_only=True)`; no pickled objects are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from coe_dist.config import RunConfig, config_from_dict
from coe_dist.errors import UserError
from coe_dist.faults import fault_point
from coe_dist.model import CoETransformer

MOMENTS = ("exp_avg", "exp_avg_sq")
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, incomplete or corrupted; the message names the file."""


# ------------------------------------------------------------------ full (unpartitioned) state of a parameter

def _zero_optimizer(engine, *, create_state: bool = False):
    """DeepSpeed's ZeRO 1/2 optimizer with each parameter linked to its Adam-moment fragments, or None
    under ZeRO 0. DeepSpeed links the fragments once, lazily, and may do so before torch's AdamW has
    created any state (then the links are empty): relink here. On resume the state does not exist yet;
    `create_state` makes it (zeros, overwritten by the checkpoint's values)."""
    opt = None if engine is None else engine.optimizer
    if not hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        return None
    if create_state:
        for flat in opt.single_partition_of_fp32_groups:
            state = opt.optimizer.state[flat]
            for k in MOMENTS:
                state.setdefault(k, torch.zeros_like(flat))
            state.setdefault("step", torch.tensor(0.0))
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()
    return opt


def _get_full(engine, zero, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """fp32 value and Adam moments of p, gathered over its ZeRO partition group (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if zero is None:  # ZeRO 0: plain torch optimizer on the module's parameters; no engine: fresh moments
        state = {} if engine is None else engine.optimizer.state.get(p, {})
        return {"param": p.detach().float().clone(),
                **{k: state[k].detach().clone() if k in state else torch.zeros_like(p, dtype=torch.float32)
                   for k in MOMENTS}}
    return {"param": safe_get_full_fp32_param(p).cpu(),
            **{k: safe_get_full_optimizer_state(p, k).cpu() for k in MOMENTS}}


def _set_full(engine, zero, p: torch.nn.Parameter, full: dict[str, torch.Tensor], opt_step: int) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = full["param"].to(p.device)
    p.data.copy_(value.to(p.dtype))  # the module's copy (ZeRO 1/2 keep a full replica of it)
    if zero is None:
        engine.optimizer.state[p] = {"step": torch.tensor(float(opt_step)),
                                     **{k: full[k].to(p.device).clone() for k in MOMENTS}}
        return
    safe_set_full_fp32_param(p, value)
    for k in MOMENTS:
        safe_set_full_optimizer_state(p, full[k].to(p.device), k)


def _set_optimizer_step(zero, opt_step: int) -> None:
    if zero is not None:
        for state in zero.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.full_like(torch.as_tensor(state["step"]), float(opt_step))


# ------------------------------------------------------------------ naming

def _expert_owner(model: CoETransformer) -> dict[int, Any]:
    """id(expert parameter) -> its CoE layer."""
    return {id(p): layer for layer in model.coe_layers() for p in layer.experts.parameters()}


def _expert_key(layer, param_name: str, global_id: int) -> str:
    return f"layers.{layer.layer}.experts.{global_id}.{param_name}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with path.open("wb") as f:
        torch.save(tensors, f)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------ save

def save(run_dir: Path, step: int, model: CoETransformer, engine, extra: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. `engine=None` (one process,
    e.g. an imported model): weights with zero Adam moments."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    root = run_dir / "checkpoints"
    tmp = root / f".tmp-step_{step}-{_shared_token(rank)}"
    if rank == 0:
        tmp.mkdir(parents=True, exist_ok=False)
    _barrier()

    dense: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    owner = _expert_owner(model)
    zero = _zero_optimizer(engine)
    for name, p in model.named_parameters():
        full = _get_full(engine, zero, p)  # collective over p's partition group: same order on all ranks
        layer = owner.get(id(p))
        if layer is None:
            for key, t in full.items():
                dense[f"{key}/{name}"] = t
            continue
        pname = name.rsplit(".", 1)[-1]
        for e in range(layer.num_local_experts):
            for key, t in full.items():
                experts[f"{key}/{_expert_key(layer, pname, layer.first_expert + e)}"] = t[e].clone()

    files: list[str] = []
    ep_size = model.coe_layers()[0].config.ep_size if model.coe_layers() else 1
    if rank == 0:
        _save_tensors(dense, tmp / "dense.pt")
        files.append("dense.pt")
    if rank < ep_size and experts:  # the first expert-data-parallel replica holds every expert once
        name = f"experts-{rank}.pt"
        _save_tensors(experts, tmp / name)
        files.append(name)
    hashes = {f: _sha256(tmp / f) for f in files}
    all_hashes = _gather_dicts(hashes)

    final = root / f"step_{step}"
    if rank == 0:
        meta = {"step": step, "format": 1, "files": all_hashes, "time": time.time(), "world_size": world,
                "ep_size": ep_size, **extra}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync_dir(tmp)
        fault_point("checkpoint.before_rename", step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_latest(root, final.name)
        _prune(root, keep_last)
    _barrier()
    return final


def _shared_token(rank: int) -> str:
    """A name all ranks agree on: rank 0's pid, broadcast."""
    token = [str(os.getpid())] if rank == 0 else [None]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _gather_dicts(d: dict[str, str]) -> dict[str, str]:
    if not dist.is_initialized():
        return dict(d)
    out: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, d)
    merged: dict[str, str] = {}
    for part in out:
        merged.update(part or {})
    return merged


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".latest-{os.getpid()}"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def _prune(root: Path, keep_last: int) -> None:
    """Delete the oldest complete checkpoints beyond keep_last (the new one is already complete)."""
    steps = sorted(_complete_steps(root))
    for step in steps[:-keep_last]:
        shutil.rmtree(root / f"step_{step}", ignore_errors=True)


# ------------------------------------------------------------------ find and verify

def _complete_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return [int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]


def verify(path: Path) -> dict[str, Any]:
    """Read meta.json and check every file's sha256; raise CheckpointError naming the bad file."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: no meta.json (incomplete checkpoint)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from None
    for name, digest in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f}: checksum mismatch (corrupted or truncated)")
    return meta


def newest_verified(run_dir: Path, warn=print) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint that verifies and its meta, or (None, None); incomplete or corrupted ones are
    skipped with a warning. Hand the meta to `load` so that it does not hash the files a second time."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None, None
    for tmp in sorted(root.glob(".tmp-step_*")):
        warn(f"coe-dist: skipping incomplete checkpoint {tmp} (interrupted while being written)")
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    candidates = sorted(_complete_steps(root), reverse=True)
    for step in candidates:
        path = root / f"step_{step}"
        try:
            meta = verify(path)
        except CheckpointError as e:
            warn(f"coe-dist: skipping checkpoint {path}: {e}")
            continue
        if latest and latest != path.name:
            warn(f"coe-dist: 'latest' names {latest} but the newest good checkpoint is {path.name}; using it")
        return path, meta
    return None, None


# ------------------------------------------------------------------ load

def _read_full_states(path: Path, meta: dict[str, Any], model: CoETransformer):
    """Yield (name, parameter, {param, exp_avg, exp_avg_sq}) for every parameter this rank holds."""
    dense = torch.load(path / "dense.pt", map_location="cpu", weights_only=True)
    experts: dict[str, torch.Tensor] = {}
    for name in meta["files"]:
        if name.startswith("experts-"):
            experts.update(torch.load(path / name, map_location="cpu", weights_only=True))
    owner = _expert_owner(model)
    for name, p in model.named_parameters():
        layer = owner.get(id(p))
        if layer is None:
            full = {k: _take(dense, f"{k}/{name}", path / "dense.pt") for k in ("param", *MOMENTS)}
        else:
            pname = name.rsplit(".", 1)[-1]
            ids = range(layer.first_expert, layer.first_expert + layer.num_local_experts)
            full = {k: torch.stack([_take(experts, f"{k}/{_expert_key(layer, pname, i)}", path / "experts-*.pt")
                                    for i in ids]) for k in ("param", *MOMENTS)}
        if full["param"].shape != p.shape:
            raise CheckpointError(f"{path}: parameter {name} has shape {list(full['param'].shape)} in the "
                                  f"checkpoint but {list(p.shape)} in this model: the model config differs")
        yield name, p, full


def load(path: Path, model: CoETransformer, engine, verified: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collective: restore weights and optimizer state into any layout. Returns meta (step, data state...).
    `verified`: the meta that verify/newest_verified returned for `path` just before this call; load then
    skips hashing the (multi-GB) files again. Pass it only straight from there: what is read is what was
    verified only if nothing rewrote the files in between. Without it, load verifies them itself."""
    meta = verify(path) if verified is None else verified
    if "imported_from" in meta:  # every rank reads the same meta: all refuse together
        raise CheckpointError(f"{path}: written by `coe-dist convert import`, it has no training state to resume; "
                              f"start a new run from it with coe-dist train --init-from {path}")
    opt_step = int(meta["optimizer_step"])
    zero = _zero_optimizer(engine, create_state=True)
    for _name, p, full in _read_full_states(path, meta, model):
        _set_full(engine, zero, p, full, opt_step)
    _set_optimizer_step(zero, opt_step)
    sched = engine.lr_scheduler
    if sched is not None:  # LambdaLR: put it where it was after opt_step steps
        sched.last_epoch = opt_step - 1
        sched.step()
    return meta


@torch.no_grad()
def load_weights(path: Path, model: CoETransformer) -> dict[str, Any]:
    """Weights only, no optimizer or engine: for eval, generate and convert."""
    meta = verify(path)
    for _name, p, full in _read_full_states(path, meta, model):
        p.copy_(full["param"].to(p.dtype))
    return meta


def resolve_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """A checkpoint directory, or a run directory (its newest complete checkpoint), and its verified meta."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path, verify(path)
    found, meta = newest_verified(path)
    if found is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint (no meta.json) nor a run directory with "
                                "checkpoints/step_*; pass e.g. runs/tiny or runs/tiny/checkpoints/step_150")
    return found, meta


def load_model(path: str | Path, overrides: list[str] = ()) -> tuple[RunConfig, CoETransformer, Path]:
    """The model of a checkpoint (or run directory) in this process, all experts local (ep_size 1)."""
    ckpt, meta = resolve_checkpoint(path)
    cfg = config_from_dict(meta["config"], [*overrides, "moe.ep_size=1"])
    model = CoETransformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    # load_weights hashes the files again, right before reading them: trusting `meta` here would leave the
    # files unwatched while the model is built.
    load_weights(ckpt, model)
    return cfg, model.eval(), ckpt


# moe keys that describe how a run executes, not the weights: a run started from a checkpoint chooses them.
RUNTIME_MOE_KEYS = ("ep_size", "expert_impl", "recompute", "overlap", "a2a_chunks")


def architecture_overrides(path: str | Path) -> list[str]:
    """`--set` strings giving a new run the model and moe sections and the tokenizer of the checkpoint at `path`
    (what its weights and token ids need); none for a directory that is not a coe-dist checkpoint or run."""
    path = Path(path)
    if not (path / "meta.json").is_file() and not (path / "checkpoints").is_dir():
        return []
    _, meta = resolve_checkpoint(path)
    arch = {**{f"model.{k}": v for k, v in meta["config"]["model"].items()},
            **{f"moe.{k}": v for k, v in meta["config"]["moe"].items() if k not in RUNTIME_MOE_KEYS},
            "data.tokenizer": meta["config"]["data"]["tokenizer"]}
    return [f"{key}={json.dumps(value)}" for key, value in arch.items()]


def _take(tensors: dict[str, torch.Tensor], key: str, where: Path) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"{where}: no tensor '{key}': the checkpoint was written for another model config")
    return tensors[key]
