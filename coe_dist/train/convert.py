"""`coe-dist convert`: models out of and into coe-dist (docs/models.md).

    coe-dist convert export --checkpoint runs/tiny --output hf/tiny --format hf         # transformers, remote code
    coe-dist convert export --checkpoint runs/tiny --output ref/tiny --format reference  # the CoE paper's layout
    coe-dist convert import --from-hf mixtral-dir --iterations 2 --output runs/upcycled  # MoE -> CoE checkpoint
    coe-dist convert import --from-reference coe-dir --output runs/from-ref
    coe-dist convert import --from-checkpoint runs/moe --iterations 2 --top-k 4 --output runs/coe-from-moe
    coe-dist train --config configs/tiny.yaml --init-from runs/upcycled                  # a new run from it

Each module does one direction: hf_export (hf), reference_layout (reference), upcycle (import).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coe_dist.argtypes import positive_int
from coe_dist.config import expand_path
from coe_dist.train.checkpoint import load_model


def _export(args: argparse.Namespace) -> int:
    cfg, model, ckpt = load_model(args.checkpoint)
    out = Path(args.output)
    if args.format == "hf":
        from coe_dist.train.hf_export import export_hf

        notes = export_hf(cfg, model, out)
    else:
        from safetensors.torch import save_file

        from coe_dist.train.reference_layout import reference_config, to_reference, unmapped

        out.mkdir(parents=True, exist_ok=True)
        save_file(to_reference(model), str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(reference_config(cfg.moe, cfg.model), indent=2))
        notes = ["not exported: " + "; ".join(unmapped(model))]
    print(f"exported {ckpt} to {out} ({args.format} format)")
    for note in notes:
        print(f"note: {note}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from coe_dist.train import upcycle

    if args.from_hf:
        out, notes = upcycle.import_hf(Path(args.from_hf), Path(args.output), iterations=args.iterations or 1,
                                       top_k=args.top_k, router_noise=args.router_noise, seed=args.seed)
    elif args.from_checkpoint:
        out, notes = upcycle.upcycle_checkpoint(Path(args.from_checkpoint), Path(args.output),
                                                iterations=args.iterations, top_k=args.top_k,
                                                router_noise=args.router_noise, seed=args.seed)
    else:
        out, notes = upcycle.import_reference_checkpoint(Path(args.from_reference), Path(args.output))
    print(f"wrote coe-dist checkpoint {out}; start a run from it with coe-dist train --init-from {args.output}")
    for note in notes:
        print(f"note: {note}")
    return 0


def register_cli(sub) -> None:
    p = sub.add_parser("convert", help="export to Hugging Face / the CoE reference layout; import MoE checkpoints",
                       description="Export a checkpoint for transformers (--format hf) or in the CoE paper's "
                                   "reference layout; import a Hugging Face MoE (Mixtral, OLMoE, Qwen2-MoE) or a "
                                   "reference CoE checkpoint as a coe-dist checkpoint (docs/models.md).")
    conv = p.add_subparsers(dest="convert_command", metavar="ACTION", required=True)
    e = conv.add_parser("export", help="checkpoint -> Hugging Face or reference directory")
    e.add_argument("--checkpoint", required=True, type=expand_path, help="checkpoint dir or run dir")
    e.add_argument("--output", required=True, type=expand_path, help="directory to write")
    e.add_argument("--format", choices=("hf", "reference"), default="reference",
                   help="hf: loads with transformers' AutoModelForCausalLM (trust_remote_code); reference: the "
                        "CoE paper's CoeForCausalLM names (attention does not map)")
    e.set_defaults(func=_export)
    i = conv.add_parser("import", help="Hugging Face MoE, reference CoE or coe-dist checkpoint -> CoE checkpoint")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", type=expand_path,
                     help="Hugging Face MoE directory (config.json + *.safetensors): mixtral, olmoe or qwen2_moe")
    src.add_argument("--from-reference", metavar="DIR", type=expand_path, help="a CoE reference checkpoint directory")
    src.add_argument("--from-checkpoint", metavar="DIR", type=expand_path,
                     help="a coe-dist run or checkpoint (e.g. an MoE run) to upcycle to --iterations/--top-k")
    i.add_argument("--output", required=True, type=expand_path, help="run directory to write (checkpoints/step_0)")
    i.add_argument("--iterations", type=positive_int, default=None, help="--from-hf/--from-checkpoint: CoE iterations "
                   "C (the MoE router is copied into each of the C routers; default: the source's, 1 for an MoE)")
    i.add_argument("--top-k", type=positive_int, default=None,
                   help="--from-hf/--from-checkpoint: experts per token and iteration (default: the source's)")
    i.add_argument("--router-noise", type=float, default=0.0,
                   help="--from-hf/--from-checkpoint: Gaussian noise added to router copies 2..C, as a fraction of "
                        "the router weights' std, so iterations can diverge (default 0)")
    i.add_argument("--seed", type=int, default=0, help="--from-hf/--from-checkpoint: seed of the router noise")
    i.set_defaults(func=_import)
