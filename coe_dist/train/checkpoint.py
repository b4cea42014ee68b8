"""Checkpoints that do not depend on the parallel layout, written atomically, verified on load.

A checkpoint is a directory `<run_dir>/checkpoints/step_<N>/`:
    dense.pt              every non-expert parameter by name: fp32 value + Adam moments (written by rank 0),
                          and the model's persistent buffers (the routers' expert biases: equal on all ranks)
    experts-<r>.pt        the routed experts of EP rank r, one entry per GLOBAL expert id (written by the
                          first expert-data-parallel replica), so any other ep_size can pick its own experts
    meta.json             step, optimizer step, data-loader position, config, layout, sha256 of each file
ZeRO partitions are gathered with DeepSpeed's `safe_get_full_*` API and scattered back with `safe_set_full_*`,
so a run saved at ep 2 resumes at ep 1 or ep 4, or on another world size, weights and optimizer state alike.

Atomicity: everything is written into `.tmp-step_<N>-<pid>/`, which is renamed to `step_<N>` once complete,
and only then is `latest` (a one-line file, via `write_atomic`) replaced. A crash mid-write leaves a `.tmp-*`
directory that no resume ever picks. A write that fails (a full disk: OSError, or torch's RuntimeError) or a
tensor that is not finite, on any rank, ends the save on every rank with one CheckpointError; the partial
copy is removed and `latest` is untouched. Files are read with `torch.load(weights_only=True)`; no pickled
objects are written. `check_model_shape`: a checkpoint loads only into the model shape it was saved from.
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

from coe_dist.atomic_file import fsync_dir, write_atomic
from coe_dist.config import ConfigError, RunConfig, config_from_dict
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


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with path.open("wb") as f:
        torch.save(tensors, f)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------ save

def save(run_dir: Path, step: int, model: CoETransformer, engine, extra: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    All ranks agree on the outcome: when any rank cannot write its file (a full disk: OSError, or the
    RuntimeError torch's serializer raises instead), or holds non-finite values, or rank 0 cannot finish,
    the partial copy is removed, `latest` and the older checkpoints stay as they were, and every rank
    raises the same CheckpointError. `engine=None` (one process, e.g. an imported model): weights
    with zero Adam moments."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    root = run_dir / "checkpoints"
    tmp = root / f".tmp-step_{step}-{_shared_token(rank)}"
    problem = None
    if rank == 0:
        try:
            tmp.mkdir(parents=True, exist_ok=False)
        except OSError as e:
            problem = _write_failure(e, tmp, step)
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

    dense.update({f"buffer/{name}": b.detach().cpu().clone() for name, b in _persistent_buffers(model).items()})
    ep_size = model.coe_layers()[0].config.ep_size if model.coe_layers() else 1
    mine = {"dense.pt": dense} if rank == 0 else {}
    if rank < ep_size and experts:  # the first expert-data-parallel replica holds every expert once
        mine[f"experts-{rank}.pt"] = experts
    hashes: dict[str, str] = {}
    if problem is None:
        problem = _non_finite(mine, step)
    if problem is None:
        try:
            for name, tensors in mine.items():
                _save_tensors(tensors, tmp / name)
                hashes[name] = _sha256(tmp / name)
        except (OSError, RuntimeError) as e:
            problem = _write_failure(e, tmp, step)
    all_hashes, problems = _gather_outcomes(hashes, problem)

    final = root / f"step_{step}"
    if rank == 0 and not problems:
        meta = {"step": step, "format": 1, "files": all_hashes, "time": time.time(), "world_size": world,
                "ep_size": ep_size, "placement": placement_of(model), **extra}
        try:
            _publish(tmp, final, meta, step)
        except OSError as e:
            problems = [_write_failure(e, tmp, step)]
    problems = _broadcast(problems)
    if problems:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(problems[0])
    if rank == 0:
        _prune(root, keep_last)
    _barrier()
    return final


def _publish(tmp: Path, final: Path, meta: dict[str, Any], step: int) -> None:
    """meta.json, then the rename, then `latest`; a failure after the rename takes the new directory back."""
    write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
    fsync_dir(tmp)
    fault_point("checkpoint.before_rename", step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    try:
        write_atomic(final.parent / "latest", final.name + "\n")
    except OSError:
        os.replace(final, tmp)  # removed by the caller: `latest` still names the previous checkpoint
        raise


def _write_failure(e: BaseException, where: Path, step: int) -> str:
    """One line for a failed write. torch's serializer raises RuntimeError('... file write failed') without
    an errno: a (nearly) full file system is then named as what it almost always is."""
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
        filename = f" ({e.filename})" if e.filename else ""
    else:
        reason = " ".join(str(e).split())[:200]
        filename = ""
        try:
            if shutil.disk_usage(where if where.exists() else where.parent).free < 1 << 20:
                reason = f"No space left on device (torch: {reason})"
        except OSError:
            pass
    return (f"could not write checkpoint step_{step} in {where.parent}: {reason}{filename}; removed the partial "
            f"copy, `latest` and the previous checkpoints are intact: free space (or point log.run_dir elsewhere) "
            "and resume with --resume auto")


def _non_finite(files: dict[str, dict[str, torch.Tensor]], step: int) -> str | None:
    """A checkpoint with nan/inf weights or moments would be a 'good' state that cannot train: refuse it."""
    for tensors in files.values():
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return (f"refused to save checkpoint step_{step}: {key} holds non-finite values (the weights "
                        "diverged); `latest` and the previous checkpoints are intact: lower optim.lr (or fix the "
                        "data) and resume from the last good checkpoint with --resume auto")
    return None


def _shared_token(rank: int) -> str:
    """A name all ranks agree on: rank 0's pid, broadcast."""
    token = [str(os.getpid())] if rank == 0 else [None]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _gather_outcomes(hashes: dict[str, str], problem: str | None) -> tuple[dict[str, str], list[str]]:
    """Every rank's file hashes merged, and every rank's problem (None when it wrote its files)."""
    parts: list[Any] = [(hashes, problem)]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (hashes, problem))
    merged: dict[str, str] = {}
    for part_hashes, _ in parts:
        merged.update(part_hashes)
    return merged, [p for _, p in parts if p]


def _broadcast(problems: list[str]) -> list[str]:
    """Rank 0's verdict for all ranks."""
    box = [problems]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _prune(root: Path, keep_last: int) -> None:
    """Delete the oldest complete checkpoints beyond keep_last (the new one is already complete)."""
    steps = sorted(complete_steps(root))
    for step in steps[:-keep_last]:
        shutil.rmtree(root / f"step_{step}", ignore_errors=True)


# ------------------------------------------------------------------ find and verify

def complete_steps(root: Path) -> list[int]:
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
    candidates = sorted(complete_steps(root), reverse=True)
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


# ------------------------------------------------------------------ the model a checkpoint belongs to

# Keys that decide which parameters exist and how they are shaped or split into heads; a checkpoint loads
# only into the same values (no conversion between them exists).
SHAPE_KEYS = {"model": ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "first_k_dense"),
              "moe": ("num_experts", "iterations", "num_shared_experts", "expert_hidden_size", "independent_gating")}


def check_model_shape(cfg: RunConfig, meta: dict[str, Any], path: Path) -> None:
    """ConfigError naming every shape key whose value differs from the checkpoint's, with both values."""
    saved = meta.get("config") or {}
    differ = []
    for section, keys in SHAPE_KEYS.items():
        for key in keys:
            was, now = saved.get(section, {}).get(key), getattr(getattr(cfg, section), key)
            if was is not None and was != now:
                differ.append(f"{section}.{key}={now} (checkpoint: {was})")
    if differ:
        raise ConfigError(f"{path} was saved from another model shape: {', '.join(differ)}: resume with the "
                          "checkpoint's values, or start a new run in another log.run_dir")


# Keys that change how a run trains or computes but not the layout of its weights: a resume may change them
# (extending train.steps, a new dtype on another machine), but the run's config.yaml then no longer says what
# its earlier steps trained with, so the trainer names each one changed. Layout and speed keys are left out.
RUNTIME_TRAIN_KEYS = ("steps", "micro_batch_size", "grad_accum", "device", "init_from", "nan_policy",
                      "max_consecutive_nan")


ABSENT = object()  # a key a saved config lacks (written before the key existed)


def setting_changes(cfg: RunConfig, saved: dict[str, Any], skip: dict[str, tuple[str, ...]]
                    ) -> list[tuple[str, Any, Any]]:
    """(section.key, saved value or ABSENT, cfg's value) for each model, moe, optim or train setting of cfg that
    differs from `saved` (a config as `RunConfig.to_dict` writes it); "auto" values and the keys of `skip`
    (section -> keys) are not compared."""
    now = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as saved
    out = []
    for section in ("model", "moe", "optim", "train"):
        for key, value in now[section].items():
            was = saved.get(section, {}).get(key, ABSENT)
            if key not in skip.get(section, ()) and value != "auto" and was != value:
                out.append((f"{section}.{key}", was, value))
    return out


def changed_settings(cfg: RunConfig, meta: dict[str, Any]) -> list[str]:
    """`section.key=new (checkpoint: old)` for each setting the resumed run changes from its checkpoint's; the
    runtime keys (RUNTIME_MOE_KEYS, RUNTIME_TRAIN_KEYS) and keys the checkpoint predates are not counted."""
    changes = setting_changes(cfg, meta.get("config") or {}, {"moe": RUNTIME_MOE_KEYS, "train": RUNTIME_TRAIN_KEYS})
    return [f"{key}={now} (checkpoint: {was})" for key, was, now in changes if was is not ABSENT]


# ------------------------------------------------------------------ placement
# Experts are stored by slot (slot s: rank s // (N/P)); meta["placement"][layer] names the original expert in each
# slot (absent: in order). A model with another placement takes each slot's expert, its router rows and their
# Adam moments from wherever the checkpoint stored that original expert: a re-placement is a relabelling, and the
# function does not change.

_ROUTER_ROWS = re.compile(r"^layers\.(\d+)\.ffn\.routers\.\d+\.")


def placement_of(model: CoETransformer) -> dict[str, list[int]]:
    """Layer -> original expert per slot, for the layers not in order."""
    return {str(layer.layer): layer.expert_order.tolist() for layer in model.coe_layers()
            if not torch.equal(layer.expert_order.cpu(), torch.arange(layer.config.num_experts))}


def _slot_sources(meta: dict[str, Any], model: CoETransformer, path: Path) -> dict[int, torch.Tensor]:
    """Layer -> the stored slot of each of this model's slots, for the layers where the placements differ."""
    saved = meta.get("placement") or {}
    sources = {}
    for layer in model.coe_layers():
        N = layer.config.num_experts
        stored = torch.tensor(saved.get(str(layer.layer), list(range(N))))
        if sorted(stored.tolist()) != list(range(N)):
            raise CheckpointError(f"{path}: meta.json placement of layer {layer.layer} is not a permutation of "
                                  f"{N} experts: the model config differs, or the file was edited")
        slot_of = torch.empty(N, dtype=torch.long)
        slot_of[stored] = torch.arange(N)
        src = slot_of[layer.expert_order.cpu()]
        if not torch.equal(src, torch.arange(N)):
            sources[layer.layer] = src
    return sources


def _to_slots(name: str, t: torch.Tensor, sources: dict[int, torch.Tensor]) -> torch.Tensor:
    """A router's rows (weight, expert_bias, their moments) in this model's slot order."""
    m = _ROUTER_ROWS.match(name)
    return t[sources[int(m.group(1))]] if m and int(m.group(1)) in sources else t


# ------------------------------------------------------------------ load

def _persistent_buffers(model: CoETransformer) -> dict[str, torch.Tensor]:
    params = {name for name, _ in model.named_parameters()}
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if name not in params}


@torch.no_grad()
def _restore_buffers(path: Path, dense: dict[str, torch.Tensor], model: CoETransformer,
                     sources: dict[int, torch.Tensor]) -> None:
    """Buffers a checkpoint lacks keep their initial value: a run saved without moe.expert_bias_rate
    continues with it from zero biases."""
    for name, b in _persistent_buffers(model).items():
        saved = dense.get(f"buffer/{name}")
        if saved is None:
            continue
        saved = _to_slots(name, saved, sources)
        if saved.shape != b.shape:
            raise CheckpointError(f"{path}: buffer {name} has shape {list(saved.shape)} in the checkpoint but "
                                  f"{list(b.shape)} in this model: the model config differs")
        b.copy_(saved.to(b.dtype))


def _read_full_states(path: Path, meta: dict[str, Any], model: CoETransformer, dense: dict[str, torch.Tensor],
                      sources: dict[int, torch.Tensor]):
    """Yield (name, parameter, {param, exp_avg, exp_avg_sq}) for every parameter this rank holds, in the
    model's placement (`sources`: _slot_sources)."""
    experts: dict[str, torch.Tensor] = {}
    for name in meta["files"]:
        if name.startswith("experts-"):
            experts.update(torch.load(path / name, map_location="cpu", weights_only=True))
    owner = _expert_owner(model)
    for name, p in model.named_parameters():
        layer = owner.get(id(p))
        if layer is None:
            full = {k: _to_slots(name, _take(dense, f"{k}/{name}", path / "dense.pt"), sources)
                    for k in ("param", *MOMENTS)}
        else:
            pname = name.rsplit(".", 1)[-1]
            slots = range(layer.first_expert, layer.first_expert + layer.num_local_experts)
            ids = [int(sources[layer.layer][s]) for s in slots] if layer.layer in sources else slots
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
    dense = _read_dense(path)
    sources = _slot_sources(meta, model, path)
    for _name, p, full in _read_full_states(path, meta, model, dense, sources):
        _set_full(engine, zero, p, full, opt_step)
    _restore_buffers(path, dense, model, sources)
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
    dense = _read_dense(path)
    sources = _slot_sources(meta, model, path)
    for _name, p, full in _read_full_states(path, meta, model, dense, sources):
        p.copy_(full["param"].to(p.dtype))
    _restore_buffers(path, dense, model, sources)
    return meta


def _read_dense(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "dense.pt", map_location="cpu", weights_only=True)


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
RUNTIME_MOE_KEYS = ("ep_size", "expert_impl", "recompute", "overlap", "a2a_chunks", "dispatch", "dispatch_dtype",
                    "ranks_per_node", "placement", "replace_interval")


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
