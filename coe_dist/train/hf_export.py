"""`coe-dist convert export --format hf`: a directory that transformers loads with trust_remote_code.

    checkpoint -> CoETransformer (ep_size 1) -> OUT/model.safetensors   every weight, Hugging Face names
                                             -> OUT/config.json          model_type coe_dist, architectures, auto_map
                                             -> OUT/configuration_coe_dist.py, modeling_coe_dist.py  (hf_modeling/)
                                             -> OUT/tokenizer.json, tokenizer_config.json  (when data.tokenizer is one)

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)

Names: ours with `model.` in front (embed -> model.embed_tokens), lm_head as is; the modeling file keeps our
module layout, so the map is one line (`hf_name`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from coe_dist.config import RunConfig
from coe_dist.model import CoETransformer

MODELING_DIR = Path(__file__).with_name("hf_modeling")
MODELING_FILES = ("configuration_coe_dist.py", "modeling_coe_dist.py")


def hf_name(name: str) -> str:
    """Our parameter name -> its name in CoeDistForCausalLM."""
    if name.startswith("lm_head."):
        return name
    return "model." + ("embed_tokens." + name[len("embed."):] if name.startswith("embed.") else name)


def hf_config(cfg: RunConfig, eod: int | None) -> dict:
    m, moe = cfg.model, cfg.moe
    return {"model_type": "coe_dist", "architectures": ["CoeDistForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_coe_dist.CoeDistConfig",
                         "AutoModel": "modeling_coe_dist.CoeDistModel",
                         "AutoModelForCausalLM": "modeling_coe_dist.CoeDistForCausalLM"},
            "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads or m.num_heads,
            "intermediate_size": m.ffn_hidden_size, "first_k_dense_replace": m.first_k_dense,
            "max_position_embeddings": m.max_seq_len, "rope_theta": m.rope_theta, "rms_norm_eps": m.norm_eps,
            "qkv_bias": m.qkv_bias, "qk_norm": m.qk_norm, "tie_word_embeddings": m.tie_embeddings,
            "n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "inner_iter": moe.iterations,
            "n_shared_experts": moe.num_shared_experts, "moe_intermediate_size": moe.expert_hidden_size,
            "shared_expert_intermediate_size": moe.shared_expert_hidden_size,
            "shared_expert_gate": moe.shared_expert_gate, "inner_residual": moe.inner_residual,
            "outer_residual": moe.outer_residual, "use_igate": moe.independent_gating,
            "norm_topk_prob": moe.norm_topk_prob, "routed_scaling_factor": moe.routed_scaling_factor,
            "gate_scaling": moe.gate_scaling, "scoring_func": moe.router_score,
            "expert_bias": moe.expert_bias_rate > 0, "n_group": moe.routing_groups,
            "topk_group": moe.routing_group_topk,
            "eos_token_id": eod, "use_cache": False, "torch_dtype": "float32"}


def export_hf(cfg: RunConfig, model: CoETransformer, out_dir: Path) -> list[str]:
    """Write the directory; returns notes for the user (one line each), e.g. a dropped capacity factor."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").unlink(missing_ok=True)  # an older export's config must not bless new files
    # Parameters and the routers' expert biases (buffers: aux-loss-free balancing chose experts with them).
    tensors = {hf_name(name): t.detach().contiguous() for name, t in model.state_dict(keep_vars=True).items()
               if name in dict(model.named_parameters()) or name.endswith(".expert_bias")}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    eod = None
    if cfg.data.tokenizer != "byte":
        eod = _copy_tokenizer(Path(cfg.data.tokenizer), out_dir)
    else:
        from coe_dist.data.tokenizer import ByteTokenizer

        eod = ByteTokenizer.eod
    for name in MODELING_FILES:
        shutil.copyfile(MODELING_DIR / name, out_dir / name)
    # Last: a directory an interrupted export left behind has no config.json, so transformers refuses it.
    tmp = out_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(hf_config(cfg, eod), indent=2))
    tmp.replace(out_dir / "config.json")
    notes = []
    if cfg.moe.capacity_factor is not None:
        notes.append(f"moe.capacity_factor={cfg.moe.capacity_factor}: the exported model routes dropless; its "
                     "outputs differ where this run dropped token copies")
    if cfg.data.tokenizer == "byte":
        notes.append("data.tokenizer=byte: no tokenizer files (ids are UTF-8 bytes, end of document = 256)")
    return notes


def _copy_tokenizer(path: Path, out_dir: Path) -> int | None:
    """tokenizer.json plus the small tokenizer_config.json that AutoTokenizer needs; returns the eod id."""
    from coe_dist.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(path))
    shutil.copyfile(path, out_dir / "tokenizer.json")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return tok.eod
