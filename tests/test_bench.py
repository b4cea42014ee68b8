"""coe_dist.bench: grid, routing tables, byte counts, cost model, fitting, and the bench itself on 2 and 4 ranks."""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from coe_dist.bench import model as cm
from coe_dist.bench.grid import (
    BenchCase,
    analytic_bytes_per_a2a,
    expand_grid,
    forced_balanced_table,
    load_grid,
    normalise_grid,
    zipf_table,
)
from coe_dist.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- grid and routing

def test_grid_total_k_fixes_c_times_k_and_aliases_work():
    cases = expand_grid(normalise_grid({"C": "1,2,4", "total_k": 4, "N": 8, "P": [2, 4]}))
    assert [(c.iterations, c.top_k, c.ep_size) for c in cases] == [
        (1, 4, 2), (1, 4, 4), (2, 2, 2), (2, 2, 4), (4, 1, 2), (4, 1, 4)]
    assert all(c.iterations * c.top_k == 4 for c in cases)


def test_grid_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError, match="unknown bench grid key 'hiden'"):
        normalise_grid({"hiden": 64})
    with pytest.raises(ConfigError, match="not a valid int"):
        normalise_grid({"tokens": "many"})


def test_ci_grid_file_loads():
    cases, settings = load_grid(ROOT / "configs/bench/ci.yaml")
    assert settings["repeats"] >= 1
    assert {c.routing for c in cases} == {"forced-balanced", "skewed"}


def test_forced_balanced_table_hits_every_expert_equally():
    gen = torch.Generator().manual_seed(0)
    table = forced_balanced_table(96, 3, 8, gen)
    assert table.shape == (96, 3)
    assert torch.bincount(table.flatten(), minlength=8).tolist() == [96 * 3 // 8] * 8
    assert all(len(set(row.tolist())) == 3 for row in table)  # K distinct experts per token


def test_zipf_table_is_skewed_and_distinct_per_token():
    gen = torch.Generator().manual_seed(0)
    table = zipf_table(4000, 2, 8, 1.5, gen)
    counts = torch.bincount(table.flatten(), minlength=8)
    assert counts[0] > 3 * counts[7]
    assert (table[:, 0] != table[:, 1]).all()


def test_analytic_bytes():
    c = BenchCase(iterations=2, top_k=2, num_experts=8, hidden=32, tokens=64, ep_size=4, dtype="bf16")
    # 64*2 copies, 3/4 of them off-rank, 32 bf16 elements each
    assert analytic_bytes_per_a2a(c) == 64 * 2 * 3 // 4 * 32 * 2


# ---------------------------------------------------------------- cost model

def toy_profile() -> cm.Profile:
    return cm.Profile(
        name="toy", kind="gpu", ranks_per_node=4,
        links={"intra": cm.Link(latency_s=10e-6, bandwidth_Bps=100e9),
               "inter": cm.Link(latency_s=50e-6, bandwidth_Bps=10e9)},
        gemm={"bf16": cm.Affine(5e-6, 1e-12)},
        phases={k: cm.Affine(1e-6, 0.0) for k in ("route_fwd", "route_bwd", "permute_fwd", "permute_bwd",
                                                  "regroup_fwd", "regroup_bwd", "ungroup_fwd", "ungroup_bwd",
                                                  "unpermute_fwd", "unpermute_bwd")},
        host_sync_s=2e-6)


def test_cost_model_matches_hand_computed_predictions():
    prof = toy_profile()
    # One node (P=4 <= 4 ranks per node): intra only. B = 1 MB -> 10 us + 1e6/1e11 s = 20 us.
    assert cm.a2a_time(prof, 4, 1e6) == pytest.approx(20e-6)
    # Two nodes (P=8, g=4): B_inter = B*4/7, B_intra = B*3/7, forwarded share of B_inter is 3/4.
    B = 7e6
    inter = 50e-6 + 4e6 / 10e9  # 1 other node
    intra = 10e-6 + (3e6 + 4e6 * 3 / 4) / 100e9
    assert cm.a2a_time(prof, 8, B) == pytest.approx(inter + intra)
    # A full iteration: T=1000 tokens, K=2, d=500, f=1000, bf16, P=4.
    w = cm.Workload(iterations=2, top_k=2, num_experts=8, hidden=500, expert_hidden=1000, tokens=1000, ep_size=4)
    it = cm.predict_iteration(prof, w)
    b = 1000 * 2 * 3 / 4 * 500 * 2  # bytes off-rank per data all-to-all = 1.5e6
    assert it["dispatch_fwd"] == pytest.approx(10e-6 + b / 100e9)
    assert it["combine_bwd"] == pytest.approx(10e-6 + b / 100e9)
    assert it["counts_fwd"] == pytest.approx(10e-6 + 3 * (2 + 1) * 8 / 100e9 + 2e-6)  # E counts + total
    rows = 2000  # T*K copies on the rank
    assert it["experts_fwd"] == pytest.approx(5e-6 + 6 * rows * 500 * 1000 * 1e-12)
    assert it["experts_bwd"] == pytest.approx(5e-6 + 12 * rows * 500 * 1000 * 1e-12)
    assert it["permute_fwd"] == pytest.approx(1e-6)
    step = cm.predict_step(prof, w)
    comm = 2 * (it["counts_fwd"] + 2 * it["dispatch_fwd"] + 2 * it["combine_fwd"])
    assert step["comm_s"] == pytest.approx(comm)
    assert step["step_s"] == pytest.approx(2 * sum(it.values()))
    assert step["comm_share"] == pytest.approx(comm / step["step_s"])


def test_cpu_profile_oversubscription_scales_every_phase():
    prof = toy_profile()
    prof.kind, prof.cores_per_node, prof.threads_per_rank, prof.ranks_per_node = "cpu", 2, 1, 2
    w = cm.Workload(iterations=1, top_k=2, num_experts=8, hidden=64, expert_hidden=64, tokens=64, ep_size=2)
    at2 = cm.predict_iteration(prof, w)
    w4 = cm.Workload(**{**w.__dict__, "ranks_per_node": 4})
    at4 = cm.predict_iteration(prof, w4)
    assert at4["experts_fwd"] == pytest.approx(2 * at2["experts_fwd"])
    assert at4["dispatch_fwd"] == pytest.approx(2 * at2["dispatch_fwd"])


@pytest.mark.parametrize("model", ["fixed", "per_peer"])
def test_fit_recovers_latency_and_bandwidth_within_one_percent(model):
    rng = np.random.default_rng(0)
    alpha, bw = 37e-6, 12.5e9
    pts = []
    for peers in (1, 3, 7):
        for nbytes in np.logspace(3, 8, 12):
            t = (alpha if model == "fixed" else alpha * peers) + nbytes / bw
            pts.append((peers, float(nbytes), t * (1 + rng.normal(0, 0.002))))  # 0.2% noise
    link = cm.fit_link(pts, latency_model=model)
    got_alpha = link.latency_s if model == "fixed" else link.latency_per_peer_s
    assert got_alpha == pytest.approx(alpha, rel=0.01)
    assert link.bandwidth_Bps == pytest.approx(bw, rel=0.01)


def test_fit_with_call_site_overheads_recovers_them():
    alpha, bw, over = 200e-6, 1e9, {"dispatch_fwd": 50e-6, "combine_bwd": 300e-6}
    pts = [("counts_fwd", 1, 16.0, alpha + 16 / bw)]
    for key in ("dispatch_fwd", "combine_bwd"):
        for nbytes in (1e4, 1e5, 1e6, 4e6):
            pts.append((key, 1, nbytes, alpha + nbytes / bw + over[key]))
    link, got = cm.fit_link_overheads(pts)
    assert link.latency_per_peer_s == pytest.approx(alpha, rel=0.01)
    assert link.bandwidth_Bps == pytest.approx(bw, rel=0.01)
    assert got["counts_fwd"] == pytest.approx(0, abs=1e-9)  # the cheapest call site defines the link latency
    for key, o in over.items():
        assert got[key] == pytest.approx(o, rel=0.01)


def test_fit_separates_per_call_and_per_peer_latency_from_two_group_sizes():
    a0, a1, bw = 40e-6, 90e-6, 2e9
    pts = [(peers, float(b), a0 + peers * a1 + b / bw) for peers in (1, 2) for b in np.logspace(3, 7, 8)]
    link = cm.fit_link(pts, latency_model="both")
    assert (link.latency_s, link.latency_per_peer_s) == pytest.approx((a0, a1), rel=0.01)
    assert link.bandwidth_Bps == pytest.approx(bw, rel=0.01)
    assert link.time(3, 1e6) == pytest.approx(a0 + 3 * a1 + 1e6 / bw, rel=0.01)  # a group size it never saw


def test_call_site_overheads_are_the_residuals_over_the_swept_link():
    """Grid all-to-alls = link + a fixed overhead per call site (+ the host sync for the count exchange):
    the residuals recover them, per call for a 'both' link (so a call at ep 4 costs link(3 peers) + o)."""
    link = cm.Link(latency_s=30e-6, latency_per_peer_s=70e-6, bandwidth_Bps=1e9)
    over, sync = {"dispatch_fwd": 120e-6, "combine_bwd": 45e-6}, 25e-6
    obs = []
    for P in (2, 4):
        case = BenchCase(iterations=1, top_k=2, num_experts=8, hidden=64, tokens=256, ep_size=P)
        w = cm.Workload.from_case(case)
        counts_bytes = (P - 1) * (case.local_experts + 1) * 8
        obs.append(cm.Observation(case, "counts_fwd", link.time(P - 1, counts_bytes) + sync))
        for key, o in over.items():
            obs.append(cm.Observation(case, key, link.time(P - 1, w.bytes_offrank) + o, bytes_offrank=w.bytes_offrank))
    phases, host_sync = cm.call_site_overheads(link, obs, "both", "synthetic")
    assert host_sync == pytest.approx(sync, rel=1e-6)
    assert {k: a.fixed_s for k, a in phases.items()} == pytest.approx(over, rel=1e-6)
    assert all(a.per_unit_s == 0 for a in phases.values())


def test_fit_affine_is_non_negative_and_exact_on_a_line():
    a, b = cm.fit_affine([1, 2, 4, 8], [3 + 2 * x for x in (1, 2, 4, 8)])
    assert (a, b) == pytest.approx((3, 2))
    a, b = cm.fit_affine([1, 2, 4], [1.0, 0.5, 0.25])  # decreasing: the slope is clamped at 0
    assert a > 0 and b == 0


def test_profiles_ship_with_sources_and_load(tmp_path):
    for name in ("h100-nvlink-ib400", "h200-nvlink-ib400", "cpu-local"):
        prof = cm.load_profile(name)
        assert prof.links["intra"].bandwidth_Bps > 0
        assert all(link.source for link in prof.links.values())
        assert prof.save(tmp_path / f"{name}.yaml").is_file()
        assert cm.load_profile(tmp_path / f"{name}.yaml") == prof


def test_register_cli_adds_bench_comm_and_project():
    import argparse

    from coe_dist.bench import cli as bench_cli

    parser = argparse.ArgumentParser(prog="coe-dist")
    bench_cli.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "comm", "--iterations", "1,2", "--total-k", "4", "--calibrate",
                              "--report"])
    assert args.calibrate and args.report == ""
    assert bench_cli.comm_argv(args)[:4] == ["--iterations", "1,2", "--total-k", "4"]
    args = parser.parse_args(["bench", "project", "--profile", "h100-nvlink-ib400", "--model", "m.yaml"])
    assert args.gpus == "8,64,512,4096"


def test_project_cli_prints_table_and_writes_files(tmp_path):
    from coe_dist.bench.cli import main

    out = tmp_path / "proj"
    rc = main(["project", "--profile", "h100-nvlink-ib400", "--gpus", "8,64",
               "--model", str(ROOT / "configs/paper/coe-2-4of64.yaml"), "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "projection.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"CoE-2(4/64)", "MoE(8/64)"}
    coe8 = next(r for r in rows if r["gpus"] == 8 and r["model"].startswith("CoE"))
    moe8 = next(r for r in rows if r["gpus"] == 8 and r["model"].startswith("MoE"))
    assert coe8["a2a_rounds_per_step"] == 2 * moe8["a2a_rounds_per_step"]
    assert coe8["a2a_mib_per_step"] < moe8["a2a_mib_per_step"]  # 2x3 routed copies vs 7
    assert (out / "projection.png").read_bytes()[:8] == PNG_MAGIC


# ---------------------------------------------------------------- the bench on 2 and 4 ranks

def _run_bench(tmp_path: Path, nproc: int, extra: list[str]) -> tuple[Path, float]:
    out = tmp_path / f"bench{nproc}"
    cmd = [sys.executable, "-m", "coe_dist.bench.cli", "comm", "--nproc", str(nproc), "--grid",
           str(ROOT / "configs/bench/ci.yaml"), "--out", str(out), "--report", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, took


def _check_outputs(out: Path, world: int) -> None:
    with (out / "measurements.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and set(rows[0]) == {"case", "rank", "repeat", "layer", "iteration", "phase", "direction",
                                     "seconds", "bytes_sent", "bytes_received", "rows"}
    assert {int(r["rank"]) for r in rows} == set(range(world))
    assert all(math.isfinite(float(r["seconds"])) and float(r["seconds"]) >= 0 for r in rows)
    phases = {(r["phase"], r["direction"]) for r in rows}
    for p in ("route", "permute", "dispatch", "regroup", "experts", "ungroup", "combine", "unpermute"):
        assert (p, "fwd") in phases and (p, "bwd") in phases
    assert ("counts", "fwd") in phases
    data = json.loads((out / "summary.json").read_text())
    assert data["meta"]["world"] == world
    cases = {c["case"]: c for c in data["cases"]}
    # Byte counts equal the analytic count exactly for forced-balanced routing, every call on every rank.
    checked = 0
    for r in rows:
        c = cases[r["case"]]["config"]
        if c["routing"] != "forced-balanced" or r["phase"] not in ("dispatch", "combine"):
            continue
        expected = analytic_bytes_per_a2a(BenchCase(**c))
        assert int(r["bytes_sent"]) == expected, r
        assert int(r["bytes_received"]) == expected, r
        checked += 1
    assert checked > 0
    for s in data["cases"]:
        if s["config"]["routing"] == "forced-balanced":
            per_step = {v[0] for v in s["bytes"]["data_per_step_per_rank"].values()}
            assert per_step == {s["bytes"]["data_per_step_expected"]}
        assert 0 <= s["comm_share"]["median"] <= 1
    with (out / "summary.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) > 0
    pngs = list((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"breakdown_vs_ep.png", "share_vs_c.png", "bytes_rounds.png", "skew.png"}
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    report = (out / "report.md").read_text()
    assert "| C | K |" in report and "plots/share_vs_c.png" in report


def test_bench_two_ranks_with_calibration(tmp_path):
    out, took = _run_bench(tmp_path, 2, ["--calibrate"])
    _check_outputs(out, 2)
    prof = cm.load_profile(out / "profile.yaml")
    assert prof.kind == "cpu" and prof.links["intra"].bandwidth_Bps > 0
    w = cm.Workload(iterations=2, top_k=2, num_experts=4, hidden=32, expert_hidden=32, tokens=32, ep_size=2)
    pred = cm.predict_step(prof, w)
    assert 0 < pred["comm_s"] < pred["step_s"] < 10 and all(v >= 0 for v in pred["phases"].values())
    assert took < 60, f"2-rank CI bench took {took:.0f} s (issue 6: under a minute)"


def test_bench_four_ranks_two_ep_sizes(tmp_path):
    out, took = _run_bench(tmp_path, 4, ["--ep-size", "2,4", "--calibrate"])
    _check_outputs(out, 4)
    data = json.loads((out / "summary.json").read_text())
    assert {c["config"]["ep_size"] for c in data["cases"]} == {2, 4}
    # The link sweep covers every group size of the node, 3 included (rank 3 idles meanwhile), so the fit
    # can tell a per-call latency from a per-peer one.
    sweep = data["calibration"]["a2a"]
    assert {r["P"] for r in sweep} == {2, 3, 4}
    assert all(0 < r["seconds"] <= r["seconds_slowest_rank"] < 1 for r in sweep)
    link = cm.load_profile(out / "profile.yaml").links["intra"]
    assert "latency model both" in link.source and link.bandwidth_Bps > 0
    assert took < 60, f"4-rank CI bench took {took:.0f} s (issue 6: under a minute)"


def test_a_rerun_replaces_the_tensorboard_events_of_the_last_run(tmp_path):
    from coe_dist.bench.outputs import write_tensorboard

    stale = tmp_path / "events.out.tfevents.1700000000.oldhost.1.0"
    stale.write_bytes(b"last run")
    write_tensorboard(tmp_path, [], [])
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0] != stale


def test_validation_fits_ep_2_without_any_ep_4_measurement():
    from coe_dist.bench.validate import training_sweep

    run4 = {"cases": [{"config": {"ep_size": 2}}, {"config": {"ep_size": 4}}],
            "calibration": {"a2a": [{"P": P, "bytes_offrank": b, "seconds": 1e-3} for P in (2, 3, 4) for b in (1, 2)]}}
    assert {r["P"] for r in training_sweep(run4)} == {2, 3}
    run4["calibration"]["a2a"] = [r for r in run4["calibration"]["a2a"] if r["P"] != 3]
    assert training_sweep(run4) is None  # one group size left: it cannot split the latency
    assert training_sweep({"cases": run4["cases"]}) is None


def test_distinct_ranks_per_token_matches_enumeration():
    """P * (1 - C(N - N/P, K) / C(N, K)) against counting the ranks of every K-subset of N experts."""
    for N, K, P in ((8, 3, 4), (8, 2, 2), (12, 4, 3), (8, 8, 4)):
        E = N // P
        subsets = list(itertools.combinations(range(N), K))
        mean = sum(len({e // E for e in s}) for s in subsets) / len(subsets)
        assert cm.distinct_ranks_per_token(N, K, P) == pytest.approx(mean, rel=1e-12), (N, K, P)
    assert cm.distinct_ranks_per_token(64, 4, 8) == pytest.approx(3.3755, abs=1e-4)  # the 3.38 of 4
    assert cm.distinct_ranks_per_token(64, 8, 8) == pytest.approx(5.4326, abs=1e-4)


def test_node_dedup_rows_match_enumeration():
    """node_dedup's rows per token against counting every K-subset of N experts: hop 1 the other nodes holding
    one of them (the home rank is rank 0 of node 0), hop 2 per relay the rows it forwards to the other ranks
    of its node, averaged over the relays (by symmetry every relay forwards the same on average)."""
    for N, K, P, G in ((8, 3, 4, 2), (12, 4, 6, 3), (8, 2, 8, 4), (16, 5, 8, 2)):
        E, n = N // P, P // G
        subsets = list(itertools.combinations(range(N), K))
        inter = sum(len({e // (G * E) for e in s} - {0}) for s in subsets) / len(subsets)
        # relay (m, 0) gets, from each of the n senders, the tokens with an expert on node m, and forwards each to
        # the ranks (m, g > 0) holding one: summed over nodes m and divided by the n relays of local rank 0
        intra = n * sum(len({e // E for e in s if e // E % G != 0}) for s in subsets) / len(subsets) / n
        w = cm.Workload(iterations=1, top_k=K, num_experts=N, hidden=1, expert_hidden=1, tokens=1, ep_size=P,
                        dispatch="node_dedup", node_ranks=G, wire_bytes=1)
        got_inter, got_intra, nodes, ranks = w.node_dedup_bytes("combine", "fwd")
        assert (nodes, ranks) == (n, G)
        assert got_inter == pytest.approx(inter, rel=1e-12), (N, K, P, G)
        assert got_intra == pytest.approx(intra, rel=1e-12), (N, K, P, G)
    # one node: node_dedup is dedup (hop 1 stays on the rank)
    base = dict(iterations=2, top_k=4, num_experts=64, hidden=1024, expert_hidden=704, tokens=4096, ep_size=8)
    one_node = cm.Workload(**base, dispatch="node_dedup", node_ranks=8)
    assert one_node.a2a_bytes("dispatch", "fwd") == pytest.approx(cm.Workload(**base, dispatch="dedup").a2a_bytes(
        "dispatch", "fwd"))
    assert one_node.node_dedup_bytes("dispatch", "fwd")[0] == 0


def test_dedup_and_fp8_bytes_in_the_model():
    prof = toy_profile()
    base = dict(iterations=2, top_k=4, num_experts=64, hidden=1024, expert_hidden=704, tokens=4096, ep_size=8)
    copies, dedup = cm.Workload(**base), cm.Workload(**base, dispatch="dedup")
    fp8 = cm.Workload(**base, dispatch="dedup", dispatch_dtype="fp8")
    k = cm.distinct_ranks_per_token(64, 4, 8)
    off = 4096 * 7 / 8  # tokens' rows to other ranks, per row per token
    slots = 4 * 8  # min(K, N/P) = 4 slots of a float32 gate and a float32 id, in the dispatch only
    assert copies.a2a_bytes("dispatch", "fwd") == pytest.approx(off * 4 * 2048)
    assert dedup.a2a_bytes("combine", "bwd") == pytest.approx(off * k * 2048)
    assert dedup.a2a_bytes("dispatch", "bwd") == pytest.approx(off * k * (2048 + slots))
    assert fp8.a2a_bytes("dispatch", "fwd") == pytest.approx(off * k * (1024 + 4 + slots))
    assert fp8.a2a_bytes("combine", "fwd") == pytest.approx(off * k * 2048)
    assert dedup.bytes_per_step == pytest.approx(2 * (4 * off * k * 2048 + 2 * off * k * slots))
    it_c, it_d = cm.predict_iteration(prof, copies), cm.predict_iteration(prof, dedup)
    assert it_d["combine_fwd"] - it_c["combine_fwd"] == pytest.approx(  # one call each: only bytes differ
        cm.a2a_time(prof, 8, off * k * 2048) - cm.a2a_time(prof, 8, off * 4 * 2048))
