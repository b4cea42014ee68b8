"""`coe-dist eval` and `coe-dist generate`: look at a trained checkpoint in one process.

Checkpoints do not depend on the expert-parallel layout, so a model trained at ep 2 (or 8) loads here
with all experts local (ep_size 1).

    coe-dist eval --checkpoint runs/tiny                      # newest good checkpoint of a run
    coe-dist generate --checkpoint runs/tiny/checkpoints/step_150 --prompt "Tom has 3 apples"
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from coe_dist.argtypes import positive_int
from coe_dist.config import ConfigError, expand_path
from coe_dist.model import CoETransformer
from coe_dist.train.checkpoint import load_model


def _eval(args: argparse.Namespace) -> int:
    from coe_dist.data.loader import build_data
    from coe_dist.train.loop import evaluate

    cfg, model, ckpt = load_model(args.checkpoint, args.overrides)
    data = build_data(cfg, dp_rank=0, dp_size=1)
    batches = data.valid_batches(args.batches or cfg.log.eval_batches or 4)
    loss = evaluate(cfg, model, batches, torch.device("cpu"), 1)
    result = {"checkpoint": str(ckpt), "valid_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
              "batches": len(batches)}
    print(json.dumps(result) if args.json else
          f"{ckpt}: validation loss {loss:.4f}, perplexity {result['perplexity']:.2f} ({len(batches)} batches)")
    return 0


@torch.no_grad()
def greedy(model: CoETransformer, ids: list[int], max_new_tokens: int, eod: int | None) -> list[int]:
    """Greedy decoding without a KV cache (the models here are small; clarity over speed)."""
    out = list(ids)
    window = model.config.max_seq_len
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([out[-window:]])).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt == eod:
            break
        out.append(nxt)
    return out[len(ids):]


def _generate(args: argparse.Namespace) -> int:
    from coe_dist.data.tokenizer import load_tokenizer

    if not args.prompt:
        raise ConfigError("--prompt '': empty; give the text to continue, e.g. --prompt \"Tom has 3 apples\"")
    cfg, model, ckpt = load_model(args.checkpoint, args.overrides)
    tok = load_tokenizer(cfg.data.tokenizer)
    ids = tok.encode(args.prompt)
    if not ids:
        raise ConfigError(f"--prompt {args.prompt!r} encodes to no tokens with {cfg.data.tokenizer}: give some text")
    new = greedy(model, ids, args.max_new_tokens, tok.eod)
    print(args.prompt + tok.decode(new))
    return 0


def register_cli(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, type=expand_path,
                        help="checkpoint dir (…/checkpoints/step_N) or run dir (uses its newest good checkpoint)")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the saved config, e.g. --set data.dataset=PREFIX")
    p = sub.add_parser("eval", parents=[common], help="validation loss and perplexity of a checkpoint",
                       description="Validation loss and perplexity of a checkpoint on its held-out set, one process.")
    p.add_argument("--batches", type=positive_int, help="held-out batches (default: the run's log.eval_batches)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_eval)
    g = sub.add_parser("generate", parents=[common], help="greedy continuation of a prompt",
                       description="Greedy decoding from a checkpoint: a sanity look at what it learned.")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.set_defaults(func=_generate)
