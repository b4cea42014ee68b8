"""The CoE paper's reference layout (its DeepSeek-V2 `CoeForCausalLM`): our weights under its names, and back.

    ours                              reference
    embed.weight                      model.embed_tokens.weight
    layers.{i}.attn_norm.weight       model.layers.{i}.input_layernorm.weight
    layers.{i}.ffn_norm.weight        model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.ffn (CoE block)        model.layers.{i}.mlp.{gate.{t} | gate, experts.{j}.*, shared_experts.*}
    layers.{i}.ffn (dense SwiGLU)     model.layers.{i}.mlp.{gate,up,down}_proj.weight
    norm.weight, lm_head.weight       model.norm.weight, lm_head.weight
    layers.{i}.attn.*                 no counterpart: the reference uses multi-head latent attention

`train.init_from=DIR` loads only the CoE blocks of such a directory into a fresh model (the original
exchange format); `coe-dist convert import --from-reference` builds a whole checkpoint from one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from coe_dist.config import ConfigError, ModelConfig, MoEConfig
from coe_dist.model import CoETransformer

PREFIX = "model.layers.{layer}.mlp."
ATTENTION_NOTE = ("attention does not map: the reference uses multi-head latent attention (q_proj, "
                  "kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj), coe-dist plain multi-head attention")


def reference_config(moe: MoEConfig, model: ModelConfig) -> dict:
    """A config.json for the reference `CoeForCausalLM` with this run's own sizes."""
    head_dim = model.hidden_size // model.num_heads
    return {"model_type": "coe_deepseekv2", "architectures": ["CoeForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_coe.CoeConfig", "AutoModel": "modeling_coe.CoeModel",
                         "AutoModelForCausalLM": "modeling_coe.CoeForCausalLM"},
            "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
            "intermediate_size": model.ffn_hidden_size, "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_heads, "num_key_value_heads": model.num_heads,
            "max_position_embeddings": model.max_seq_len, "rope_theta": model.rope_theta, "rope_scaling": None,
            "rms_norm_eps": model.norm_eps, "tie_word_embeddings": model.tie_embeddings, "hidden_act": "silu",
            # Multi-head latent attention sizes from our head size (its weights are not ours; see ATTENTION_NOTE).
            "q_lora_rank": None, "kv_lora_rank": model.hidden_size, "qk_nope_head_dim": head_dim // 2,
            "qk_rope_head_dim": head_dim // 2, "v_head_dim": head_dim, "attention_bias": False,
            "first_k_dense_replace": model.first_k_dense, "moe_layer_freq": 1,
            "n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "inner_iter": moe.iterations,
            "use_igate": moe.independent_gating, "inner_residual": moe.inner_residual,
            "outer_residual": moe.outer_residual, "n_shared_experts": moe.num_shared_experts or None,
            "moe_intermediate_size": moe.expert_hidden_size, "norm_topk_prob": moe.norm_topk_prob,
            "routed_scaling_factor": moe.routed_scaling_factor, "aux_loss_alpha": moe.aux_loss_coef,
            "seq_aux": moe.aux_loss_type == "seq", "scoring_func": "softmax",
            "topk_method": "group_limited_greedy" if moe.routing_groups > 1 else "greedy",
            "n_group": moe.routing_groups, "topk_group": moe.routing_group_topk, "ep_size": 1}


def unmapped(model: CoETransformer) -> list[str]:
    """What of this model has no place in the reference layout (attention always; some imported extras)."""
    moe = model.coe_layers()[0].config if model.coe_layers() else None
    notes = [ATTENTION_NOTE]
    if moe is not None and moe.shared_expert_gate:
        notes.append("moe.shared_expert_gate has no reference counterpart")
    if moe is not None and moe.shared_expert_hidden_size not in (None, moe.num_shared_experts * moe.expert_hidden_size):
        notes.append(f"moe.shared_expert_hidden_size={moe.shared_expert_hidden_size} is not "
                     "n_shared_experts * moe_intermediate_size")
    if moe is not None and moe.router_score != "softmax":
        notes.append(f"moe.router_score={moe.router_score}: the reference scores with softmax")
    if moe is not None and moe.expert_bias_rate > 0:
        notes.append("the routers' expert biases (moe.expert_bias_rate) do not map: the reference chooses experts "
                     "without them, so its routing differs (the hf format keeps them)")
    if moe is not None and moe.gate_scaling != "reference" and moe.norm_topk_prob and (
            moe.top_k == 1 or moe.routed_scaling_factor != 1):
        notes.append("moe.gate_scaling=renorm_then_scale: the reference renormalises only when K > 1 and then "
                     "does not scale, so its gates differ")
    return notes


def to_reference(model: CoETransformer) -> dict[str, torch.Tensor]:
    """Every weight that has a reference name (ep_size 1 model), under that name."""
    out = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = layer.attn_norm.weight
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = layer.ffn_norm.weight
        mlp = layer.ffn.hf_state_dict() if not layer.dense else {
            f"{name}.weight": getattr(layer.ffn, name).weight for name in ("gate_proj", "up_proj", "down_proj")}
        out.update({PREFIX.format(layer=i) + name: t for name, t in mlp.items()})
    return {name: t.detach().contiguous().clone() for name, t in out.items()}


@torch.no_grad()
def from_reference(model: CoETransformer, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Load every reference-named weight into `model` (strict: a missing or unexpected non-attention key raises
    StateDictMismatch / CheckpointError naming it). Returns the reference keys left out (its attention)."""
    ours = to_reference(model)
    params = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
              "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        params[f"model.layers.{i}.input_layernorm.weight"] = layer.attn_norm.weight
        params[f"model.layers.{i}.post_attention_layernorm.weight"] = layer.ffn_norm.weight
        prefix = PREFIX.format(layer=i)
        block = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if layer.dense:
            for name in ("gate_proj", "up_proj", "down_proj"):
                params[f"{prefix}{name}.weight"] = getattr(layer.ffn, name).weight
        else:
            layer.ffn.load_hf_state_dict(block)
    attention = sorted(k for k in tensors if ".self_attn." in k)
    missing = sorted(k for k in params if k not in tensors)
    extra = sorted(k for k in tensors if k not in ours and k not in attention)
    if missing or extra:
        raise ConfigError(f"reference weights do not fit this model: missing {missing or 'none'}, "
                          f"unexpected {extra or 'none'}")
    for name, dest in params.items():
        if tensors[name].shape != dest.shape:
            raise ConfigError(f"reference weight {name} has shape {list(tensors[name].shape)}, "
                              f"expected {list(dest.shape)}")
        dest.copy_(tensors[name])
    return attention


def read_safetensors_dir(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files of a Hugging Face directory (one file or shards)."""
    files = sorted(Path(src).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def import_reference(model: CoETransformer, moe: MoEConfig, src: Path) -> int:
    """`train.init_from`: the CoE blocks of a reference-layout directory (each rank keeps its own experts).
    Returns the number of layers loaded."""
    src = Path(src)
    if not (src / "config.json").is_file() or not list(src.glob("*.safetensors")):
        raise FileNotFoundError(f"train.init_from={str(src)!r}: expected *.safetensors and config.json there "
                                "(made by `coe-dist convert export --format reference`) or a coe-dist checkpoint")
    ref = json.loads((src / "config.json").read_text())
    ours = reference_config(moe, model.config)
    for key in ("hidden_size", "n_routed_experts", "num_experts_per_tok", "inner_iter", "use_igate",
                "n_shared_experts", "moe_intermediate_size"):
        if key in ref and (ref[key] or 0) != (ours[key] or 0):  # n_shared_experts: null and 0 both mean none
            raise ConfigError(f"train.init_from={str(src)!r}: its {key}={ref[key]} but this config gives "
                              f"{ours[key]}; change the config to match the weights")
    tensors = read_safetensors_dir(src)
    for layer in model.coe_layers():
        prefix = PREFIX.format(layer=layer.layer)
        layer.load_hf_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return len(model.coe_layers())
