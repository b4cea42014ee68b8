"""Helpers shared by tests/test_expert_parallel.py (the parent) and tests/ep_worker.py (one process per rank).

A *case* is one CoE layer config + weights + global batch + (optionally) forced routing, run at one
expert-parallel size. The parent computes the single-process reference; the workers run the same case
under expert parallelism, each on its own slice of the batch, and write what they saw to a file.

Shape legend: B = sequences, L = sequence length, D = hidden, T = tokens, K = experts per token.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from coe_dist.config import MoEConfig
from coe_dist.model.coe import CoELayer
from coe_dist.model.router import Routing

DIRECTIONS = ("dispatch_fwd", "dispatch_bwd", "combine_fwd", "combine_bwd")


def build_layer(cfg: dict, hidden: int, ep_size: int, sd: dict | None = None, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> CoELayer:
    # init_std 0.1 (not 0.02): decisive routing, no near-ties that rounding could flip between layouts
    layer = CoELayer(MoEConfig(**cfg, ep_size=ep_size), hidden, seed=seed, init_std=0.1).to(dtype)
    if sd is not None:
        layer.load_hf_state_dict(sd)
    return layer


def force_routing(layer: CoELayer, tables: list[torch.Tensor]) -> None:
    """Make router t pick the experts `tables[t]` ([T, K] for the tokens this layer sees); the gate values
    are the router's own softmax probabilities of those experts, so routers still get gradients."""
    assert layer.config.independent_gating and len(tables) == len(layer.routers)
    for router, table in zip(layer.routers, tables, strict=True):
        def forward(self, h_TD, table=table):
            dtype = torch.promote_types(h_TD.dtype, torch.float32)
            logits_TN = F.linear(h_TD.to(dtype), self.weight.to(dtype))
            probs_TN = logits_TN.softmax(dim=-1)
            assert table.shape[0] == h_TD.shape[0], (table.shape, h_TD.shape)
            weights_TK = self.rule.apply(probs_TN.gather(1, table))
            return Routing(logits_TN, probs_TN, weights_TK, table)

        router.forward = types.MethodType(forward, router)


def record_router_calls(layer: CoELayer) -> list[dict]:
    """From now on, every router call of `layer` appends {iteration, h, bias, experts, weights} (detached
    copies; bias None without balancing) to the returned list."""
    calls: list[dict] = []
    for t, router in enumerate(layer.routers):
        def hook(module, args, out, t=t):
            bias = module.expert_bias
            calls.append({"router": t, "h": args[0].detach().clone(),
                          "bias": None if bias is None else bias.detach().clone(),
                          "experts": out.experts_TK.clone(), "weights": out.weights_TK.detach().clone()})
        router.register_forward_hook(hook)
    return calls


def grads_by_name(layer: CoELayer) -> dict[str, torch.Tensor]:
    """Parameter gradients under the reference (`hf_state_dict`) names; a missing grad counts as zero."""
    def grad(p: torch.Tensor) -> torch.Tensor:
        return p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)

    f = layer.config.expert_hidden_size
    out: dict[str, torch.Tensor] = {}
    if layer.config.independent_gating:
        for t, router in enumerate(layer.routers):
            out[f"gate.{t}.weight"] = grad(router.weight)
    else:
        out["gate.weight"] = grad(layer.routers[0].weight)
    w13, w2 = grad(layer.experts.w_gate_up_E2FD), grad(layer.experts.w_down_EDF)
    for e in range(layer.num_local_experts):
        i = layer.first_expert + e
        out[f"experts.{i}.gate_proj.weight"] = w13[e, :f]
        out[f"experts.{i}.up_proj.weight"] = w13[e, f:]
        out[f"experts.{i}.down_proj.weight"] = w2[e]
    if layer.shared_experts is not None:
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"shared_experts.{name}.weight"] = grad(getattr(layer.shared_experts, name).weight)
    return out


def run_layer(layer: CoELayer, u_BLD: torch.Tensor, gout_BLD: torch.Tensor, aux_scale: float,
              input_requires_grad: bool = True) -> dict:
    """Forward + backward of loss = sum(out * gout) + aux_scale * aux (a sum over tokens, so gradients of
    slices add up). Returns outputs, aux, input and weight gradients."""
    layer.zero_grad(set_to_none=True)
    u = u_BLD.clone().requires_grad_(input_requires_grad)
    out, aux = layer(u)
    ((out * gout_BLD).sum() + aux_scale * aux).backward()
    return {
        "out": out.detach().clone(),
        "aux": aux.detach().clone(),
        "u_grad": u.grad.clone() if input_requires_grad else None,
        "grads": grads_by_name(layer),
    }


# ---------------------------------------------------------------- launching ranks

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, cases: list[dict], work_dir, *, timeout_s: float, pg_timeout_s: float = 120,
           final_barrier: bool = True) -> list[dict]:
    """Run `cases` in `world` worker processes (one gloo group); return each rank's results.
    Raises TimeoutError (after killing the workers) when they do not finish within `timeout_s`, and
    RuntimeError with the failed workers' output when one fails. A port taken between `free_port()`
    and the rendezvous is retried once with another."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = work_dir / "spec.pt"
    torch.save({"cases": cases, "pg_timeout_s": pg_timeout_s, "final_barrier": final_barrier}, spec)
    for attempt in range(2):
        try:
            return _launch_once(world, spec, work_dir, timeout_s)
        except RuntimeError as e:
            if attempt or "address already in use" not in str(e).lower():
                raise
    raise AssertionError("unreachable")


def _launch_once(world: int, spec: Path, work_dir: Path, timeout_s: float) -> list[dict]:
    here = Path(__file__).resolve().parent
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    procs, logs = [], []

    def tail(rank: int) -> str:
        return (work_dir / f"rank{rank}.log").read_text(errors="replace")[-3000:]

    def failure() -> RuntimeError:
        grace = time.monotonic() + 3  # let the peers of a failed rank fail too: their logs say more
        while any(p.poll() is None for p in procs) and time.monotonic() < grace:
            time.sleep(0.05)
        return RuntimeError("\n".join(f"rank {r} exited with {p.returncode}:\n{tail(r)}"
                                      for r, p in enumerate(procs) if p.returncode not in (None, 0)))

    try:
        for rank in range(world):
            logs.append(open(work_dir / f"rank{rank}.log", "wb"))  # closed in the finally below
            procs.append(subprocess.Popen([sys.executable, str(here / "ep_worker.py"), str(spec), str(work_dir)],
                                          env=dict(env, RANK=str(rank)), stdout=logs[-1],
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                raise failure()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout_s} s; rank 0 log:\n{tail(0)}")
            time.sleep(0.05)
        if any(p.returncode != 0 for p in procs):
            raise failure()
    finally:
        for p in procs:  # only the workers started here
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    return [torch.load(work_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
