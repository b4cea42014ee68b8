"""CoELayer against an independent float64 reference of COE_SPEC "The block".

The reference below is written from the spec alone: plain Python loops over tokens, iterations and experts,
its own softmax / top-k / SwiGLU / logsumexp, and the reference (HF `CoeMoE`) weight names. It shares no
code with `coe_dist.model`; the layer is only built, loaded with the test's weights through
`load_hf_state_dict`, and run. Outputs, the router loss and the gradients w.r.t. the input and every weight
must agree to a relative error below 1e-6 in float64.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from coe_dist.config import MoEConfig
from coe_dist.model.coe import CoELayer

N, D, F = 4, 16, 8  # routed experts, hidden, expert width
B, L = 2, 5  # sequences, sequence length
RTOL = 1e-6
F64 = torch.float64


# ----------------------------------------------------------------------------- reference (spec only)

def _softmax(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    m = max(v.item() for v in logits)
    ex = [torch.exp(v - m) for v in logits]
    total = sum(ex)
    return [e / total for e in ex]


def _logsumexp(logits: list[torch.Tensor]) -> torch.Tensor:
    m = max(v.item() for v in logits)
    return m + torch.log(sum(torch.exp(v - m) for v in logits))


def _silu(z: torch.Tensor) -> torch.Tensor:
    return z * torch.sigmoid(z)


def _swiglu(w: dict[str, torch.Tensor], prefix: str, z: torch.Tensor) -> torch.Tensor:
    """E(z) = W_down(silu(W_gate z) * (W_up z)) on one token vector z [d]."""
    gate = w[f"{prefix}.gate_proj.weight"] @ z
    up = w[f"{prefix}.up_proj.weight"] @ z
    return w[f"{prefix}.down_proj.weight"] @ (_silu(gate) * up)


def reference_block(cfg: MoEConfig, w: dict[str, torch.Tensor], u: torch.Tensor):
    """COE_SPEC's block on u [B, L, d]; returns (h_C [B, L, d], router loss, chosen experts per iteration).

    The layer returns h_C: the outer residual `+ x` is the decoder layer's business, so with
    inner_residual=false the value here is y_C."""
    Bn, Ln, d = u.shape
    n, k, s = cfg.num_experts, cfg.top_k, cfg.num_shared_experts
    h = [u[b, i] for b in range(Bn) for i in range(Ln)]  # token t = b*L + i
    T = len(h)
    loss = torch.zeros((), dtype=u.dtype)
    chosen_per_iter = []
    for t in range(cfg.iterations):
        gate_w = w[f"gate.{t}.weight"] if cfg.independent_gating else w["gate.weight"]
        probs, chosen, new_h = [], [], []
        z_sum = torch.zeros((), dtype=u.dtype)
        for tok in range(T):
            logits = [gate_w[e] @ h[tok] for e in range(n)]
            p = _softmax(logits)
            z_sum = z_sum + _logsumexp(logits) ** 2
            order = sorted(range(n), key=lambda e: -logits[e].item())
            top = order[:k]
            if k < n:  # random float64 weights: a near-tie would make the comparison meaningless
                scale = max(abs(v.item()) for v in logits)
                assert logits[order[k - 1]].item() - logits[order[k]].item() > 1e-9 * max(scale, 1.0)
            g = [p[e] for e in top]
            if k > 1 and cfg.norm_topk_prob:  # the reference: renormalise or scale, never both
                g_sum = sum(g)
                g = [gi / g_sum for gi in g]
            else:
                g = [gi * cfg.routed_scaling_factor for gi in g]
            y = torch.zeros(d, dtype=u.dtype)
            for gi, e in zip(g, top, strict=True):
                y = y + gi * _swiglu(w, f"experts.{e}", h[tok])
            if s:
                y = y + _swiglu(w, "shared_experts", h[tok])
            new_h.append(y + h[tok] if cfg.inner_residual else y)
            probs.append(p)
            chosen.append(top)
        # load balance: count_i = token copies routed to expert i
        if cfg.aux_loss_type == "seq":
            per_seq = []
            for b in range(Bn):
                toks = range(b * Ln, (b + 1) * Ln)
                total = torch.zeros((), dtype=u.dtype)
                for e in range(n):
                    count = sum(1 for tok in toks if e in chosen[tok])
                    f_i = count * n / (Ln * k)
                    P_i = sum(probs[tok][e] for tok in toks) / Ln
                    total = total + f_i * P_i
                per_seq.append(total)
            balance = sum(per_seq) / Bn
        else:  # global (Switch): over all T tokens
            balance = torch.zeros((), dtype=u.dtype)
            for e in range(n):
                count = sum(1 for tok in range(T) if e in chosen[tok])
                f_i = count * n / (T * k)
                P_i = sum(probs[tok][e] for tok in range(T)) / T
                balance = balance + f_i * P_i
        loss = loss + cfg.aux_loss_coef * balance + cfg.z_loss_coef * (z_sum / T)
        chosen_per_iter.append(chosen)
        h = new_h
    return torch.stack(h).view(Bn, Ln, d), loss, chosen_per_iter


# ----------------------------------------------------------------------------- helpers

def random_hf_weights(cfg: MoEConfig, seed: int) -> dict[str, torch.Tensor]:
    """Reference-layout float64 weights, scaled so that routing is decisive and experts matter."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64) * std

    w: dict[str, torch.Tensor] = {}
    if cfg.independent_gating:
        for t in range(cfg.iterations):
            w[f"gate.{t}.weight"] = randn(cfg.num_experts, D, std=0.3)
    else:
        w["gate.weight"] = randn(cfg.num_experts, D, std=0.3)
    f = cfg.expert_hidden_size
    for i in range(cfg.num_experts):
        w[f"experts.{i}.gate_proj.weight"] = randn(f, D, std=D**-0.5)
        w[f"experts.{i}.up_proj.weight"] = randn(f, D, std=D**-0.5)
        w[f"experts.{i}.down_proj.weight"] = randn(D, f, std=f**-0.5)
    if cfg.num_shared_experts:
        sf = cfg.num_shared_experts * f
        w["shared_experts.gate_proj.weight"] = randn(sf, D, std=D**-0.5)
        w["shared_experts.up_proj.weight"] = randn(sf, D, std=D**-0.5)
        w["shared_experts.down_proj.weight"] = randn(D, sf, std=sf**-0.5)
    return w


def hf_grads(layer: CoELayer, cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The layer's parameter gradients in the reference layout (by parameter name, so the test does not
    rely on the code under test for the mapping). Every parameter must be accounted for."""
    f = cfg.expert_hidden_size
    params = dict(layer.named_parameters())
    out: dict[str, torch.Tensor] = {}

    def grad(name: str) -> torch.Tensor:
        p = params.pop(name)
        return p.grad if p.grad is not None else torch.zeros_like(p)

    if cfg.independent_gating:
        for t in range(cfg.iterations):
            out[f"gate.{t}.weight"] = grad(f"routers.{t}.weight")
    else:
        out["gate.weight"] = grad("routers.0.weight")
    w13 = grad("experts.w_gate_up_E2FD")
    w2 = grad("experts.w_down_EDF")
    for i in range(cfg.num_experts):
        out[f"experts.{i}.gate_proj.weight"] = w13[i, :f]
        out[f"experts.{i}.up_proj.weight"] = w13[i, f:]
        out[f"experts.{i}.down_proj.weight"] = w2[i]
    if cfg.num_shared_experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"shared_experts.{name}.weight"] = grad(f"shared_experts.{name}.weight")
    assert not params, f"parameters the test does not know about: {sorted(params)}"
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-12) -> float:
    return float((actual - expected).norm() / max(float(expected.norm()), floor))


def run_case(cfg: MoEConfig, seed: int) -> None:
    weights = random_hf_weights(cfg, seed)
    layer = CoELayer(cfg, D, seed=seed + 1000).to(F64)
    layer.load_hf_state_dict(weights)
    sd = layer.hf_state_dict()
    assert sorted(sd) == sorted(weights)
    for name, value in weights.items():
        assert torch.equal(sd[name], value), name

    g = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(B, L, D, generator=g, dtype=F64)
    r_out = torch.randn(B, L, D, generator=g, dtype=F64)  # random cotangent for the output
    r_aux = 3.7  # and one for the router loss, so both gradient paths are checked separately

    # reference, autograd over float64 leaves built from the same weights
    ref_w = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    ref_u = u.clone().requires_grad_(True)
    ref_h, ref_aux, _ = reference_block(cfg, ref_w, ref_u)
    ref_leaves = [ref_u, *ref_w.values()]
    ref_g_out = torch.autograd.grad((ref_h * r_out).sum(), ref_leaves, retain_graph=True, allow_unused=True)
    ref_g_aux = torch.autograd.grad(ref_aux * r_aux, ref_leaves, allow_unused=True)

    # layer
    lay_u = u.clone().requires_grad_(True)
    h, aux = layer(lay_u)
    assert h.dtype == F64 and h.shape == (B, L, D)
    assert rel_err(h.detach(), ref_h.detach()) < RTOL
    assert abs(aux.item() - ref_aux.item()) <= RTOL * max(abs(ref_aux.item()), 1e-12)

    def layer_grads(loss: torch.Tensor, retain: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layer.zero_grad(set_to_none=True)
        lay_u.grad = None
        if loss.requires_grad:
            loss.backward(retain_graph=retain)
        gu = lay_u.grad if lay_u.grad is not None else torch.zeros_like(lay_u)
        return gu, hf_grads(layer, cfg)

    def check(ref_grads, loss, retain, what):
        gu, gw = layer_grads(loss, retain)
        ref = dict(zip(["input"] + list(ref_w), ref_grads, strict=True))
        ref = {k: (v if v is not None else torch.zeros_like(ref_u if k == "input" else ref_w[k]))
               for k, v in ref.items()}
        got = {"input": gu, **gw}
        assert sorted(got) == sorted(ref)
        total = math.sqrt(sum(float(v.norm()) ** 2 for v in ref.values()))
        # Some gradients are analytically zero (K=1 with norm_topk_prob: g = 1; K=N with the seq loss:
        # f_i = 1 and sum_i P_i = 1), leaving only rounding noise in both: those get an absolute tolerance
        # far below any real gradient.
        atol = 1e-12 * max(total, 1.0)
        for name in ref:
            diff = float((got[name] - ref[name]).norm())
            assert diff <= RTOL * float(ref[name].norm()) + atol, (
                f"{what}: gradient w.r.t. {name}: relative error {rel_err(got[name], ref[name]):.3g}")

    check(ref_g_out, (h * r_out).sum(), True, "output")
    check(ref_g_aux, aux * r_aux, False, "router loss")


# ----------------------------------------------------------------------------- the grid

# Hundreds of tiny float64 ops per case: intra-op threads only add overhead (3x on 2 cores).
pytestmark = pytest.mark.usefixtures("one_thread")


RESIDUALS = {"inner": (True, False), "outer": (False, True)}
GRID = list(itertools.product([1, 2, 3], [1, 2, N], [0, 1], [True, False], list(RESIDUALS), [False, True]))


@pytest.mark.parametrize(("C", "K", "S", "independent", "residual", "norm"), GRID,
                         ids=[f"C{c}-K{k}-S{s}-{'indep' if i else 'shared'}-{r}-{'norm' if n else 'raw'}"
                              for c, k, s, i, r, n in GRID])
def test_block_matches_reference(C, K, S, independent, residual, norm):
    inner, outer = RESIDUALS[residual]
    case = GRID.index((C, K, S, independent, residual, norm))
    rng = random.Random(case)  # the loss options vary pseudo-randomly over the grid (crossed fully below)
    cfg = MoEConfig(num_experts=N, top_k=K, iterations=C, num_shared_experts=S, expert_hidden_size=F,
                    inner_residual=inner, outer_residual=outer, independent_gating=independent,
                    norm_topk_prob=norm, routed_scaling_factor=rng.choice([1.0, 2.5]),
                    aux_loss_coef=0.01, aux_loss_type=rng.choice(["seq", "global"]),
                    z_loss_coef=rng.choice([0.0, 0.003]))
    run_case(cfg, seed=case)


# Router-loss forms crossed with the other options, with the block kept short.
LOSS_GRID = list(itertools.product(["seq", "global"], [0.0, 0.02], [0.0, 0.001], [1, 2, N], [1.0, 2.5]))


@pytest.mark.parametrize(("aux_type", "z_coef", "aux_coef", "K", "scale"), LOSS_GRID,
                         ids=[f"{a}-z{z}-aux{c}-K{k}-x{s}" for a, z, c, k, s in LOSS_GRID])
def test_router_losses_match_reference(aux_type, z_coef, aux_coef, K, scale):
    cfg = MoEConfig(num_experts=N, top_k=K, iterations=2, num_shared_experts=1, expert_hidden_size=F,
                    aux_loss_coef=aux_coef, aux_loss_type=aux_type, z_loss_coef=z_coef,
                    routed_scaling_factor=scale, norm_topk_prob=K == 2)
    run_case(cfg, seed=500 + LOSS_GRID.index((aux_type, z_coef, aux_coef, K, scale)))


def test_outer_residual_flag_does_not_change_layer_output():
    """With inner_residual on, outer_residual only adds x in the decoder layer: the layer's h_C is the same."""
    base = dict(num_experts=N, top_k=2, iterations=2, num_shared_experts=1, expert_hidden_size=F)
    weights = random_hf_weights(MoEConfig(**base), seed=7)
    u = torch.randn(B, L, D, generator=torch.Generator().manual_seed(8), dtype=F64)
    outs = []
    for outer in (False, True):
        layer = CoELayer(MoEConfig(**base, outer_residual=outer), D).to(F64)
        layer.load_hf_state_dict(weights)
        outs.append(layer(u)[0].detach())
    ref_h, _, _ = reference_block(MoEConfig(**base), weights, u)
    assert rel_err(outs[0], ref_h) < RTOL
    assert torch.equal(outs[0], outs[1])


def test_reference_sanity():
    """The reference itself: C=1, K=N, no shared expert, norm on, scale 1 gives u + sum_i s_i E_i(u),
    and the seq balance loss is then exactly alpha (f_i = 1, sum_i P_i = 1)."""
    cfg = MoEConfig(num_experts=N, top_k=N, iterations=1, num_shared_experts=0, expert_hidden_size=F,
                    norm_topk_prob=True, aux_loss_coef=0.25)
    w = random_hf_weights(cfg, seed=3)
    u = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(4), dtype=F64)
    h, aux, chosen = reference_block(cfg, w, u)
    assert math.isclose(float(aux), 0.25, rel_tol=1e-12)
    assert all(sorted(c) == list(range(N)) for c in chosen[0])
    for i in range(3):
        z = u[0, i]
        s = torch.softmax(w["gate.0.weight"] @ z, dim=0)
        expected = z.clone()
        for e in range(N):
            a = torch.nn.functional.silu(w[f"experts.{e}.gate_proj.weight"] @ z)
            expected += s[e] * (w[f"experts.{e}.down_proj.weight"] @ (a * (w[f"experts.{e}.up_proj.weight"] @ z)))
        assert rel_err(h[0, i], expected) < 1e-12


@pytest.mark.parametrize("C", [1, 2])
def test_grouped_float32_layer_matches_reference(C):
    """The production expert path (torch._grouped_mm: float64 is not a grouped dtype, so the grid above runs
    the loop path) in a float32 layer against the float64 reference on the same float32-rounded weights and
    input. Tolerance from float32's eps: per iteration a router GEMM, softmax, two expert GEMMs and the
    SwiGLU (5 roundings forward, twice that backward), reductions of at most D = 16 terms, over C iterations."""
    cfg = MoEConfig(num_experts=N, top_k=2, iterations=C, num_shared_experts=1, expert_hidden_size=F,
                    aux_loss_coef=0.01, z_loss_coef=0.003)
    weights = {k: v.float().double() for k, v in random_hf_weights(cfg, seed=900 + C).items()}
    layer = CoELayer(cfg, D)
    layer.load_hf_state_dict({k: v.float() for k, v in weights.items()})
    assert layer.experts.use_grouped_mm, "D and F multiples of 8 in float32: the grouped path must be taken"
    g = torch.Generator().manual_seed(901)
    u = torch.randn(B, L, D, generator=g).double()
    r_out = torch.randn(B, L, D, generator=g).double()

    ref_w = {k: v.clone().requires_grad_(True) for k, v in weights.items()}
    ref_u = u.clone().requires_grad_(True)
    ref_h, ref_aux, _ = reference_block(cfg, ref_w, ref_u)
    ((ref_h * r_out).sum() + ref_aux).backward()

    lay_u = u.float().requires_grad_(True)
    h, aux = layer(lay_u)
    ((h * r_out.float()).sum() + aux).backward()

    eps = torch.finfo(torch.float32).eps
    fwd_tol = C * 5 * (eps + math.sqrt(D) * eps)
    assert rel_err(h.detach().double(), ref_h.detach()) < fwd_tol
    assert abs(aux.item() - ref_aux.item()) < fwd_tol * abs(ref_aux.item())
    got = {"input": lay_u.grad, **hf_grads(layer, cfg)}
    ref = {"input": ref_u.grad, **{k: v.grad for k, v in ref_w.items()}}
    for name, expected in ref.items():
        expected = torch.zeros_like(ref_w.get(name, ref_u)) if expected is None else expected
        err = rel_err(got[name].double(), expected, floor=1e-30)
        assert err < 2 * fwd_tol, f"gradient w.r.t. {name}: relative error {err:.3g} >= {2 * fwd_tol:.3g}"
