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
import json
import math
import os
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
    # Keys an imported Hugging Face MoE needs (coe-dist convert import); the defaults are the original model.
    num_kv_heads: int | None = None  # grouped-query attention: key/value heads (None = num_heads)
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2-MoE)
    qk_norm: bool = False  # RMSNorm over the whole q and k projections before RoPE (OLMoE)
    tie_embeddings: bool = False  # the LM head reuses the embedding matrix


@dataclass(kw_only=True)
class MoEConfig:
    num_experts: int = 8  # N
    top_k: int = 2  # K
    iterations: int = 2  # C
    num_shared_experts: int = 1  # S
    expert_hidden_size: int = 128  # f
    shared_expert_hidden_size: int | None = None  # width of the shared SwiGLU (None = S * f; Qwen2-MoE sets it)
    shared_expert_gate: bool = False  # scale the shared experts by sigmoid(w . h) per token (Qwen2-MoE)
    inner_residual: bool = True
    outer_residual: bool = False
    independent_gating: bool = True
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    gate_scaling: str = "reference"  # reference (renorm if K > 1 and norm_topk_prob, else scale) | renorm_then_scale
    router_score: str = "softmax"  # softmax | sigmoid (DeepSeek-V3: gates renormalised over the chosen K, scaled)
    expert_bias_rate: float = 0.0  # > 0: aux-loss-free balancing, bias += rate * sign(mean load - load) per step
    routing_groups: int = 1  # G: device-limited routing over G groups of N/G consecutive experts (1 = off)
    routing_group_topk: int = 1  # M: each token picks its K experts within its best M groups
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
    #                           | node_dedup (a row per token and node over the network, then per rank in the node)
    ranks_per_node: int = 0  # node_dedup only: ranks of the group per node (0 = the launcher's LOCAL_WORLD_SIZE)
    dispatch_dtype: str = "bf16"  # ep_size > 1 only: bf16 (rows in the compute dtype) | fp8 (e4m3 + a scale per row)
    placement: str | None = None  # `coe-dist placement plan` output: which rank holds which expert (null: in order)
    replace_interval: int = 0  # > 0: re-place experts by co-selection at checkpoint saves every this many steps


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
    dtype: str = "auto"  # auto (bf16 where the device computes it natively, else fp32) | bf16 | fp32
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    # A new run starts from these weights: a coe-dist checkpoint or run dir (`coe-dist train --init-from`, e.g.
    # an import) or a reference-layout directory (its CoE blocks only; `coe-dist convert export`).
    init_from: str | None = None
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
    collapse_share: float = 0.5  # warn when one expert's token share goes this far from an even split to all of them
    collapse_steps: int = 5  # ... on this many logging steps in a row
    # co-selection counts for `coe-dist placement plan` (one all-reduce of L x (2C-1) x N^2 counts per logging step)
    coselection: bool = True


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
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r}: expected a number") from None
        # inf/nan pass every range check below and fail later (an inf lr trains into inf weights).
        if not math.isfinite(number):
            raise ConfigError(f"{where}={value!r}: must be a finite number")
        return number
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {where}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping: keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"{where} is not valid YAML: {detail}") from None


# Keys holding file-system paths: `~` is expanded in each (the shell does not expand it inside --set a=~/x).
PATH_KEYS = (("log", "run_dir"), ("data", "dataset"), ("data", "valid_dataset"), ("data", "tokenizer"),
             ("data", "cache_dir"), ("parallel", "deepspeed_config"), ("train", "init_from"), ("moe", "placement"))


def expand_path(text: str) -> str:
    """`~` and `~user` at the start of a path, as the shell would."""
    return os.path.expanduser(text)


def _expand_blend(spec: str) -> str:
    """data.dataset may be a blend 'W:PREFIX,W:PREFIX': expand each prefix."""
    items = []
    for item in spec.split(","):
        weight, sep, rest = item.partition(":")
        items.append(f"{weight}:{expand_path(rest.strip())}" if sep and not weight.strip().startswith("~")
                     else expand_path(item.strip()))
    return ",".join(items)


def _expand_paths(cfg: RunConfig) -> None:
    for section, key in PATH_KEYS:
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value:
            setattr(obj, key, _expand_blend(value) if (section, key) == ("data", "dataset") else expand_path(value))


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
    if "\n" in value or "\r" in value:  # YAML would read a line break + `#...` as a comment and cut it off
        raise ConfigError(f"--set {text!r}: the value holds a line break; give one line (quote it in the shell)")
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value with one dot, e.g. --set moe.top_k=2")
    return parts[0], parts[1], _parse_yaml(value, f"--set {text!r}") if value.strip() else None


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
    _expand_paths(cfg)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (None = defaults), apply `--set` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(expand_path(str(path)))
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist: "
                              "pass an existing YAML, e.g. configs/tiny.yaml")
        raw = _parse_yaml(_read_utf8(path, "config file"), f"config file {str(path)!r}") or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, overrides)


def _read_utf8(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}): save it as "
                          "UTF-8") from None


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
    _check(moe.shared_expert_hidden_size is None or (moe.num_shared_experts and moe.shared_expert_hidden_size > 0),
           f"moe.shared_expert_hidden_size={moe.shared_expert_hidden_size}: must be > 0 with num_shared_experts >= 1, "
           "or null for num_shared_experts * expert_hidden_size")
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
    _choice("moe", moe, "gate_scaling", ("reference", "renorm_then_scale"))
    _choice("moe", moe, "router_score", ("softmax", "sigmoid"))
    _check(moe.expert_bias_rate >= 0,
           f"moe.expert_bias_rate={moe.expert_bias_rate}: must be >= 0 (0 = no aux-loss-free balancing)")
    _validate_routing_groups(moe)
    _choice("moe", moe, "dispatch", ("copies", "dedup", "node_dedup"))
    _check(moe.ranks_per_node >= 0,
           f"moe.ranks_per_node={moe.ranks_per_node}: must be >= 0 (0 = the launcher's ranks per node)")
    R, P = moe.ranks_per_node, moe.ep_size
    _check(moe.dispatch != "node_dedup" or not R or R % P == 0 or P % R == 0,
           f"moe.ranks_per_node={R} with moe.ep_size={P} and moe.dispatch=node_dedup: one must divide the other "
           "(an expert-parallel group of whole nodes, or inside one node)")
    _choice("moe", moe, "dispatch_dtype", ("bf16", "fp8"))
    _check(moe.aux_loss_coef >= 0, f"moe.aux_loss_coef={moe.aux_loss_coef}: must be >= 0")
    _check(moe.z_loss_coef >= 0, f"moe.z_loss_coef={moe.z_loss_coef}: must be >= 0")
    _check(moe.routed_scaling_factor > 0, f"moe.routed_scaling_factor={moe.routed_scaling_factor}: must be > 0")
    _check(moe.capacity_factor is None or moe.capacity_factor > 0,
           f"moe.capacity_factor={moe.capacity_factor}: must be > 0, or null for dropless")
    _check(moe.a2a_chunks >= 1,
           f"moe.a2a_chunks={moe.a2a_chunks}: must be >= 1; use 1 for one all-to-all per iteration and direction, "
           "or 2 or more to pipeline that many token chunks")


def _validate_routing_groups(moe: MoEConfig) -> None:
    G, M, N, K = moe.routing_groups, moe.routing_group_topk, moe.num_experts, moe.top_k
    _check(G == 1 or not (moe.placement or moe.replace_interval),
           f"moe.placement={moe.placement!r}, moe.replace_interval={moe.replace_interval} with moe.routing_groups={G}: "
           "a placement relabels experts, which would change the groups and so the function; use one of them "
           "(no placement, or routing_groups=1)")
    _check(G >= 1 and N % G == 0,
           f"moe.routing_groups={G}: must divide moe.num_experts={N} (1 = no device-limited routing), "
           f"e.g. moe.routing_groups=moe.ep_size")
    _check(1 <= M <= G, f"moe.routing_group_topk={M}: must be between 1 and moe.routing_groups={G}")
    _check(M * (N // G) >= K,
           f"moe.routing_group_topk={M}: its {M} groups of {N // G} experts hold fewer than moe.top_k={K}; "
           f"use moe.routing_group_topk >= {-(-K // (N // G))}")


def validate(cfg: RunConfig) -> None:
    m = cfg.model
    _positive("model", m, "vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
              "max_seq_len", "rope_theta", "norm_eps", "init_std")
    _check(m.hidden_size % m.num_heads == 0,
           f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}: "
           "choose num_heads dividing hidden_size")
    kv_heads = m.num_heads if m.num_kv_heads is None else m.num_kv_heads
    _check(kv_heads > 0 and m.num_heads % kv_heads == 0,
           f"model.num_kv_heads={m.num_kv_heads}: must divide model.num_heads={m.num_heads} (null = num_heads)")
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
    _check(0 < p.timeout_s <= MAX_TIMEOUT_S,
           f"parallel.timeout_s={p.timeout_s:g}: must be > 0 and at most {MAX_TIMEOUT_S:g} s (30 days)")
    _check_deepspeed_json(p.deepspeed_config)

    d = cfg.data
    _check(d.dataset == "embedded" or bool(d.dataset), "data.dataset is empty: use 'embedded' or a dataset prefix")
    _positive("data", d, "num_documents")
    _check(0 < d.valid_fraction < 1, f"data.valid_fraction={d.valid_fraction}: must be in (0, 1)")

    o = cfg.optim
    _positive("optim", o, "lr", "eps")
    _check(0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr}: must be between 0 and optim.lr={o.lr}")
    _check(all(0 <= b < 1 for b in o.betas), f"optim.betas={list(o.betas)}: each must be in [0, 1)")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}: must be >= 0")
    # AdamW's step size lr / (1 - beta1^t) and decay factor lr * weight_decay are float32 in torch: beyond its
    # range the first step raises "value cannot be converted to type float without overflow".
    _check(o.lr / (1 - o.betas[0]) <= FLOAT32_MAX and o.lr * o.weight_decay <= FLOAT32_MAX,
           f"optim.lr={o.lr:g}: AdamW's step size lr / (1 - beta1) or lr * weight_decay overflows float32 "
           f"({FLOAT32_MAX:.3g}): use a learning rate of at most {FLOAT32_MAX * (1 - o.betas[0]):.3g}")
    _check(0 <= o.warmup_fraction < 1, f"optim.warmup_fraction={o.warmup_fraction}: must be in [0, 1)")
    _check(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 = no clipping)")

    t = cfg.train
    _positive("train", t, "steps", "micro_batch_size", "grad_accum", "seq_len")
    _check(t.seq_len <= m.max_seq_len,
           f"train.seq_len={t.seq_len} > model.max_seq_len={m.max_seq_len}: raise max_seq_len or shorten seq_len")
    _check(0 <= t.seed <= MAX_SEED, f"train.seed={t.seed}: must be in [0, {MAX_SEED}] (numpy's seed range)")
    _choice("train", t, "dtype", ("auto", "bf16", "fp32"))
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
    r = cfg.moe.replace_interval
    _check(r == 0 or (r > 0 and lg.save_interval and r % lg.save_interval == 0),
           f"moe.replace_interval={r}: experts are re-placed at checkpoint saves; use 0 (off) or a positive "
           f"multiple of log.save_interval={lg.save_interval} (which must be > 0)")
    _check(r == 0 or lg.coselection,
           f"moe.replace_interval={r} with log.coselection=false: re-placement plans from the co-selection counts; "
           "turn log.coselection on, or moe.replace_interval=0")
    _check(bool(lg.run_dir), "log.run_dir is empty: give a directory for logs and checkpoints")
    _check(0 < lg.collapse_share <= 1,
           f"log.collapse_share={lg.collapse_share}: must be in (0, 1] (0 = an even split, 1 = all tokens: never warn)")
    _check(lg.collapse_steps >= 1, f"log.collapse_steps={lg.collapse_steps}: must be >= 1 (logging steps in a row)")
    for section, key in PATH_KEYS:
        _check_not_under_a_file(f"{section}.{key}", getattr(getattr(cfg, section), key))


MAX_SEED = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38
MAX_TIMEOUT_S = 30 * 86400.0  # torch keeps collective timeouts in milliseconds; inf or 1e300 overflow


def _check_deepspeed_json(path: str | None) -> None:
    """The DeepSpeed override must be a JSON object: DeepSpeed would fail on it only after start-up."""
    if path is None:
        return
    where = f"parallel.deepspeed_config={path!r}"
    _check(Path(path).is_file(), f"{where}: file does not exist")
    try:
        value = json.loads(_read_utf8(Path(path), "parallel.deepspeed_config file"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON ({e}): fix the file or drop the key") from None
    _check(isinstance(value, dict),
           f"{where} holds a JSON {type(value).__name__}, not an object: write {{\"key\": value, ...}}")


def _check_not_under_a_file(key: str, value: str | None) -> None:
    """A path below a regular file can never be created: say which component is the file."""
    if not value:
        return
    for part in value.split(",") if key == "data.dataset" else [value]:
        part = part.partition(":")[2] if key == "data.dataset" and ":" in part else part
        for parent in Path(part.strip()).parents:
            if parent.is_file():
                raise ConfigError(f"{key}={value!r}: {str(parent)!r} is a regular file, not a directory: "
                                  f"choose a path under a directory (--set {key}=PATH)")


def check_world(cfg: RunConfig, world_size: int) -> int:
    """Check the expert layout against the launch; return the expert-data-parallel degree D."""
    ep = cfg.moe.ep_size
    _check(world_size % ep == 0,
           f"moe.ep_size={ep} does not divide the world size {world_size}: launch a multiple of {ep} "
           f"processes or set moe.ep_size to a divisor of {world_size}")
    return world_size // ep
