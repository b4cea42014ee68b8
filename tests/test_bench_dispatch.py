"""`coe-dist bench comm` dispatch modes (dispatch: copies | dedup, dispatch_dtype: bf16 | fp8): grid keys and
validation, the bench layer's dedup path against its copies path in one process, and the bytes of every
data all-to-all on 2 ranks against a count made here from the routing tables.

Byte counts are per rank and call, to other ranks only (as `analytic_bytes_per_a2a`): a row of d bf16
elements (2d bytes); fp8 forward dispatch rows d + 4 (e4m3 + a float32 scale); dedup's dispatch rows carry
S = min(K, N/P) slots of a float32 gate and a float32 local expert id (8 bytes each), forward and backward.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from coe_dist.bench import grid
from coe_dist.bench.grid import BenchCase, analytic_bytes_per_a2a, load_grid, stable_seed, validate_case
from coe_dist.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- grid keys and validation

def test_default_mode_keeps_the_key_and_other_modes_are_named():
    assert BenchCase().key == "C2K2N8_d128f128_T256_bf16_P2_forced-balanced"
    assert BenchCase(dispatch="dedup").key == "C2K2N8_d128f128_T256_bf16_P2_forced-balanced_dedup"
    assert BenchCase(dispatch_dtype="fp8").key == "C2K2N8_d128f128_T256_bf16_P2_forced-balanced_fp8"
    assert BenchCase(dispatch="dedup", dispatch_dtype="fp8").key.endswith("_forced-balanced_dedup_fp8")


def test_yaml_grid_expands_the_modes(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("grid:\n  num_experts: 4\n  dispatch: [copies, dedup]\n  dispatch_dtype: bf16,fp8\n")
    cases, _ = load_grid(path)
    assert [(c.dispatch, c.dispatch_dtype) for c in cases] == [
        ("copies", "bf16"), ("copies", "fp8"), ("dedup", "bf16"), ("dedup", "fp8")]


@pytest.mark.parametrize("changes, words", [
    ({"dispatch": "dedupe"}, ["dispatch='dedupe'", "copies, dedup", "--dispatch"]),
    ({"dispatch_dtype": "fp16"}, ["dispatch_dtype='fp16'", "bf16, fp8", "--dispatch-dtype"]),
])
def test_bad_modes_are_refused_naming_key_value_and_fix(changes, words):
    with pytest.raises(ConfigError) as err:
        validate_case(BenchCase(**changes))
    assert all(w in str(err.value) for w in words), str(err.value)


def test_fp8_needs_a_compute_dtype_fp8_wire_supports(monkeypatch):
    validate_case(BenchCase(dtype="fp32", dispatch_dtype="fp8"))  # both bench dtypes are float
    monkeypatch.setattr(grid, "FP8_COMPUTE_DTYPES", ("bf16",))  # a dtype the wire would not take
    with pytest.raises(ConfigError, match=r"dispatch_dtype=fp8 with dtype='fp32'.*set dtype to one of bf16, or "
                                          r"dispatch_dtype to bf16"):
        validate_case(BenchCase(dtype="fp32", dispatch_dtype="fp8"))


def test_command_line_flags_reach_the_grid_and_the_ranks():
    from coe_dist.bench import cli

    args = cli.build_parser().parse_args(["comm", "--dispatch", "copies,dedup", "--dispatch-dtype", "bf16,fp8"])
    argv = cli.comm_argv(args)
    assert argv[:4] == ["--dispatch", "copies,dedup", "--dispatch-dtype", "bf16,fp8"]
    cases, _ = load_grid(None, cli._grid_overrides(args))
    assert {(c.dispatch, c.dispatch_dtype) for c in cases} == {
        ("copies", "bf16"), ("copies", "fp8"), ("dedup", "bf16"), ("dedup", "fp8")}


def test_copies_analytics_count_fp8_rows_and_leave_dedup_to_the_table():
    c = BenchCase(iterations=2, top_k=2, num_experts=8, hidden=32, tokens=64, ep_size=4, dispatch_dtype="fp8")
    off = 64 * 2 * 3 // 4  # copies to other ranks
    assert analytic_bytes_per_a2a(c, "dispatch_fwd") == off * (32 + 4)
    assert analytic_bytes_per_a2a(c, "dispatch_bwd") == analytic_bytes_per_a2a(c, "combine_fwd") == off * 64
    assert analytic_bytes_per_a2a(BenchCase(dispatch="dedup")) is None
    assert grid.expected_bytes_per_step(c) == 2 * off * (3 * 64 + 36)


# ---------------------------------------------------------------- the layer, one process

@pytest.fixture
def one_rank_group():
    """A one-rank gloo world in this process (ep 1: every row goes to this rank through the real exchange)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _run_layer(case: BenchCase, group, x_TD: torch.Tensor, g_TD: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """The layer's output, the gradient of sum(output * g) with respect to x, the phase records."""
    from coe_dist.bench.layer import BenchLayer, _Tape, backward
    from coe_dist.bench.timing import PhaseTimer

    layer = BenchLayer(case, 0, 0, torch.device("cpu"), seed=7, data_rank=0)  # same seed: same weights, tables
    tape, timer = _Tape(), PhaseTimer(torch.device("cpu"))
    out_TD = layer.forward(x_TD, tape, timer, group)
    grads = backward(tape, out_TD, g_TD, timer, group, torch.device("cpu"))
    return out_TD.detach(), grads[id(x_TD)], timer.resolve()


def test_dedup_layer_computes_what_the_copies_layer_computes(one_rank_group, one_thread):
    """fp32, ep 1: a token's K copies become one row with K slots; the fan-out, the gate-weighted sum on the
    expert side and the per-token sum at home give the copies path's output and input gradient (the gates'
    gradients come back through the slots) up to float32 rounding; fp8 rows stay within C x 2^-4 of the
    float path, relative to what the experts add."""
    base = dict(iterations=2, top_k=3, num_experts=8, hidden=32, expert_hidden=32, tokens=32, ep_size=1,
                dtype="fp32")
    x_TD, g_TD = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(0)).unbind()
    ref_TD, ref_dx, ref_records = _run_layer(BenchCase(**base), one_rank_group, x_TD, g_TD)
    got_TD, got_dx, records = _run_layer(BenchCase(**base, dispatch="dedup"), one_rank_group, x_TD, g_TD)
    # Compare what the experts add (out - x, dx - g; ~1e-3 per element): the residual would hide a lost gate.
    torch.testing.assert_close(got_TD - x_TD, ref_TD - x_TD, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got_dx - g_TD, ref_dx - g_TD, rtol=1e-4, atol=1e-8)
    rows = {(r.iteration, r.phase, r.direction): r.rows for r in records}
    assert rows[(0, "dispatch", "fwd")] == 32  # one row per token (all experts on the one rank) ...
    assert rows[(0, "experts", "fwd")] == 32 * 3  # ... fanned out to its K copies
    assert {(p, d) for _, p, d in rows} == {(r.phase, r.direction) for r in ref_records}  # every phase, both ways
    fp8_TD, _, _ = _run_layer(BenchCase(**base, dispatch="dedup", dispatch_dtype="fp8"), one_rank_group, x_TD, g_TD)
    assert 0 < (fp8_TD - ref_TD).norm() <= 2 * 2 ** -4 * (ref_TD - x_TD).norm()


# ---------------------------------------------------------------- bytes on 2 ranks, through the launcher

def _off_rank_rows(case: BenchCase, rank: int, world: int, iteration: int) -> tuple[int, int]:
    """(rows this rank sends to, receives from, other ranks) in the iteration's dispatch, counted from the
    forced-balanced tables of every rank: a row per copy (copies) or per distinct destination rank (dedup)."""
    from coe_dist.bench.layer import BenchLayer

    E = case.local_experts

    def ranks_per_row(r: int) -> list[list[int]]:  # destination rank of every copy of every token of rank r
        table = BenchLayer(case, 0, r, torch.device("cpu"), stable_seed(0, case.key), r).tables[iteration]
        ranks = [[e // E for e in row] for row in table.tolist()]
        return [sorted(set(rs)) for rs in ranks] if case.dispatch == "dedup" else ranks

    sent = sum(dest != rank for rs in ranks_per_row(rank) for dest in rs)
    received = sum(dest == rank for r in range(world) if r != rank for rs in ranks_per_row(r) for dest in rs)
    return sent, received


def _expected_bytes(case: BenchCase, sent: int, received: int) -> dict[tuple[str, str], tuple[int, int]]:
    """(sent, received) bytes of each data all-to-all from the dispatch's off-rank rows (module docstring)."""
    d = case.hidden
    slots = 8 * min(case.top_k, case.local_experts) if case.dispatch == "dedup" else 0
    fwd_row = (d + 4 if case.dispatch_dtype == "fp8" else 2 * d) + slots
    bwd_row = 2 * d + slots  # the gradients travel in the rows' dtype (straight-through fp8)
    return {("dispatch", "fwd"): (sent * fwd_row, received * fwd_row),
            ("dispatch", "bwd"): (received * bwd_row, sent * bwd_row),
            ("combine", "fwd"): (received * 2 * d, sent * 2 * d),
            ("combine", "bwd"): (sent * 2 * d, received * 2 * d)}


def test_two_ranks_bytes_of_every_mode_equal_the_count_from_the_tables(tmp_path):
    """configs/bench/dispatch.yaml (its modes given again as flags, which replace the YAML's), one round."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "coe_dist.bench.cli", "comm", "--nproc", "2", "--grid",
           str(ROOT / "configs/bench/dispatch.yaml"), "--dispatch", "copies,dedup", "--dispatch-dtype", "bf16,fp8",
           "--warmup", "0", "--repeats", "1", "--out", str(out), "--report"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = {s["case"]: BenchCase(**s["config"]) for s in json.loads((out / "summary.json").read_text())["cases"]}
    assert {(c.dispatch, c.dispatch_dtype) for c in cases.values()} == {
        ("copies", "bf16"), ("copies", "fp8"), ("dedup", "bf16"), ("dedup", "fp8")}
    assert {(c.iterations, c.top_k, c.num_experts, c.tokens, c.ep_size, c.routing) for c in cases.values()} == {
        (2, 3, 8, 32, 2, "forced-balanced")}
    with (out / "measurements.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["phase"] in ("dispatch", "combine")]
    assert len(rows) == 4 * 2 * 2 * 4  # cases x ranks x iterations x (dispatch, combine) x (fwd, bwd)
    offrank: dict[tuple, tuple[int, int]] = {}
    for r in rows:
        case, rank, it = cases[r["case"]], int(r["rank"]), int(r["iteration"])
        if (case.key, rank, it) not in offrank:
            offrank[(case.key, rank, it)] = _off_rank_rows(case, rank, 2, it)
        want = _expected_bytes(case, *offrank[(case.key, rank, it)])[(r["phase"], r["direction"])]
        assert (int(r["bytes_sent"]), int(r["bytes_received"])) == want, r
    # The tables give every token 3 consecutive of 8 experts (4 per rank), every start equally often: 6 of 8
    # tokens have 1 to 3 copies on the other rank, 12 copies per 8 tokens; copies sends 48 rows, dedup 24.
    assert {v[0] for (key, _, _), v in offrank.items() if cases[key].dispatch == "copies"} == {48}
    assert {v[0] for (key, _, _), v in offrank.items() if cases[key].dispatch == "dedup"} == {24}
    for case in cases.values():
        if case.dispatch == "copies":  # the grid's analytic count agrees with the table's, fp8 rows included
            assert analytic_bytes_per_a2a(case, "dispatch_fwd") == 48 * (36 if case.dispatch_dtype == "fp8" else 64)
    report = (out / "report.md").read_text()
    assert "| routing | dispatch |" in report and "| dedup+fp8 |" in report and "| copies |" in report
