"""`coe-dist convert import`: a Hugging Face MoE, a reference CoE or a coe-dist checkpoint -> a coe-dist checkpoint.

    DIR/config.json + DIR/*.safetensors  --(family table)-->  CoETransformer (ep_size 1)
        attention q, k, v -> one fused qkv_proj (biases, QK-norm, grouped-query heads as model.* keys)
        MoE router        -> each of the C routers (copies 2..C + optional noise so iterations can diverge)
        experts j         -> w_gate_up_E2FD[j] = [gate; up], w_down_EDF[j] = down; the same experts serve every
                             iteration, as in CoE
        shared expert     -> shared_experts (+ shared_expert_gate: Qwen2-MoE)
    -> OUT/checkpoints/step_0 (checkpoint.save: layout-independent, zero Adam moments), trained further with
       `coe-dist train --init-from OUT` at any ep size.

--from-checkpoint does the same to a coe-dist run (an MoE trained here, C = 1): every weight is kept, router t of
the new chain starts as the source's router min(t, C_src - 1) (+ the noise), and the new C and K are set.

At C = 1 the imported model computes the MoE itself: the decoder adds the block's output to the stream
(moe.outer_residual) and the chain has no inner residual. At C > 1 the inner residual is on, so iteration t
refines h_{t-1} (h_t = h_{t-1} + MoE_t(h_{t-1})) before the outer residual adds the stream.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from coe_dist.config import ConfigError, ModelConfig, MoEConfig, RunConfig, TrainConfig, config_from_dict
from coe_dist.model import CoETransformer
from coe_dist.train import checkpoint
from coe_dist.train.reference_layout import ATTENTION_NOTE, from_reference, read_safetensors_dir

MAX_SEQ_LEN = 4096  # RoPE tables are built for this many positions at most (they are per layer)


@dataclass(frozen=True)
class Family:
    """Where one Hugging Face MoE family keeps its block weights, relative to model.layers.{i}."""

    router: str
    expert: str  # with {j} and {proj}
    gate_up_down: tuple[str, str, str]
    num_experts_key: str
    expert_size_key: str
    shared: bool = False  # Qwen2-MoE's shared_expert + shared_expert_gate


FAMILIES = {
    "mixtral": Family("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{j}.{proj}.weight",
                      ("w1", "w3", "w2"), "num_local_experts", "intermediate_size"),
    "olmoe": Family("mlp.gate.weight", "mlp.experts.{j}.{proj}.weight", ("gate_proj", "up_proj", "down_proj"),
                    "num_experts", "intermediate_size"),
    "qwen2_moe": Family("mlp.gate.weight", "mlp.experts.{j}.{proj}.weight", ("gate_proj", "up_proj", "down_proj"),
                        "num_experts", "moe_intermediate_size", shared=True),
}


def _refuse(src: Path, key: str, value, why: str) -> ConfigError:
    return ConfigError(f"--from-hf {src}: config.json {key}={value!r}: {why}")


def hf_run_config(src: Path, hf: dict, iterations: int, top_k: int | None) -> RunConfig:
    """Our model and moe sections for a Hugging Face MoE config; refuses (one line) what does not map."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise _refuse(src, "model_type", family, f"supported MoE families: {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    checks = [("hidden_act", hf.get("hidden_act", "silu") == "silu", "only SwiGLU (silu) experts map"),
              ("rope_parameters", rope.get("rope_type", rope.get("type", "default")) == "default",
               "only plain RoPE maps (no scaling)"),
              ("head_dim", hf.get("head_dim") in (None, hidden // heads), "head_dim must be hidden_size/heads"),
              ("clip_qkv", hf.get("clip_qkv") is None, "q/k/v clipping does not map"),
              ("attention_bias", not (family == "olmoe" and hf.get("attention_bias")), "o_proj biases do not map"),
              ("use_sliding_window", not hf.get("use_sliding_window"), "sliding-window attention does not map"),
              ("decoder_sparse_step", hf.get("decoder_sparse_step", 1) == 1 and not hf.get("mlp_only_layers"),
               "every layer must be an MoE layer (dense layers in between do not map)")]
    for key, ok, why in checks:
        if not ok:
            raise _refuse(src, key, hf.get(key, rope), why)
    max_len = min(hf.get("max_position_embeddings", MAX_SEQ_LEN), MAX_SEQ_LEN)
    window = hf.get("sliding_window") if family == "mixtral" else None
    if window and window < max_len:
        raise _refuse(src, "sliding_window", window, f"attention windows shorter than {max_len} do not map")
    kv = hf.get("num_key_value_heads") or heads
    model = ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_hidden_layers"],
                        num_heads=heads, num_kv_heads=None if kv == heads else kv,
                        ffn_hidden_size=hf.get("intermediate_size", 4 * hidden), max_seq_len=max_len,
                        rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
                        qkv_bias=family == "qwen2_moe" and hf.get("qkv_bias", True), qk_norm=family == "olmoe",
                        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    moe = MoEConfig(num_experts=hf[fam.num_experts_key], top_k=top_k or hf["num_experts_per_tok"],
                    iterations=iterations, num_shared_experts=1 if fam.shared else 0,
                    expert_hidden_size=hf[fam.expert_size_key],
                    shared_expert_hidden_size=hf.get("shared_expert_intermediate_size") if fam.shared else None,
                    shared_expert_gate=fam.shared, inner_residual=iterations > 1, outer_residual=True,
                    independent_gating=True, norm_topk_prob=bool(hf.get("norm_topk_prob", family == "mixtral")),
                    # transformers renormalises the top-k gates at any K, K = 1 included (gate 1.0)
                    gate_scaling="renorm_then_scale",
                    aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)), aux_loss_type="global")
    return _run_config(model, moe)


def _run_config(model: ModelConfig, moe: MoEConfig) -> RunConfig:
    # Sequences no longer than the model allows; the rest of the run's settings come from `train --config`.
    train = {"seq_len": min(TrainConfig().seq_len, model.max_seq_len)}
    return config_from_dict({"model": dataclasses.asdict(model), "moe": dataclasses.asdict(moe), "train": train})


class _Source:
    """The tensors of a directory, handed out once each; what is never taken is reported as unexpected."""

    def __init__(self, src: Path) -> None:
        self.src = src
        self.tensors = read_safetensors_dir(src)
        self.taken: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ConfigError(f"--from-hf {self.src}: no tensor '{key}' in its *.safetensors (the config promises it)")
        self.taken.add(key)
        return self.tensors[key].float()

    def unexpected(self) -> list[str]:
        # Older checkpoints store RoPE's inverse frequencies; they are recomputed, not weights.
        return sorted(k for k in self.tensors if k not in self.taken and not k.endswith("rotary_emb.inv_freq"))


@torch.no_grad()
def _fill_from_hf(model: CoETransformer, fam: Family, w: _Source, noise: float, seed: int) -> None:
    model.embed.weight.copy_(w.take("model.embed_tokens.weight"))
    model.norm.weight.copy_(w.take("model.norm.weight"))
    if not model.config.tie_embeddings:
        model.lm_head.weight.copy_(w.take("lm_head.weight"))
    elif "lm_head.weight" in w.tensors:  # some tied checkpoints store the shared matrix twice
        w.take("lm_head.weight")
    gen = torch.Generator().manual_seed(seed)
    gate_name, up_name, down_name = fam.gate_up_down
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.attn_norm.weight.copy_(w.take(p + "input_layernorm.weight"))
        layer.ffn_norm.weight.copy_(w.take(p + "post_attention_layernorm.weight"))
        attn = layer.attn
        attn.qkv_proj.weight.copy_(torch.cat([w.take(f"{p}self_attn.{x}_proj.weight") for x in "qkv"]))
        if attn.qkv_proj.bias is not None:
            attn.qkv_proj.bias.copy_(torch.cat([w.take(f"{p}self_attn.{x}_proj.bias") for x in "qkv"]))
        attn.o_proj.weight.copy_(w.take(p + "self_attn.o_proj.weight"))
        if attn.q_norm is not None:
            attn.q_norm.weight.copy_(w.take(p + "self_attn.q_norm.weight"))
            attn.k_norm.weight.copy_(w.take(p + "self_attn.k_norm.weight"))
        block = layer.ffn
        router_W = w.take(p + fam.router)
        for t, router in enumerate(block.routers):
            jitter = torch.randn(router_W.shape, generator=gen) * (noise * router_W.std()) if t and noise else 0
            router.weight.copy_(router_W + jitter)
        for j in range(block.num_local_experts):
            proj = {name: w.take(p + fam.expert.format(j=j, proj=name)) for name in fam.gate_up_down}
            block.experts.w_gate_up_E2FD[j].copy_(torch.cat([proj[gate_name], proj[up_name]]))
            block.experts.w_down_EDF[j].copy_(proj[down_name])
        if fam.shared:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(block.shared_experts, name).weight.copy_(w.take(f"{p}mlp.shared_expert.{name}.weight"))
            block.shared_expert_gate.weight.copy_(w.take(p + "mlp.shared_expert_gate.weight"))


def _write(cfg: RunConfig, model: CoETransformer, out: Path, source: Path) -> Path:
    extra = {"config": cfg.to_dict(), "optimizer_step": 0, "imported_from": str(source)}
    return checkpoint.save(out, 0, model, None, extra, keep_last=1)


def _with_tokenizer(cfg: RunConfig, src: Path, out: Path) -> RunConfig:
    """The source's tokenizer.json, copied next to the checkpoint, becomes the run's data.tokenizer."""
    if not (src / "tokenizer.json").is_file():
        return cfg
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    tokenizer = str((out / "tokenizer.json").resolve())
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer))


def import_hf(src: Path, out: Path, *, iterations: int, top_k: int | None, router_noise: float = 0.0,
              seed: int = 0) -> tuple[Path, list[str]]:
    """Upcycle a Hugging Face MoE directory into a CoE-`iterations` checkpoint under `out`."""
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"--from-hf {src}: no config.json (expected a Hugging Face model directory)")
    if iterations < 1 or router_noise < 0:
        raise ConfigError(f"--iterations {iterations} --router-noise {router_noise}: need C >= 1 and noise >= 0")
    hf = json.loads((src / "config.json").read_text())
    cfg = _with_tokenizer(hf_run_config(src, hf, iterations, top_k), src, out)
    model = CoETransformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    weights = _Source(src)
    _fill_from_hf(model, FAMILIES[hf["model_type"]], weights, router_noise, seed)
    if weights.unexpected():
        raise ConfigError(f"--from-hf {src}: tensors that do not map: {weights.unexpected()[:8]}")
    notes = []
    if cfg.model.max_seq_len < hf.get("max_position_embeddings", 0):
        notes.append(f"model.max_seq_len={cfg.model.max_seq_len} (the source allows "
                     f"{hf['max_position_embeddings']}); raise it with --set model.max_seq_len=N when training")
    return _write(cfg, model, out, src), notes


def upcycle_checkpoint(src: Path, out: Path, *, iterations: int | None, top_k: int | None,
                       router_noise: float = 0.0, seed: int = 0) -> tuple[Path, list[str]]:
    """A coe-dist checkpoint (e.g. an MoE run, C = 1) -> a CoE-`iterations` checkpoint with `top_k` experts per
    iteration (None: the source's). Iterations beyond the source's copy its last router; the inner residual goes
    on when C > 1 (each iteration refines the last); the rest of the config is the source's."""
    if router_noise < 0:
        raise ConfigError(f"--router-noise {router_noise}: need noise >= 0 (a fraction of the router weights' std)")
    cfg, source, ckpt = checkpoint.load_model(src)
    iterations = iterations or cfg.moe.iterations
    moe = {**cfg.to_dict()["moe"], "iterations": iterations, "top_k": top_k or cfg.moe.top_k,
           "inner_residual": cfg.moe.inner_residual or iterations > 1}
    new_cfg = config_from_dict({**cfg.to_dict(), "moe": moe})
    model = CoETransformer(new_cfg.model, new_cfg.moe, seed=new_cfg.train.seed)
    model.load_state_dict(_chain_state(source.state_dict(), model.state_dict(), router_noise, seed))
    notes = [f"upcycled {ckpt} (C={cfg.moe.iterations}, K={cfg.moe.top_k}) to C={iterations}, "
             f"K={new_cfg.moe.top_k}; routers beyond the source's {cfg.moe.iterations} start as copies"
             + (f" with noise {router_noise} x their std" if router_noise else "")]
    return _write(new_cfg, model, out, ckpt), notes


_ROUTER_KEY = re.compile(r"^(.*\.routers\.)(\d+)(\..*)$")


def _chain_state(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], noise: float,
                 seed: int) -> dict[str, torch.Tensor]:
    """dst's keys filled from src: router t from the source's router min(t, last); everything else by name."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in dst:
        m = _ROUTER_KEY.match(key)
        if m is None:
            out[key] = src[key]
            continue
        prefix, t, rest = m.group(1), int(m.group(2)), m.group(3)
        last = max(int(_ROUTER_KEY.match(k).group(2)) for k in src if _ROUTER_KEY.match(k) and k.startswith(prefix))
        value = src[f"{prefix}{min(t, last)}{rest}"]
        if t > last and noise and rest == ".weight":
            value = value + torch.randn(value.shape, generator=gen) * (noise * value.std())
        out[key] = value
    return out


def reference_run_config(ref: dict) -> RunConfig:
    """Our sections for a reference CoE config.json (its 'residual': inner|outer|both, or the two flags)."""
    residual = ref.get("residual", "inner")
    model = ModelConfig(vocab_size=ref["vocab_size"], hidden_size=ref["hidden_size"],
                        num_layers=ref["num_hidden_layers"], num_heads=ref["num_attention_heads"],
                        ffn_hidden_size=ref["intermediate_size"], first_k_dense=ref.get("first_k_dense_replace", 0),
                        max_seq_len=min(ref.get("max_position_embeddings", MAX_SEQ_LEN), MAX_SEQ_LEN),
                        rope_theta=float(ref.get("rope_theta", 10000.0)), norm_eps=ref.get("rms_norm_eps", 1e-6),
                        tie_embeddings=bool(ref.get("tie_word_embeddings", False)))
    moe = MoEConfig(num_experts=ref["n_routed_experts"], top_k=ref["num_experts_per_tok"],
                    iterations=ref.get("inner_iter", 1), num_shared_experts=ref.get("n_shared_experts") or 0,
                    expert_hidden_size=ref["moe_intermediate_size"],
                    inner_residual=ref.get("inner_residual", residual in ("inner", "both")),
                    outer_residual=ref.get("outer_residual", residual in ("outer", "both")),
                    independent_gating=bool(ref.get("use_igate", False)),
                    norm_topk_prob=bool(ref.get("norm_topk_prob", False)),
                    routed_scaling_factor=float(ref.get("routed_scaling_factor", 1.0)),
                    aux_loss_coef=float(ref.get("aux_loss_alpha", 0.001)),
                    aux_loss_type="seq" if ref.get("seq_aux", True) else "global",
                    **_reference_groups(ref))
    if ref.get("moe_layer_freq", 1) != 1:
        raise ConfigError(f"--from-reference: config.json moe_layer_freq={ref['moe_layer_freq']}: only 1 maps "
                          "(every layer after first_k_dense_replace a CoE layer)")
    return _run_config(model, moe)


def import_reference_checkpoint(src: Path, out: Path) -> tuple[Path, list[str]]:
    """A reference CoE checkpoint -> coe-dist checkpoint: blocks, norms, embeddings, head; attention fresh."""
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"--from-reference {src}: no config.json")
    cfg = _with_tokenizer(reference_run_config(json.loads((src / "config.json").read_text())), src, out)
    model = CoETransformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    skipped = from_reference(model, read_safetensors_dir(src))
    notes = [f"{ATTENTION_NOTE}: its {len(skipped)} attention tensors are left out and coe-dist's attention "
             "starts from a fresh initialisation"]
    return _write(cfg, model, out, src), notes


def _reference_groups(ref: dict) -> dict:
    """The reference's topk_method: greedy, or group_limited_greedy over n_group groups (device-limited)."""
    method = ref.get("topk_method", "greedy")
    if method == "greedy":
        return {}
    if method != "group_limited_greedy":
        raise ConfigError(f"--from-reference: config.json topk_method={method!r}: only greedy and "
                          "group_limited_greedy map")
    return {"routing_groups": int(ref["n_group"]), "routing_group_topk": int(ref["topk_group"])}
