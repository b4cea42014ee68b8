"""Overlapped and chunked expert-parallel all-to-alls (`moe.overlap`, `moe.a2a_chunks`) compute what the plain
path computes.

- schedule, one process with faked collectives: the order in which all-to-alls are issued and waited for,
  forward and backward, is the overlap: the shared experts run between the first dispatch's issue and its wait,
  chunk c+1's dispatch is in flight during chunk c's experts, and backward mirrors it. Outputs equal the
  local dispatcher's, with and without capacity, also with more chunks than tokens.
- real processes (gloo, one launch of tests/ep_worker.py per world size): at ep 2 and ep 4 every variant
  (overlap on/off; a2a_chunks 1, 2, 3, where 3 does not divide the tokens of a rank; more chunks than tokens
  at ep 4; capacity; recompute) matches the single-process float64 reference (relative error < 1e-5,
  COE_SPEC) and the non-overlapped run (< 1e-6), with the same bytes on the wire.
- config: a2a_chunks=0 fails naming key, value and fix.

Shape legend: B = sequences, L = sequence length, T = tokens, D = hidden, K = experts per token.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

import coe_dist.parallel.dispatch as dispatch
from coe_dist.cli import main
from coe_dist.config import ConfigError, MoEConfig, load_config
from coe_dist.model.coe import CoELayer

from ep_common import DIRECTIONS, build_layer, launch, run_layer

ROOT = Path(__file__).resolve().parents[1]
D, F, N = 32, 16, 8  # hidden, expert width, routed experts
B, L = 8, 5  # global batch: 20 tokens per rank at world 2, 10 at world 4
RTOL = 1e-5  # against the float64 reference (COE_SPEC)
TIGHT = 1e-6  # against the non-overlapped float32 run: only the order of some float32 sums may change
LAUNCH_TIMEOUT_S = {2: 300, 4: 420}  # normally well under a minute; generous for a loaded machine
BASE = dict(num_experts=N, top_k=2, iterations=2, num_shared_experts=1, expert_hidden_size=F, aux_loss_coef=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = (got.double() - want.double()).norm().item()
    scale = want.double().norm().item()
    return diff / scale if scale > 0 else diff


# ---------------------------------------------------------------- schedule, one process

class _Tag(torch.autograd.Function):
    """Identity that logs `name` when autograd reaches it in backward."""

    @staticmethod
    def forward(ctx, x, events, name):
        ctx.events, ctx.name = events, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.events.append(f"{ctx.name} bwd")
        return grad, None, None


class _Work:
    """A finished all-to-all (the fake copied at issue time)."""

    def __init__(self) -> None:
        self.future = torch.futures.Future()
        self.future.set_result(None)

    def wait(self) -> None:
        pass

    def get_future(self) -> torch.futures.Future:
        return self.future


def _fake_all_to_all(out, inp, out_splits, in_splits, group=None, async_op=False):
    out.copy_(inp)  # one rank: everything stays here
    return _Work() if async_op else None


@pytest.fixture
def one_rank(monkeypatch):
    """An AllToAllDispatcher over a one-rank group whose collectives are copies; returns the event log of its
    data all-to-alls: 'issue|wait direction phase rows'."""
    fake = types.SimpleNamespace(get_world_size=lambda group: 1, get_rank=lambda group: 0,
                                 get_global_rank=lambda group, rank: rank, all_to_all_single=_fake_all_to_all)
    monkeypatch.setattr(dispatch, "dist", fake)
    events: list[str] = []
    start, wait = dispatch._InFlight.start, dispatch._InFlight.wait

    def logged_start(self, xs, phase):
        events.append(f"issue {self.direction} {phase} {xs[0].shape[0]}")
        return start(self, xs, phase)

    def logged_wait(self, outs, phase):
        events.append(f"wait {self.direction} {phase} {outs[0].shape[0]}")
        return wait(self, outs, phase)

    monkeypatch.setattr(dispatch._InFlight, "start", logged_start)
    monkeypatch.setattr(dispatch._InFlight, "wait", logged_wait)
    return events


def _iteration(dispatcher, events: list[str], T: int = 11, K: int = 2, seed: int = 0):
    """One dispatcher.run with a toy expert (tanh(x W)) and shared expert (2x), then backward. Returns the
    output and the gradients of (x, gates, W)."""
    g = torch.Generator().manual_seed(seed)
    x_TD = torch.randn(T, D, generator=g, requires_grad=True)
    gates_TK = torch.rand(T, K, generator=g, requires_grad=True)
    experts_TK = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])
    w_DD = torch.randn(D, D, generator=g, requires_grad=True)

    def experts(x_RD, counts_E):
        events.append(f"experts {x_RD.shape[0]}")
        return _Tag.apply(torch.tanh(x_RD @ w_DD), events, f"experts {x_RD.shape[0]}")

    def shared():
        events.append("shared")
        return _Tag.apply(2 * x_TD, events, "shared")

    y_TD = dispatcher.run(x_TD, gates_TK, experts_TK, 0, torch.float32, experts, shared)
    events.append("backward")
    return y_TD.detach(), torch.autograd.grad((y_TD * torch.cos(y_TD)).sum(), [x_TD, gates_TK, w_DD])


def test_schedule_overlaps_shared_experts_and_chunks(one_rank):
    """11 tokens, K=2, 2 chunks: chunk 0 has 12 token copies, chunk 1 has 10."""
    dispatcher = dispatch.AllToAllDispatcher(N, None, chunks=2, overlap=True)
    _iteration(dispatcher, one_rank)
    assert one_rank == [
        "issue dispatch fwd 12", "shared", "issue dispatch fwd 10",
        "wait dispatch fwd 12", "experts 12", "issue combine fwd 12",
        "wait dispatch fwd 10", "experts 10", "issue combine fwd 10",
        "wait combine fwd 12", "wait combine fwd 10",
        "backward",
        "issue combine bwd 10", "issue combine bwd 12",
        "wait combine bwd 10", "experts 10 bwd", "issue dispatch bwd 10",
        "wait combine bwd 12", "experts 12 bwd", "issue dispatch bwd 12",
        "wait dispatch bwd 10", "shared bwd", "wait dispatch bwd 12",
    ]
    records = {key: rec.calls for key, rec in dispatcher.stats.records.items()}
    assert records == {(0, d): 2 for d in DIRECTIONS}
    assert set(dispatcher.in_flight_s) == set(records)


def test_schedule_without_overlap_waits_at_once(one_rank):
    _iteration(dispatch.AllToAllDispatcher(N, None, chunks=1, overlap=False), one_rank)
    assert one_rank == [
        "issue dispatch fwd 22", "wait dispatch fwd 22", "experts 22", "issue combine fwd 22",
        "wait combine fwd 22", "shared",
        "backward",
        "shared bwd", "issue combine bwd 22", "wait combine bwd 22", "experts 22 bwd",
        "issue dispatch bwd 22", "wait dispatch bwd 22",
    ]


@pytest.mark.parametrize("chunks,overlap,cf", [(1, True, None), (3, True, None), (3, False, None),
                                               (16, True, None), (3, True, 0.75), (16, True, 1.0)],
                         ids=lambda v: str(v))
def test_chunks_equal_local_dispatcher(one_rank, chunks, overlap, cf):
    """Same numbers as the single-process dispatcher (a matmul over fewer rows may round differently);
    capacity drops decided on the whole iteration (one count per iteration); 16 chunks of 11 tokens leaves 5
    chunks empty."""
    local = dispatch.LocalDispatcher(N, cf)
    chunked = dispatch.AllToAllDispatcher(N, None, cf, chunks=chunks, overlap=overlap)
    y_want, grads_want = _iteration(local, [])
    y_got, grads_got = _iteration(chunked, [])
    for got, want in zip((y_got, *grads_got), (y_want, *grads_want), strict=True):
        assert rel_err(got, want) < TIGHT
    assert dict(chunked.stats.dropped) == dict(local.stats.dropped)
    assert cf is None or sum(local.stats.dropped.values()) > 0


def test_chunk_sizes():
    assert dispatch.chunk_sizes(10, 3) == [4, 3, 3]
    assert dispatch.chunk_sizes(2, 4) == [1, 1, 0, 0]
    assert dispatch.chunk_sizes(8, 1) == [8]


# ---------------------------------------------------------------- config

def test_a2a_chunks_zero_is_refused(capsys):
    with pytest.raises(ConfigError, match=r"moe\.a2a_chunks=0: must be >= 1; use 1 .*or 2 or more"):
        load_config(None, ["moe.a2a_chunks=0"])
    with pytest.raises(ConfigError, match=r"moe\.a2a_chunks=-2"):
        CoELayer(MoEConfig(a2a_chunks=-2), D)
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "--set", "moe.a2a_chunks=0"]) == 2
    assert "moe.a2a_chunks=0" in capsys.readouterr().err
    cfg = load_config(None, ["moe.a2a_chunks=3", "moe.overlap=false"])
    assert (cfg.moe.a2a_chunks, cfg.moe.overlap) == (3, False)
    assert (MoEConfig().a2a_chunks, MoEConfig().overlap) == (1, True)


# ---------------------------------------------------------------- real processes

def _variants(world: int) -> dict[str, dict]:
    """name -> MoEConfig keys; "base" is the non-overlapped path the others are compared with."""
    variants = {
        "base": dict(overlap=False),
        "overlap": dict(overlap=True),
        "chunks2": dict(a2a_chunks=2),
        "chunks3": dict(a2a_chunks=3),  # 20 or 10 tokens per rank: 3 does not divide them
        "chunks3_no_overlap": dict(a2a_chunks=3, overlap=False),
        "chunks3_recompute": dict(a2a_chunks=3, recompute=True),
        "cap_base": dict(overlap=False, capacity_factor=1.0),
        "cap_chunks3": dict(a2a_chunks=3, capacity_factor=1.0),
    }
    if world == 4:
        variants["chunks12"] = dict(a2a_chunks=12)  # 10 tokens per rank: two empty chunks
    # moe.dispatch: dedup (a row per token and rank) through the same schedules
    variants |= {f"dedup_{name}": dict(extra, dispatch="dedup") for name, extra in variants.items()
                 if name in ("base", "overlap", "chunks3", "chunks3_recompute", "cap_base", "cap_chunks3",
                             "chunks12")}
    return variants


def _weights_and_batch(seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = build_layer(BASE, D, 1, seed=seed).hf_state_dict()
    for k in sd:  # sharper routing: top-K gaps far above float32 rounding, so float64 and float32 route alike
        if k.startswith("gate"):
            sd[k] *= 5
    return sd, torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)


def _reference(sd: dict, u_BLD: torch.Tensor, gout_BLD: torch.Tensor) -> dict:
    """The whole batch in one process, float64 (dropless)."""
    layer = build_layer(BASE, D, 1, sd).double()
    margins: list[torch.Tensor] = []

    def margin(router, args):
        top = (args[0] @ router.weight.T).topk(BASE["top_k"] + 1, dim=-1).values
        margins.append((top[:, -2] - top[:, -1]).min())

    for router in layer.routers:
        router.register_forward_pre_hook(margin)
    ref = run_layer(layer, u_BLD.double(), gout_BLD.double(), aux_scale=1.0)
    assert min(margins) > 1e-4, "test data: a near-tie in the routing could route float32 differently"
    return ref


def _gather(ranks: list[dict]) -> dict:
    """The global picture from the ranks' slices (world = ep: every expert lives on exactly one rank)."""
    grads: dict[str, torch.Tensor] = {}
    for r in ranks:
        for name, g in r["grads"].items():  # dense grads add up over ranks; an expert's come from its owner
            grads[name] = grads[name] + g if name in grads else g
    return {"out": torch.cat([r["out"] for r in ranks]), "aux": sum(r["aux"] for r in ranks) / len(ranks),
            "u_grad": torch.cat([r["u_grad"] for r in ranks]), "grads": grads}


def _errors(got: dict, want: dict) -> dict[str, float]:
    errors = {key: rel_err(got[key], want[key]) for key in ("out", "aux", "u_grad")}
    assert set(got["grads"]) == set(want["grads"])
    errors.update({f"grad {name}": rel_err(got["grads"][name], g) for name, g in want["grads"].items()})
    return errors


def _run_world(world: int, tmp_path_factory) -> dict:
    sd, u_BLD, gout_BLD = _weights_and_batch(seed=world)
    cases = [dict(name=name, cfg=BASE | extra, ep=world, sd=sd, u=u_BLD, gout=gout_BLD, forced=None)
             for name, extra in _variants(world).items()]
    ranks = launch(world, cases, tmp_path_factory.mktemp(f"overlap_world{world}"), timeout_s=LAUNCH_TIMEOUT_S[world])
    return {"ref": _reference(sd, u_BLD, gout_BLD), "cfg": {c["name"]: c["cfg"] for c in cases},
            "ranks": {c["name"]: [r[c["name"]] for r in ranks] for c in cases}}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return _run_world(2, tmp_path_factory)


@pytest.fixture(scope="module")
def world4(tmp_path_factory):
    return _run_world(4, tmp_path_factory)


CASES = [(world, name) for world in (2, 4) for name in _variants(world)]


@pytest.mark.parametrize("world,name", CASES, ids=[f"ep{w}_{n}" for w, n in CASES])
def test_overlapped_layer_matches_reference_and_plain_path(request, world, name):
    res = request.getfixturevalue(f"world{world}")
    got = _gather(res["ranks"][name])
    capacity = "capacity_factor" in res["cfg"][name]
    plain = "cap_base" if capacity else "base"  # dedup variants too: the two dispatch modes agree
    if not capacity:  # capacity is per rank: the whole-batch reference drops nothing
        bad = {k: v for k, v in _errors(got, res["ref"]).items() if not v < RTOL}
        assert not bad, f"ep {world} {name}: relative error against float64 >= {RTOL}: {bad}"
    bad = {k: v for k, v in _errors(got, _gather(res["ranks"][plain])).items() if not v < TIGHT}
    assert not bad, f"ep {world} {name}: relative error against the non-overlapped run >= {TIGHT}: {bad}"


@pytest.mark.parametrize("world,name", CASES, ids=[f"ep{w}_{n}" for w, n in CASES])
def test_chunks_send_the_same_bytes(request, world, name):
    """Per (iteration, direction): the plain path's all-to-alls once per chunk, the same bytes and drops."""
    res = request.getfixturevalue(f"world{world}")
    cfg = res["cfg"][name]
    plain = ("dedup_" if cfg.get("dispatch") == "dedup" else "") + ("cap_base" if "capacity_factor" in cfg else "base")
    chunks = cfg.get("a2a_chunks", 1)
    recompute = 2 if cfg.get("recompute") else 1  # the forward all-to-alls run again in backward
    for got, want in zip(res["ranks"][name], res["ranks"][plain], strict=True):
        assert got["records"].keys() == want["records"].keys()
        for key, (calls, sent, received) in got["records"].items():
            runs = recompute if key[1].endswith("_fwd") else 1
            want_calls, want_sent, want_received = want["records"][key]
            assert (calls, sent, received) == (want_calls * chunks * runs, want_sent * runs,
                                               want_received * runs), key
        assert got["dropped"] == {t: n * recompute for t, n in want["dropped"].items()}
    assert "capacity_factor" not in cfg or any(res["ranks"][plain][0]["dropped"].values())
