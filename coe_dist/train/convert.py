"""`coe-dist convert`: CoE layers to and from the CoE paper's reference layout (its DeepSeek-V2 `CoeMoE`).

    coe-dist convert export --checkpoint runs/tiny --output exported/tiny
        -> exported/tiny/model.safetensors  (model.layers.{i}.mlp.gate.{t}.weight, ...experts.{j}.gate_proj...)
           exported/tiny/config.json        (n_routed_experts, num_experts_per_tok, inner_iter, use_igate, ...)
    coe-dist train --config configs/tiny.yaml --set train.init_from=exported/tiny
        starts a run from those CoE weights (dense layers keep their fresh initialisation)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from coe_dist.config import ConfigError, MoEConfig, expand_path
from coe_dist.model import CoETransformer

PREFIX = "model.layers.{layer}.mlp."


def reference_config(moe: MoEConfig, hidden_size: int, num_layers: int, first_k_dense: int) -> dict:
    """The reference implementation's config.json field names for our MoE settings."""
    return {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "first_k_dense_replace": first_k_dense,
            "n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.top_k, "inner_iter": moe.iterations,
            "use_igate": moe.independent_gating, "inner_residual": moe.inner_residual,
            "outer_residual": moe.outer_residual, "n_shared_experts": moe.num_shared_experts,
            "moe_intermediate_size": moe.expert_hidden_size, "norm_topk_prob": moe.norm_topk_prob,
            "routed_scaling_factor": moe.routed_scaling_factor, "aux_loss_alpha": moe.aux_loss_coef,
            "seq_aux": moe.aux_loss_type == "seq", "scoring_func": "softmax", "topk_method": "greedy"}


def export_reference(model: CoETransformer, moe: MoEConfig, out_dir: Path) -> Path:
    """Write every CoE layer of a single-process (ep_size 1) model in the reference layout."""
    tensors: dict[str, torch.Tensor] = {}
    for layer in model.coe_layers():
        for name, t in layer.hf_state_dict().items():
            tensors[PREFIX.format(layer=layer.layer) + name] = t.contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    cfg = model.config
    (out_dir / "config.json").write_text(json.dumps(
        reference_config(moe, cfg.hidden_size, cfg.num_layers, cfg.first_k_dense), indent=2))
    return out_dir


def import_reference(model: CoETransformer, moe: MoEConfig, src: Path) -> int:
    """Load reference-layout CoE weights into a model (each rank keeps its own experts). Returns layers loaded."""
    src = Path(src)
    if not (src / "model.safetensors").is_file() or not (src / "config.json").is_file():
        raise FileNotFoundError(f"train.init_from={str(src)!r}: expected model.safetensors and config.json there "
                                "(made by `coe-dist convert export`)")
    ref = json.loads((src / "config.json").read_text())
    ours = reference_config(moe, model.config.hidden_size, model.config.num_layers, model.config.first_k_dense)
    for key in ("hidden_size", "n_routed_experts", "num_experts_per_tok", "inner_iter", "use_igate",
                "n_shared_experts", "moe_intermediate_size"):
        if key in ref and ref[key] != ours[key]:
            raise ConfigError(f"train.init_from={str(src)!r}: its {key}={ref[key]} but this config gives "
                              f"{ours[key]}; change the config to match the weights")
    tensors = load_file(str(src / "model.safetensors"))
    for layer in model.coe_layers():
        prefix = PREFIX.format(layer=layer.layer)
        layer.load_hf_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return len(model.coe_layers())


def _export(args: argparse.Namespace) -> int:
    from coe_dist.train.inference import load_model

    cfg, model, ckpt = load_model(args.checkpoint)
    out = export_reference(model, cfg.moe, Path(args.output))
    print(f"exported the CoE layers of {ckpt} to {out}/model.safetensors and {out}/config.json")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("convert", help="export/import CoE layers in the CoE paper's reference layout",
                       description="Export a checkpoint's CoE layers as safetensors + config.json with the "
                                   "reference implementation's names. Import them into a run with "
                                   "--set train.init_from=DIR.")
    conv = p.add_subparsers(dest="convert_command", metavar="ACTION", required=True)
    e = conv.add_parser("export", help="checkpoint -> reference layout")
    e.add_argument("--checkpoint", required=True, type=expand_path, help="checkpoint dir or run dir")
    e.add_argument("--output", required=True, type=expand_path, help="directory for model.safetensors and config.json")
    e.set_defaults(func=_export)
