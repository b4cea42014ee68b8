"""One CoE layer against megatron-core's MoELayer at equal FLOPs, forward + backward on one GPU.

    .venv/bin/python benchmarks/megatron_layer.py [--config configs/paper/coe-2-4of64.yaml] [--out FILE]

CoE-C(K/N) with S shared experts (ours: CoELayer, bf16 autocast over float32 weights) against the MoE with the
same expert FFNs per token, C*(K+S) - S routed of N plus S shared (megatron-core MoELayer, bf16 weights,
alltoall token dispatcher, its grouped GEMM where the `grouped_gemm` package is installed, else its
SequentialMLP): T = micro_batch_size * seq_len tokens of the config, median of timed calls after warm-up.
megatron-core's MoELayer needs CUDA (it creates CUDA streams): without CUDA this says so, writes
{"cuda": false} and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from benchmarks.common import measure_on_cuda
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from common import measure_on_cuda

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _megatron_layer(d: int, n: int, k: int, f: int, s: int):
    """megatron-core's MoELayer (one GPU: tensor, pipeline and expert parallel size 1) and its expert path."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                             world_size=1)
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
        model_parallel_cuda_manual_seed(0)
    try:
        import grouped_gemm  # noqa: F401  (megatron's legacy GroupedMLP needs it)
        grouped = True
    except ImportError:
        grouped = False
    cfg = TransformerConfig(
        num_layers=1, hidden_size=d, num_attention_heads=8, num_moe_experts=n, moe_router_topk=k,
        moe_ffn_hidden_size=f, moe_shared_expert_intermediate_size=s * f if s else None,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=grouped, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, bf16=True, params_dtype=torch.bfloat16,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3)
    spec = get_moe_module_spec(use_te=False, num_experts=n, moe_grouped_gemm=grouped)
    return build_module(spec, config=cfg).cuda(), ("GroupedMLP" if grouped else "SequentialMLP")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(config: str, warmup: int, repeats: int) -> dict:
    from coe_dist.config import load_config
    from coe_dist.model.coe import CoELayer

    cfg = load_config(config)
    m, d = cfg.moe, cfg.model.hidden_size
    B, L = cfg.train.micro_batch_size, cfg.train.seq_len
    k_moe = m.iterations * (m.top_k + m.num_shared_experts) - m.num_shared_experts
    coe = CoELayer(dataclasses.replace(m, ep_size=1), d).cuda()
    u = torch.randn(B, L, d, device="cuda", requires_grad=True)

    def coe_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, aux = coe(u)
        (out.float().square().mean() + aux).backward()

    result = {"cuda": True, "gpu": torch.cuda.get_device_name(), "tokens": B * L, "hidden": d,
              "coe": f"CoE-{m.iterations}({m.top_k + m.num_shared_experts}/{m.num_experts + m.num_shared_experts})",
              "moe": f"MoE({k_moe + m.num_shared_experts}/{m.num_experts + m.num_shared_experts})"}
    result["coe_ms"] = _time(coe_step, warmup, repeats) * 1e3
    try:
        layer, experts = _megatron_layer(d, m.num_experts, k_moe, m.expert_hidden_size, m.num_shared_experts)
        x = torch.randn(L, B, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # megatron: [s, b, h]

        def megatron_step() -> None:
            out, _bias = layer(x)
            out.float().square().mean().backward()

        result["megatron_ms"] = _time(megatron_step, warmup, repeats) * 1e3
        result["megatron_experts"] = experts
        result["coe_over_megatron"] = result["coe_ms"] / result["megatron_ms"]
    except Exception as e:  # report, do not hide, a megatron-core API or CUDA failure
        result["megatron_error"] = f"{type(e).__name__}: {e}"
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "paper" / "coe-2-4of64.yaml"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "megatron_layer.json"))
    args = p.parse_args(argv)
    rc = measure_on_cuda("megatron_layer", args.out, lambda: run(args.config, args.warmup, args.repeats))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rc


if __name__ == "__main__":
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # megatron-core asks for it
    sys.exit(main())
