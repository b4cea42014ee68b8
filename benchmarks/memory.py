"""Memory of a training step: activations with and without per-iteration recomputation, and parameter +
optimizer memory of CoE-2(4/48) against MoE(8/64).

    .venv/bin/python benchmarks/memory.py [--tokens 2048] [--out benchmarks/results/memory.json]

Each setting runs in a fresh process (peak RSS is a high-water mark): build a 4-layer d=512, f=352 model
(bf16 autocast, fp32 weights), take one AdamW step to create the optimizer state, then measure the peak
RSS of one more forward + backward + step. "activation peak" = that peak minus the RSS before it.
Parameter + optimizer bytes are counted at 16 B per parameter (fp32 weight, gradient, two Adam moments),
for this model and for the paper's configs (configs/paper/).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: (iterations, top_k, routed experts), 1 shared expert each: 8 expert FFNs per token
    "CoE-2(4/64)": (2, 3, 64),
    "MoE(8/64)": (1, 7, 64),
    "CoE-2(4/48)": (2, 3, 48),
}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def child(name: str, recompute: bool, tokens: int) -> dict:
    import torch

    from coe_dist.config import ModelConfig, MoEConfig
    from coe_dist.model import CoETransformer

    torch.manual_seed(0)
    C, K, N = SETTINGS[name]
    seq = 512
    model = CoETransformer(ModelConfig(vocab_size=512, hidden_size=512, num_layers=4, num_heads=8, max_seq_len=seq),
                           MoEConfig(num_experts=N, top_k=K, iterations=C, num_shared_experts=1,
                                     expert_hidden_size=352, recompute=recompute))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 512, (tokens // seq, seq + 1))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch[:, :-1], batch[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()  # optimizer state and gradients now exist
    before = _rss_mib()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    return {"setting": name, "recompute": recompute, "rss_before_mib": before, "peak_rss_mib": peak,
            "activation_peak_mib": peak - before, "params": params}


def paper_param_bytes() -> dict[str, dict]:
    """Parameter + optimizer bytes of the paper configs, counted from the config (16 B per parameter)."""
    from coe_dist.config import load_config

    out = {}
    for name in ("coe-2-4of64", "moe-8of64", "coe-2-4of48"):
        cfg = load_config(ROOT / "configs" / "paper" / f"{name}.yaml")
        m, e = cfg.model, cfg.moe
        d, f = m.hidden_size, e.expert_hidden_size
        routers = (e.iterations if e.independent_gating else 1) * e.num_experts * d
        experts = e.num_experts * 3 * d * f + e.num_shared_experts * 3 * d * f
        per_layer = 4 * d * d + 2 * d + routers + experts  # attention (qkv + out), two norms, CoE block
        params = 2 * m.vocab_size * d + d + m.num_layers * per_layer
        out[name] = {"params": params, "param_optimizer_gib": params * 16 / 2**30}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.tokens)))
        return 0
    rows = []
    for name in SETTINGS:
        for recompute in (False, True):
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", name,
                                  str(int(recompute))], capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    paper = paper_param_bytes()
    print(f"{'setting':<14}{'recompute':>10}{'params':>12}{'RSS before':>12}{'peak RSS':>10}{'activations':>13}")
    for r in rows:
        print(f"{r['setting']:<14}{str(r['recompute']):>10}{r['params']:>12,}{r['rss_before_mib']:>11.0f}M"
              f"{r['peak_rss_mib']:>9.0f}M{r['activation_peak_mib']:>12.0f}M")
    print("\nparameter + optimizer memory of the paper configs (16 B/param):")
    for name, v in paper.items():
        print(f"  {name:<14}{v['params']:>14,} params {v['param_optimizer_gib']:>8.2f} GiB")
    saving = 1 - paper["coe-2-4of48"]["params"] / paper["moe-8of64"]["params"]
    print(f"  CoE-2(4/48) vs MoE(8/64): {saving:.1%} less")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "rows": rows, "paper": paper,
                                          "coe48_vs_moe64_saving": saving}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
