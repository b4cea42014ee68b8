"""Typed run configuration: YAML files + `--set section.key=value` overrides, validated up front.

A run config has seven sections; each is a dataclass whose field names are the YAML keys:

    model     the dense transformer (sizes, attention, dense FFN)
    moe       the CoE/MoE block (COE_SPEC "Names users will see") and its expert layout (ep_size)
    parallel  ZeRO stage, backend, DeepSpeed JSON override
    data      dataset and tokenizer
    optim     AdamW + warm-up/cosine schedule
    train     steps, batch sizes, precision, seed
    log       run directory and intervals

Every problem is a `ConfigError` naming the key, the value and the fix; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value. The message names the key, the value and the fix."""


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ffn_hidden_size: int = 512  # width of the dense SwiGLU layers (first_k_dense)
    first_k_dense: int = 0  # the first k layers use a dense FFN instead of the CoE block
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8  # N
    top_k: int = 2  # K
    iterations: int = 2  # C
    num_shared_experts: int = 1  # S
    expert_hidden_size: int = 128  # f
    inner_residual: bool = True
    outer_residual: bool = False
    independent_gating: bool = True
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    aux_loss_coef: float = 0.001
    aux_loss_type: str = "seq"  # seq | global
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None  # None = dropless
    ep_size: int = 1  # expert-parallel degree P: each rank of a group holds N/P experts
    expert_impl: str = "grouped"  # grouped (torch._grouped_mm) | loop
    recompute: bool = False  # recompute each iteration's expert path in backward (saves activation memory)
    overlap: bool = True  # ep_size > 1 only: shared experts (and other chunks) run while all-to-alls are in flight
    a2a_chunks: int = 1  # ep_size > 1 only: pipeline each iteration's tokens through this many all-to-all chunks
    dispatch: str = "copies"  # ep_size > 1 only: copies (a row per token copy) | dedup (a row per token and rank)
    dispatch_dtype: str = "bf16"  # ep_size > 1 only: bf16 (rows in the compute dtype) | fp8 (e4m3 + a scale per row)


@dataclass(kw_only=True)
class ParallelConfig:
    zero_stage: int = 2
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    deepspeed_config: str | None = None  # path to a DeepSpeed JSON merged over the generated one
    timeout_s: float = 600.0  # collective timeout


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "embedded"  # embedded | path prefix of a megatron indexed dataset
    tokenizer: str = "byte"  # byte | path to a HF tokenizer.json
    num_documents: int = 4000  # size of the embedded corpus
    valid_fraction: float = 0.05  # held out of data.dataset, unless data.valid_dataset is given
    valid_dataset: str | None = None  # a separate held-out prefix (e.g. GSM8K test)
    cache_dir: str = ".cache/coe-dist"


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 200
    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum: int = 1
    seq_len: int = 128
    dtype: str = "bf16"  # bf16 | fp32
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    init_from: str | None = None  # reference-layout CoE weights to start from (`coe-dist convert export`)
    nan_policy: str = "stop"  # non-finite loss or gradients: stop (save the last good state, exit 1) | skip
    max_consecutive_nan: int = 5  # skip: stop after this many skipped steps in a row


@dataclass(kw_only=True)
class LogConfig:
    run_dir: str = "runs/default"
    log_interval: int = 10
    eval_interval: int = 50
    eval_batches: int = 4
    save_interval: int = 0  # 0 = only at the end
    keep_last: int = 2
    tensorboard: bool = True
    sample_log: bool = False  # each rank appends the dataset indices it consumed to <run_dir>/samples/
    collapse_share: float = 0.5  # warn when one expert gets more than this share of a (layer, iteration)'s tokens
    collapse_steps: int = 5  # ... on this many logging steps in a row


@dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)


# ---------------------------------------------------------------- parsing

def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(options))}."


def _coerce(where: str, value: Any, hint: Any) -> Any:
    """Convert a YAML/--set value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(where, value, inner)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}={value!r}: expected a list of {len(args)} numbers, e.g. [0.9, 0.95]")
        return tuple(_coerce(where, v, a) for v, a in zip(value, args, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r}: expected an integer") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}={value!r}: expected a number")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r}: expected a number") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {where}")


def _build_section(name: str, raw: Any, base: Any) -> Any:
    cls = type(base)
    if not isinstance(raw, dict):
        raise ConfigError(f"section '{name}' must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    values = dataclasses.asdict(base)
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"unknown key '{name}.{key}'.{_did_you_mean(str(key), list(hints))}")
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set train.steps=50")
    path, value = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value with one dot, e.g. --set moe.top_k=2")
    return parts[0], parts[1], yaml.safe_load(value) if value.strip() else None


def config_from_dict(raw: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in (raw or {}).items()}
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"section '{section}' must be a mapping, got {raw[section]!r}")
        raw[section][key] = value
    base = RunConfig()
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown section '{name}'.{_did_you_mean(str(name), list(SECTIONS))}")
        sections[name] = _build_section(name, value, getattr(base, name))
    cfg = dataclasses.replace(base, **sections)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (None = defaults), apply `--set` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist: "
                              "pass an existing YAML, e.g. configs/tiny.yaml")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, overrides)


# ---------------------------------------------------------------- validation

def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(section: str, obj: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        _check(value > 0, f"{section}.{key}={value}: must be > 0")


def _choice(section: str, obj: Any, key: str, options: tuple[str, ...]) -> None:
    value = getattr(obj, key)
    _check(value in options, f"{section}.{key}={value!r}: must be one of {', '.join(options)}")


def validate_moe(moe: MoEConfig, hidden_size: int | None = None) -> None:
    _positive("moe", moe, "num_experts", "top_k", "expert_hidden_size", "ep_size")
    _check(moe.iterations >= 1, f"moe.iterations={moe.iterations}: must be >= 1 (1 = plain MoE)")
    _check(moe.num_shared_experts >= 0, f"moe.num_shared_experts={moe.num_shared_experts}: must be >= 0")
    _check(moe.top_k <= moe.num_experts,
           f"moe.top_k={moe.top_k} > moe.num_experts={moe.num_experts}: pick at most num_experts experts")
    _check(moe.num_experts % moe.ep_size == 0,
           f"moe.num_experts={moe.num_experts} is not divisible by moe.ep_size={moe.ep_size}: "
           f"use an ep_size that divides {moe.num_experts}")
    _check(moe.inner_residual or moe.outer_residual,
           "moe.inner_residual=false and moe.outer_residual=false: the CoE chain needs a residual; "
           "set one of them to true")
    _choice("moe", moe, "aux_loss_type", ("seq", "global"))
    _choice("moe", moe, "expert_impl", ("grouped", "loop"))
    _choice("moe", moe, "dispatch", ("copies", "dedup"))
    _choice("moe", moe, "dispatch_dtype", ("bf16", "fp8"))
    _check(moe.aux_loss_coef >= 0, f"moe.aux_loss_coef={moe.aux_loss_coef}: must be >= 0")
    _check(moe.z_loss_coef >= 0, f"moe.z_loss_coef={moe.z_loss_coef}: must be >= 0")
    _check(moe.routed_scaling_factor > 0, f"moe.routed_scaling_factor={moe.routed_scaling_factor}: must be > 0")
    _check(moe.capacity_factor is None or moe.capacity_factor > 0,
           f"moe.capacity_factor={moe.capacity_factor}: must be > 0, or null for dropless")
    _check(moe.a2a_chunks >= 1,
           f"moe.a2a_chunks={moe.a2a_chunks}: must be >= 1; use 1 for one all-to-all per iteration and direction, "
           "or 2 or more to pipeline that many token chunks")


def validate(cfg: RunConfig) -> None:
    m = cfg.model
    _positive("model", m, "vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
              "max_seq_len", "rope_theta", "norm_eps", "init_std")
    _check(m.hidden_size % m.num_heads == 0,
           f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}: "
           "choose num_heads dividing hidden_size")
    _check((m.hidden_size // m.num_heads) % 2 == 0,
           f"model.hidden_size/num_heads={m.hidden_size // m.num_heads}: RoPE needs an even head size")
    _check(0 <= m.first_k_dense <= m.num_layers,
           f"model.first_k_dense={m.first_k_dense}: must be between 0 and model.num_layers={m.num_layers}")
    validate_moe(cfg.moe)

    p = cfg.parallel
    _check(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={p.zero_stage}: must be 0, 1, 2 or 3")
    # DeepSpeed partitions expert parameters like dense ones under ZeRO-3 and refuses its MoE there.
    _check(not (p.zero_stage == 3 and cfg.moe.ep_size > 1),
           f"parallel.zero_stage=3 with moe.ep_size={cfg.moe.ep_size}: DeepSpeed does not support "
           "expert parallelism under ZeRO-3; use zero_stage 2 (or ep_size 1)")
    _choice("parallel", p, "backend", ("auto", "nccl", "gloo"))
    _check(p.timeout_s > 0, f"parallel.timeout_s={p.timeout_s}: must be > 0")
    _check(p.deepspeed_config is None or Path(p.deepspeed_config).is_file(),
           f"parallel.deepspeed_config={p.deepspeed_config!r}: file does not exist")

    d = cfg.data
    _check(d.dataset == "embedded" or bool(d.dataset), "data.dataset is empty: use 'embedded' or a dataset prefix")
    _positive("data", d, "num_documents")
    _check(0 < d.valid_fraction < 1, f"data.valid_fraction={d.valid_fraction}: must be in (0, 1)")

    o = cfg.optim
    _positive("optim", o, "lr", "eps")
    _check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr}: must be between 0 and optim.lr={o.lr}")
    _check(all(0 <= b < 1 for b in o.betas), f"optim.betas={list(o.betas)}: each must be in [0, 1)")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    _check(0 <= o.warmup_fraction < 1, f"optim.warmup_fraction={o.warmup_fraction}: must be in [0, 1)")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 = no clipping)")

    t = cfg.train
    _positive("train", t, "steps", "micro_batch_size", "grad_accum", "seq_len")
    _check(t.seq_len <= m.max_seq_len,
           f"train.seq_len={t.seq_len} > model.max_seq_len={m.max_seq_len}: raise max_seq_len or shorten seq_len")
    _choice("train", t, "dtype", ("bf16", "fp32"))
    _choice("train", t, "device", ("auto", "cpu", "cuda"))
    _choice("train", t, "nan_policy", ("stop", "skip"))
    _check(t.max_consecutive_nan >= 1, f"train.max_consecutive_nan={t.max_consecutive_nan}: must be >= 1")
    # Skipping needs DeepSpeed's ZeRO 1/2 optimizer, which leaves out an update whose gradient norm is not finite.
    _check(t.nan_policy == "stop" or p.zero_stage in (1, 2),
           f"train.nan_policy=skip with parallel.zero_stage={p.zero_stage}: skipping a step needs ZeRO stage 1 "
           "or 2; use parallel.zero_stage=2 or train.nan_policy=stop")

    lg = cfg.log
    _positive("log", lg, "log_interval", "eval_interval", "keep_last")
    _check(lg.eval_batches >= 0, f"log.eval_batches={lg.eval_batches}: must be >= 0")
    _check(lg.save_interval >= 0, f"log.save_interval={lg.save_interval}: must be >= 0 (0 = only at the end)")
    _check(bool(lg.run_dir), "log.run_dir is empty: give a directory for logs and checkpoints")
    _check(0 < lg.collapse_share <= 1,
           f"log.collapse_share={lg.collapse_share}: must be in (0, 1] (a share of tokens; 1 = never warn)")
    _check(lg.collapse_steps >= 1, f"log.collapse_steps={lg.collapse_steps}: must be >= 1 (logging steps in a row)")


def check_world(cfg: RunConfig, world_size: int) -> int:
    """Check the expert layout against the launch; return the expert-data-parallel degree D."""
    ep = cfg.moe.ep_size
    _check(world_size % ep == 0,
           f"moe.ep_size={ep} does not divide the world size {world_size}: launch a multiple of {ep} "
           f"processes or set moe.ep_size to a divisor of {world_size}")
    return world_size // ep
