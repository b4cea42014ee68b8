"""CoELayer mechanics: reference-layout weight loading, grouped vs loop experts, capacity dropping, bf16.

Expected values are computed here, independently of the code under test (float64 SwiGLU on the weights
read through `hf_state_dict()`, hand-counted capacity drops), never taken from earlier runs of the code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from coe_dist.config import MoEConfig
from coe_dist.model.coe import CoELayer
from coe_dist.model.experts import GroupedExperts
from coe_dist.model.router import Routing

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().to(F64), expected.detach().to(F64)
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def swiglu64(sd: dict[str, torch.Tensor], prefix: str, z: torch.Tensor) -> torch.Tensor:
    """E(z) = W_down(silu(W_gate z) * (W_up z)) in float64 on rows z [.., d] from reference-layout weights."""
    z = z.to(F64)
    gate = z @ sd[f"{prefix}.gate_proj.weight"].to(F64).T
    up = z @ sd[f"{prefix}.up_proj.weight"].to(F64).T
    return (F.silu(gate) * up) @ sd[f"{prefix}.down_proj.weight"].to(F64).T


def scaled_weights(layer: CoELayer, seed: int, router_std: float = 0.3) -> dict[str, torch.Tensor]:
    """Random reference-layout weights of a healthy scale (1/sqrt(fan_in)) for `layer`'s config."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in layer.hf_state_dict().items():
        std = router_std if name.startswith("gate") else value.shape[1] ** -0.5
        out[name] = torch.randn(value.shape, generator=g, dtype=F64).to(value.dtype) * std
    return out


# ----------------------------------------------------------------------------- reference-layout weights

LOAD_CONFIGS = {
    "indep-S1": dict(iterations=2, independent_gating=True, num_shared_experts=1),
    "shared-S2": dict(iterations=3, independent_gating=False, num_shared_experts=2),
    "indep-S0": dict(iterations=2, independent_gating=True, num_shared_experts=0),
}


def _cfg(**kw) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, expert_hidden_size=8)
    base.update(kw)
    return MoEConfig(**base)


@pytest.mark.parametrize("name", list(LOAD_CONFIGS))
def test_hf_state_dict_round_trip(name):
    cfg = _cfg(**LOAD_CONFIGS[name])
    d = 16
    a, b = CoELayer(cfg, d, seed=0), CoELayer(cfg, d, seed=1)
    sd_a = a.hf_state_dict()

    # the reference names and shapes of COE_SPEC / the reference CoeMoE
    n, f, s = cfg.num_experts, cfg.expert_hidden_size, cfg.num_shared_experts
    expected = {f"gate.{t}.weight": (n, d) for t in range(cfg.iterations)} if cfg.independent_gating \
        else {"gate.weight": (n, d)}
    for i in range(n):
        expected.update({f"experts.{i}.gate_proj.weight": (f, d), f"experts.{i}.up_proj.weight": (f, d),
                         f"experts.{i}.down_proj.weight": (d, f)})
    if s:
        expected.update({"shared_experts.gate_proj.weight": (s * f, d),
                         "shared_experts.up_proj.weight": (s * f, d),
                         "shared_experts.down_proj.weight": (d, s * f)})
    assert {k: tuple(v.shape) for k, v in sd_a.items()} == expected

    sd_b = b.hf_state_dict()
    assert all(not torch.equal(sd_a[k], sd_b[k]) for k in sd_a), "different seeds must give different weights"
    u = torch.randn(2, 5, d, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(a(u)[0], b(u)[0])

    b.load_hf_state_dict(sd_a)
    sd_b = b.hf_state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)

    ua, ub = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
    (ha, aux_a), (hb, aux_b) = a(ua), b(ub)
    assert torch.equal(ha, hb) and torch.equal(aux_a, aux_b)
    r = torch.randn(ha.shape, generator=torch.Generator().manual_seed(4))
    ((ha * r).sum() + aux_a).backward()
    ((hb * r).sum() + aux_b).backward()
    assert torch.equal(ua.grad, ub.grad)
    grads_b = dict(b.named_parameters())
    for pname, p in a.named_parameters():
        assert torch.equal(p.grad, grads_b[pname].grad), pname


def test_load_hf_state_dict_matches_reference_semantics():
    """The names mean what the reference means: gate_proj goes through silu, up_proj does not,
    down_proj maps f -> d; gate.{t} routes iteration t. Checked on a C=1 float64 layer by hand."""
    cfg = _cfg(iterations=1, top_k=1, num_shared_experts=1)
    layer = CoELayer(cfg, 16).to(F64)
    sd = scaled_weights(layer, seed=5, router_std=1.0)
    layer.load_hf_state_dict(sd)
    u = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(6), dtype=F64)
    h, _ = layer(u)
    x = u[0]
    probs = torch.softmax(x @ sd["gate.0.weight"].T, dim=-1)
    expected = x + swiglu64(sd, "shared_experts", x)
    for t in range(x.shape[0]):
        e = int(probs[t].argmax())
        expected[t] += probs[t, e] * swiglu64(sd, f"experts.{e}", x[t])
    assert rel_err(h[0], expected) < 1e-12


def _snapshot(layer: CoELayer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _unchanged(layer: CoELayer, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize(("name", "missing"), [
    ("indep-S1", "gate.1.weight"),
    ("shared-S2", "gate.weight"),
    ("indep-S1", "experts.3.up_proj.weight"),
    ("indep-S0", "experts.0.down_proj.weight"),
    ("shared-S2", "experts.2.gate_proj.weight"),
    ("indep-S1", "shared_experts.down_proj.weight"),
])
def test_load_missing_key_names_it(name, missing):
    cfg = _cfg(**LOAD_CONFIGS[name])
    sd = CoELayer(cfg, 16, seed=0).hf_state_dict()
    del sd[missing]
    layer = CoELayer(cfg, 16, seed=1)
    before = _snapshot(layer)
    with pytest.raises((KeyError, ValueError)) as info:
        layer.load_hf_state_dict(sd)
    assert missing in str(info.value)
    assert _unchanged(layer, before), "a failed load must not leave the layer half-loaded"


def test_load_independent_dict_into_shared_gating_names_gate_weight():
    sd = CoELayer(_cfg(independent_gating=True), 16).hf_state_dict()
    layer = CoELayer(_cfg(independent_gating=False), 16)
    with pytest.raises((KeyError, ValueError)) as info:
        layer.load_hf_state_dict(sd)
    assert "gate.weight" in str(info.value)


@pytest.mark.parametrize(("name", "key", "reshape"), [
    ("indep-S1", "experts.1.down_proj.weight", lambda w: w.T.contiguous()),  # [f, d] instead of [d, f]
    ("indep-S1", "gate.0.weight", lambda w: torch.cat([w, w[:1]])),  # N+1 experts
    ("shared-S2", "gate.weight", lambda w: w[:, :-1]),  # wrong hidden size
    ("shared-S2", "shared_experts.up_proj.weight", lambda w: w[: w.shape[0] // 2]),  # width f, not S*f
    ("indep-S0", "experts.3.gate_proj.weight", lambda w: w.flatten()),
])
def test_load_misshaped_key_names_it(name, key, reshape):
    cfg = _cfg(**LOAD_CONFIGS[name])
    sd = CoELayer(cfg, 16, seed=0).hf_state_dict()
    sd[key] = reshape(sd[key])
    layer = CoELayer(cfg, 16, seed=1)
    before = _snapshot(layer)
    with pytest.raises((KeyError, ValueError)) as info:
        layer.load_hf_state_dict(sd)
    assert key in str(info.value)
    assert _unchanged(layer, before), "a failed load must not leave the layer half-loaded"


# ----------------------------------------------------------------------------- grouped vs loop experts

COUNTS = {
    "all-busy": [3, 1, 4, 2, 5, 1, 2, 3],
    "zeros-inside": [4, 0, 3, 0, 0, 6, 1, 0],
    "zeros-at-ends": [0, 0, 5, 2, 7, 3, 0, 0],
    "one-expert": [0, 0, 0, 12, 0, 0, 0, 0],
}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _expert_pair(dtype, e=8, d=32, f=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    grouped = GroupedExperts(e, d, f, impl="grouped")
    loop = GroupedExperts(e, d, f, impl="loop")
    with torch.no_grad():
        grouped.w_gate_up_E2FD.copy_(torch.randn(e, 2 * f, d, generator=g) * d**-0.5)
        grouped.w_down_EDF.copy_(torch.randn(e, d, f, generator=g) * f**-0.5)
    loop.load_state_dict(grouped.state_dict())
    assert grouped.use_grouped_mm, "d and f multiples of 8: the grouped path must be taken"
    assert not loop.use_grouped_mm
    return grouped.to(dtype), loop.to(dtype)


def _expected_experts64(mod: GroupedExperts, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    f = mod.expert_hidden_size
    w13, w2 = mod.w_gate_up_E2FD.detach().to(F64), mod.w_down_EDF.detach().to(F64)
    rows, start = [], 0
    for e, c in enumerate(counts):
        for r in range(start, start + c):
            z = x[r].detach().to(F64)
            h = w13[e] @ z
            rows.append(w2[e] @ (F.silu(h[:f]) * h[f:]))
        start += c
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("counts", list(COUNTS), ids=list(COUNTS))
def test_grouped_and_loop_experts_agree(dtype, counts):
    counts_list = COUNTS[counts]
    grouped, loop = _expert_pair(dtype)
    T = sum(counts_list)
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    r = torch.randn(T, 32, generator=torch.Generator().manual_seed(2)).to(dtype)
    counts_E = torch.tensor(counts_list)
    expected = _expected_experts64(grouped, x, counts_list)
    results = []
    for mod in (grouped, loop):
        xi = x.clone().requires_grad_(True)
        y = mod(xi, counts_E)
        assert y.dtype == dtype and y.shape == (T, 32)
        (y * r).sum().backward()
        results.append((y.detach(), xi.grad, mod.w_gate_up_E2FD.grad, mod.w_down_EDF.grad))
    tol = TOL[dtype]
    for y, *_ in results:
        assert rel_err(y, expected) < tol
    for a, b, what in zip(results[0], results[1], ["output", "d input", "d w_gate_up", "d w_down"],
                          strict=True):
        assert rel_err(a, b) < tol, what
    for e, c in enumerate(counts_list):
        if c == 0:  # an expert without tokens gets exactly zero gradient on both paths
            for _, _, g13, g2 in results:
                assert not g13[e].any() and not g2[e].any()
        else:
            for _, _, g13, g2 in results:
                assert g13[e].abs().sum() > 0 and g2[e].abs().sum() > 0


def _expected_grads64(mod: GroupedExperts, x: torch.Tensor, r: torch.Tensor, counts: list[int]):
    """Autograd of the float64 per-row SwiGLU on the exact values the GEMMs see: (y, d x, d W13, d W2) of
    sum(y * r)."""
    w13 = mod.w_gate_up_E2FD.detach().to(x.dtype).to(F64).requires_grad_(True)
    w2 = mod.w_down_EDF.detach().to(x.dtype).to(F64).requires_grad_(True)
    x64 = x.detach().to(F64).requires_grad_(True)
    f, rows, start = mod.expert_hidden_size, [], 0
    for e, c in enumerate(counts):
        h = x64[start:start + c] @ w13[e].T
        rows.append((F.silu(h[:, :f]) * h[:, f:]) @ w2[e].T)
        start += c
    y = torch.cat(rows)
    (y * r.to(F64)).sum().backward()
    return y.detach(), x64.grad, w13.grad, w2.grad


def _rounding_tolerance(dtype: torch.dtype, stages: int, n: int) -> float:
    """Norm-wise relative error allowed after `stages` roundings to `dtype` (relative eps each, the inputs of
    every GEMM and element-wise op) and float32 accumulations over at most n terms (random-walk model:
    sqrt(n) eps32 each); the GEMMs accumulate in float32 whatever their input dtype."""
    return stages * (torch.finfo(dtype).eps + math.sqrt(n) * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("counts", ["all-busy", "zeros-inside"])
def test_grouped_experts_match_float64_reference(counts, autocast):
    """The production path (torch._grouped_mm, ep 1) against autograd of a float64 SwiGLU written here:
    output and the gradients w.r.t. x, W_gate_up and W_down. fp32: float32 everything. bf16-autocast (as in
    training): float32 master weights, the GEMMs in bf16. The reference sees the bf16-rounded x and weights,
    so the tolerance covers only the roundings inside: forward x W13 -> h, silu(h) * up -> a, a W2 -> y (3
    stages); backward dy -> da, dh, then d x / d W13 (5 stages); reduction lengths d = 32, f = 16, rows <= 5."""
    counts_list = COUNTS[counts]
    grouped, _ = _expert_pair(torch.float32)
    assert grouped.use_grouped_mm
    dtype = torch.bfloat16 if autocast else torch.float32
    T = sum(counts_list)
    x = torch.randn(T, 32, generator=torch.Generator().manual_seed(1))
    r = torch.randn(T, 32, generator=torch.Generator().manual_seed(2))
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = grouped(xi, torch.tensor(counts_list))
    assert y.dtype == dtype
    (y.float() * r).sum().backward()
    got = (y.detach(), xi.grad, grouped.w_gate_up_E2FD.grad, grouped.w_down_EDF.grad)
    assert grouped.w_gate_up_E2FD.grad.dtype == torch.float32  # master-weight gradients stay float32
    expected = _expected_grads64(grouped, x.to(dtype), r, counts_list)
    for (a, b), what, stages in zip(zip(got, expected, strict=True), ["output", "d x", "d W13", "d W2"],
                                    [3, 5, 5, 4], strict=True):
        tol = _rounding_tolerance(dtype, stages, 32)
        err = rel_err(a, b)
        assert err < tol, f"{what}: relative error {err:.3g} >= {tol:.3g} ({dtype})"
        # A tolerance that any real error would also pass is no test: a wrong expert for one row must fail.
        assert tol < 0.1, tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_experts_with_no_tokens_at_all(dtype):
    grouped, loop = _expert_pair(dtype)
    for mod in (grouped, loop):
        x = torch.zeros(0, 32, dtype=dtype, requires_grad=True)
        y = mod(x, torch.zeros(8, dtype=torch.long))
        assert y.shape == (0, 32) and y.dtype == dtype
        (y * 2).sum().backward()
        for w in (mod.w_gate_up_E2FD, mod.w_down_EDF):
            assert w.grad is None or not w.grad.any()


def test_grouped_experts_backward_with_expanded_gradient():
    """y.sum().backward() hands the grouped GEMM backward an expanded (stride-0) gradient."""
    grouped, loop = _expert_pair(torch.float32)
    counts = torch.tensor(COUNTS["all-busy"])
    x = torch.randn(int(counts.sum()), 32, generator=torch.Generator().manual_seed(1))
    grads = []
    for mod in (loop, grouped):
        xi = x.clone().requires_grad_(True)
        mod(xi, counts).sum().backward()
        grads.append(xi.grad)
    assert rel_err(grads[1], grads[0]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_grouped_and_loop_agree_with_idle_experts(dtype):
    """N=16 experts, 6 tokens, K=1: most experts receive zero tokens at every iteration."""
    d = 32
    kw = dict(num_experts=16, top_k=1, iterations=2, num_shared_experts=1, expert_hidden_size=16,
              z_loss_coef=0.01)
    grouped = CoELayer(MoEConfig(**kw, expert_impl="grouped"), d)
    loop = CoELayer(MoEConfig(**kw, expert_impl="loop"), d)
    sd = scaled_weights(grouped, seed=11, router_std=1.0)
    grouped.load_hf_state_dict(sd)
    loop.load_hf_state_dict(sd)
    assert grouped.experts.use_grouped_mm and not loop.experts.use_grouped_mm
    grouped.to(dtype)
    loop.to(dtype)
    u = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(12)).to(dtype)
    r = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(13)).to(dtype)
    out = []
    for layer in (grouped, loop):
        ui = u.clone().requires_grad_(True)
        h, aux = layer(ui)
        ((h * r).sum() + aux).backward()
        out.append((h.detach(), aux.detach(), ui.grad, dict(layer.named_parameters())))
    tol = TOL[dtype]
    assert rel_err(out[0][0], out[1][0]) < tol
    assert rel_err(out[0][1], out[1][1]) < tol
    assert rel_err(out[0][2], out[1][2]) < tol
    for pname, p in out[0][3].items():
        assert rel_err(p.grad, out[1][3][pname].grad) < tol, pname
    idle = (out[0][3]["experts.w_down_EDF"].grad.flatten(1) == 0).all(dim=1)
    # 6 tokens x 2 iterations reach at most 12 of 16 experts; here 7 receive no token at either iteration
    assert idle.sum() >= 4, "the case must include experts that receive no token"


# ----------------------------------------------------------------------------- capacity dropping

# T = 8 tokens (B=2, L=4), K = 2, N = 4: 16 copies (t, k) -> expert:
#   expert 0: (0,0) (1,0) (2,1) (3,0) (4,0) (5,1) (6,0)   7 copies
#   expert 1: (0,1) (2,0) (4,1) (7,0)                     4
#   expert 2: (1,1) (5,0) (7,1)                           3
#   expert 3: (3,1) (6,1)                                 2
ROUTES = [[0, 1], [0, 2], [1, 0], [0, 3], [0, 1], [2, 0], [0, 3], [1, 2]]
# capacity = ceil(cf * T*K / N); each expert keeps its first copies in token order. By hand:
DROPPED = {
    None: set(),  # dropless
    4.0: set(),  # capacity 16
    1.0: {(4, 0), (5, 1), (6, 0)},  # capacity 4: expert 0 drops its last 3 copies
    0.7: {(3, 0), (4, 0), (5, 1), (6, 0), (7, 0)},  # capacity ceil(2.8) = 3: expert 0 drops 4, expert 1 one
    # capacity 2: expert 0 drops 5, expert 1 drops (4,1) (7,0), expert 2 drops (7,1): tokens 4, 7 lose both
    0.5: {(2, 1), (3, 0), (4, 0), (5, 1), (6, 0), (4, 1), (7, 0), (7, 1)},
}


def _fixed_router(routes: list[list[int]], gates: torch.Tensor, num_experts: int):
    experts_TK = torch.tensor(routes)

    def forward(h_TD: torch.Tensor) -> Routing:
        logits = torch.zeros(h_TD.shape[0], num_experts, dtype=F64)
        return Routing(logits, logits.softmax(-1), gates, experts_TK)
    return forward


def _capacity_layer(cf, monkeypatch, iterations=1, routes=(ROUTES,)):
    cfg = MoEConfig(num_experts=4, top_k=2, iterations=iterations, num_shared_experts=0, expert_hidden_size=8,
                    capacity_factor=cf, aux_loss_coef=0.0)
    layer = CoELayer(cfg, 16).to(F64)
    sd = scaled_weights(layer, seed=21)
    layer.load_hf_state_dict(sd)
    gates = []
    for t in range(iterations):
        g = torch.rand(8, 2, generator=torch.Generator().manual_seed(30 + t), dtype=F64) + 0.5
        gates.append(g)
        monkeypatch.setattr(layer.routers[t], "forward", _fixed_router(routes[t], g, 4))
    return layer, sd, gates


@pytest.mark.parametrize("cf", list(DROPPED), ids=[f"cf{c}" for c in DROPPED])
def test_capacity_drops_exactly_the_overflow_copies(cf, monkeypatch):
    layer, sd, (gates,) = _capacity_layer(cf, monkeypatch)
    leaves = {k: v.clone().requires_grad_(True) for k, v in sd.items()}
    u = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(22), dtype=F64)
    r = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(23), dtype=F64)

    # expected, by hand: u + sum over the kept copies of g * E(u)
    x = u.clone().view(8, 16).requires_grad_(True)
    rows = []
    for t in range(8):
        row = x[t]
        for k in range(2):
            if (t, k) not in DROPPED[cf]:
                row = row + gates[t, k] * swiglu64(leaves, f"experts.{ROUTES[t][k]}", x[t])
        rows.append(row)
    expected = torch.stack(rows).view(2, 4, 16)
    (expected * r).sum().backward()

    ui = u.clone().requires_grad_(True)
    h, _ = layer(ui)
    (h * r).sum().backward()

    reported = sum(layer.dispatcher.stats.dropped.values())
    assert reported == len(DROPPED[cf])
    if cf is not None:
        assert dict(layer.dispatcher.stats.dropped) == {0: len(DROPPED[cf])}
    assert rel_err(h, expected) < 1e-12
    for t in range(8):  # dropped copies contribute exactly nothing: tokens that lost both keep u
        if all((t, k) in DROPPED[cf] for k in range(2)):
            assert torch.equal(h.view(8, 16)[t], u.view(8, 16)[t])
    assert rel_err(ui.grad, x.grad.view(2, 4, 16)) < 1e-12
    params = dict(layer.named_parameters())
    w13, w2 = params["experts.w_gate_up_E2FD"].grad, params["experts.w_down_EDF"].grad
    for e in range(4):
        assert rel_err(w2[e], leaves[f"experts.{e}.down_proj.weight"].grad) < 1e-12
        assert rel_err(w13[e, :8], leaves[f"experts.{e}.gate_proj.weight"].grad) < 1e-12
        assert rel_err(w13[e, 8:], leaves[f"experts.{e}.up_proj.weight"].grad) < 1e-12


def test_capacity_dropped_counts_per_iteration(monkeypatch):
    """Two iterations with different routings: counts per iteration, accumulated until reset."""
    all_to_01 = [[0, 1]] * 8  # experts 0 and 1 get 8 copies each: capacity 4 drops 4 + 4
    layer, _, _ = _capacity_layer(1.0, monkeypatch, iterations=2, routes=(ROUTES, all_to_01))
    u = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(24), dtype=F64)
    layer(u)
    assert dict(layer.dispatcher.stats.dropped) == {0: 3, 1: 8}
    layer(u)
    assert dict(layer.dispatcher.stats.dropped) == {0: 6, 1: 16}
    layer.dispatcher.stats.reset()
    assert sum(layer.dispatcher.stats.dropped.values()) == 0


def test_dropless_by_default_with_skewed_routing():
    """capacity_factor=None (the default) on a real router with all tokens preferring one expert."""
    cfg = MoEConfig(num_experts=4, top_k=1, iterations=2, num_shared_experts=0, expert_hidden_size=8)
    assert cfg.capacity_factor is None
    layer = CoELayer(cfg, 16).to(F64)
    sd = scaled_weights(layer, seed=25)
    for t in range(2):
        sd[f"gate.{t}.weight"].zero_()
        sd[f"gate.{t}.weight"][2, 0] = 50.0  # expert 2 wins for every token with a positive first feature
    layer.load_hf_state_dict(sd)
    u = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(26), dtype=F64)
    u[..., 0] = 5.0
    h, _ = layer(u)
    assert sum(layer.dispatcher.stats.dropped.values()) == 0
    x = u.view(8, 16)
    for _ in range(2):
        p2 = torch.softmax(x @ sd["gate.0.weight"].T, dim=-1)[:, 2]
        assert (p2 > 0.5).all()
        x = x + p2[:, None] * swiglu64(sd, "experts.2", x)
    assert rel_err(h.view(8, 16), x) < 1e-12


# ----------------------------------------------------------------------------- bf16 autocast

def test_bf16_autocast_close_to_fp32():
    d = 32
    cfg = MoEConfig(num_experts=8, top_k=2, iterations=2, num_shared_experts=1, expert_hidden_size=16,
                    z_loss_coef=0.001)
    layer = CoELayer(cfg, d)
    layer.load_hf_state_dict({k: v.float() for k, v in scaled_weights(layer, seed=41).items()})
    u = torch.randn(2, 8, d, generator=torch.Generator().manual_seed(42))
    r = torch.randn(2, 8, d, generator=torch.Generator().manual_seed(43))

    def run(autocast: bool):
        layer.zero_grad(set_to_none=True)
        ui = u.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            h, aux = layer(ui)
        ((h * r).sum() + 100 * aux).backward()
        return h.detach(), aux.detach(), ui.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    h32, aux32, gu32, gw32 = run(False)
    h16, aux16, gu16, gw16 = run(True)
    assert h16.dtype == torch.float32 and aux16.dtype == torch.float32
    assert not torch.equal(h16, h32), "autocast must actually change the computation"
    assert rel_err(h16, h32) < 2e-2
    assert rel_err(h16 - u, h32 - u) < 2e-2  # the CoE update itself, not just the residual stream
    assert math.isclose(float(aux16), float(aux32), rel_tol=2e-2)
    assert rel_err(gu16, gu32) < 2e-2
    for name in gw32:
        assert rel_err(gw16[name], gw32[name]) < 3e-2, name


@pytest.mark.parametrize("iterations", [1, 3])
def test_recompute_gives_identical_outputs_and_grads(iterations):
    """moe.recompute re-runs each iteration's expert path in backward: same numbers, less memory kept."""
    def run(recompute):
        torch.manual_seed(0)
        layer = CoELayer(MoEConfig(num_experts=8, top_k=2, iterations=iterations, expert_hidden_size=16,
                                   recompute=recompute), 32, seed=3)
        u = torch.randn(2, 8, 32, requires_grad=True)
        h, aux = layer(u)
        (h.square().sum() + aux).backward()
        return [h.detach(), u.grad] + [p.grad for p in layer.parameters()]

    for a, b in zip(run(False), run(True), strict=True):
        assert torch.equal(a, b)
