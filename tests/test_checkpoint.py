"""Checkpoints: resume is exact, layout-independent, atomic, verified; logs and eval read back."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from coe_dist.train import checkpoint

from trainrun import losses, metrics, run_train

# expert_bias_rate on: the routers' expert biases (buffers, not parameters) must come back too.
FAST = ("train.dtype=fp32", "log.log_interval=1", "data.num_documents=400", "log.sample_log=true",
        "train.steps=6", "log.eval_interval=6", "log.eval_batches=2", "moe.expert_bias_rate=0.01")


def sample_log(run_dir) -> dict[int, list[int]]:
    """step -> sorted dataset indices consumed by all ranks together."""
    out: dict[int, list[int]] = {}
    for f in (run_dir / "samples").glob("rank*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).extend(rec["samples"])
    return {s: sorted(v) for s, v in out.items()}


def expert_biases(ckpt) -> dict[str, torch.Tensor]:
    dense = torch.load(ckpt / "dense.pt", weights_only=True)
    return {k: v for k, v in dense.items() if k.endswith("expert_bias")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps at world 2, ep 2, checkpoints at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("straight")
    run_train(2, run_dir, *FAST, "moe.ep_size=2", "log.save_interval=3", "log.keep_last=5")
    return run_dir


def _resume(tmp_path, straight, nproc, *overrides):
    run_train(nproc, tmp_path, *FAST, *overrides, extra=("--resume", str(straight / "checkpoints" / "step_3")))
    return losses(tmp_path)


def test_resume_same_layout_is_bitwise(tmp_path, straight):
    resumed = _resume(tmp_path, straight, 2, "moe.ep_size=2")
    full = losses(straight)
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == full[s] for s in resumed), (resumed, full)  # bitwise: same floats
    biases = [expert_biases(run / "checkpoints" / "step_6") for run in (straight, tmp_path)]
    assert biases[0] and sorted(biases[0]) == sorted(biases[1])
    assert all(torch.equal(biases[0][k], biases[1][k]) for k in biases[0])
    moved = expert_biases(straight / "checkpoints" / "step_3")  # 3 steps of +-0.01 or 0 each, not all 0
    assert all(set((b / 0.01).round().tolist()) <= {-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0} for b in moved.values())
    assert any(b.abs().sum() > 0 for b in moved.values())
    assert any(not torch.equal(moved[k], biases[0][k]) for k in moved)
    seen = sample_log(straight)
    again = sample_log(tmp_path)
    assert all(again[s] == seen[s] for s in (4, 5, 6))
    # No sample twice within an epoch's worth of steps, none skipped: steps are disjoint and contiguous.
    flat = [i for s in range(1, 7) for i in seen[s]]
    assert len(flat) == len(set(flat))


def test_resume_ep2_checkpoint_at_ep1(tmp_path, straight):
    resumed = _resume(tmp_path, straight, 1, "moe.ep_size=1", "train.grad_accum=2")
    full = losses(straight)
    for s in (4, 5, 6):
        assert abs(resumed[s] - full[s]) / full[s] < 1e-5, (s, resumed[s], full[s])
    assert sample_log(tmp_path)[5] == sample_log(straight)[5]


def test_resume_ep2_checkpoint_at_ep4_world4(tmp_path, straight):
    resumed = _resume(tmp_path, straight, 4, "moe.ep_size=4", "train.micro_batch_size=4")
    full = losses(straight)
    for s in (4, 5, 6):
        assert abs(resumed[s] - full[s]) / full[s] < 1e-5, (s, resumed[s], full[s])
    assert sample_log(tmp_path)[6] == sample_log(straight)[6]


def test_interrupted_save_is_skipped(tmp_path):
    """SIGKILL between writing the step-4 checkpoint and renaming it: resume auto warns and uses step 2."""
    common = (*FAST, "moe.ep_size=1", "train.steps=4", "log.save_interval=2")
    proc = run_train(1, tmp_path, *common, check=False, env={"COE_DIST_FAULT": "checkpoint.before_rename@step4:kill"})
    assert proc.returncode != 0
    root = tmp_path / "checkpoints"
    assert (root / "step_2" / "meta.json").is_file() and not (root / "step_4").exists()
    assert (root / "latest").read_text().strip() == "step_2"
    tmp = next(root.glob(".tmp-step_4-*"))
    proc = run_train(1, tmp_path, *common, extra=("--resume", "auto"))
    assert f"skipping incomplete checkpoint {tmp}" in proc.stdout
    assert "resumed from" in proc.stdout and "step_2" in proc.stdout
    assert (root / "step_4" / "meta.json").is_file()


def test_corrupted_checkpoint_falls_back(tmp_path, straight):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for step in (3, 6):
        os.system(f"cp -r {straight}/checkpoints/step_{step} {run_dir}/checkpoints/")
    bad = run_dir / "checkpoints" / "step_6" / "experts-1.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    bad.write_bytes(bytes(data))
    warnings: list[str] = []
    found = checkpoint.newest_verified(run_dir, warn=warnings.append)[0]
    assert found == run_dir / "checkpoints" / "step_3"
    assert any(str(bad) in w and "checksum" in w for w in warnings), warnings
    with pytest.raises(checkpoint.CheckpointError, match="experts-1.pt: checksum mismatch"):
        checkpoint.verify(run_dir / "checkpoints" / "step_6")


@pytest.mark.parametrize("resume", ["auto", "step_3"])
def test_resume_hashes_each_file_once(tmp_path, straight, monkeypatch, resume):
    """Finding the newest good checkpoint verifies it and load trusts that: multi-GB files are hashed once."""
    import collections
    import shutil
    import types

    import torch

    from coe_dist.config import config_from_dict
    from coe_dist.launcher import ProcessEnv
    from coe_dist.model import CoETransformer
    from coe_dist.train.loop import _maybe_resume

    shutil.copytree(straight / "checkpoints", tmp_path / "checkpoints")
    for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):  # not a restart: --resume decides
        monkeypatch.delenv(var, raising=False)
    saved = json.loads((tmp_path / "checkpoints" / "step_6" / "meta.json").read_text())
    cfg = config_from_dict(saved["config"], ["moe.ep_size=1"])
    model = CoETransformer(cfg.model, cfg.moe, seed=cfg.train.seed)
    engine = types.SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters()), lr_scheduler=None)  # ZeRO 0
    data = types.SimpleNamespace(train=types.SimpleNamespace(load_state_dict=lambda state: None))
    penv = ProcessEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1", master_port=0, source="single")
    hashed: collections.Counter[str] = collections.Counter()
    sha256 = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda path: hashed.update([path.name]) or sha256(path))

    arg = resume if resume == "auto" else str(tmp_path / "checkpoints" / resume)
    step = _maybe_resume(arg, tmp_path, model, engine, data, penv, types.SimpleNamespace(skipped_total=0))
    assert step == (6 if resume == "auto" else 3)
    assert hashed == {"dense.pt": 1, "experts-0.pt": 1, "experts-1.pt": 1}


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/coe-dist-pwned",))


def test_crafted_checkpoint_is_refused(tmp_path, straight):
    """A dense.pt that would run code when unpickled is refused by weights_only loading."""
    ckpt = tmp_path / "step_3"
    os.system(f"cp -r {straight}/checkpoints/step_3 {ckpt}")
    evil = ckpt / "dense.pt"
    with evil.open("wb") as f:
        pickle.dump({"param/embed.weight": _Exploit()}, f)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["dense.pt"] = checkpoint._sha256(evil)  # the attacker also fixes the checksum
    (ckpt / "meta.json").write_text(json.dumps(meta))
    from coe_dist.train.checkpoint import load_model

    with pytest.raises(pickle.UnpicklingError):
        load_model(ckpt)
    assert not os.path.exists("/tmp/coe-dist-pwned")


def test_tensorboard_and_metrics_jsonl_agree(straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(straight / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    wanted = ["loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "valid/loss", "valid/perplexity",
              "moe/layer0/iter1/load_imbalance", "moe/layer1/iter0/router_entropy", "moe/layer0/chain_diversity",
              "comm/layer0/iter0/dispatch_fwd/seconds", "comm/layer1/iter1/combine_bwd/bytes_sent"]
    for tag in wanted:
        assert tag in tags["scalars"], tag
    assert "moe/layer0/iter0/expert_load" in tags["histograms"]
    hist = acc.Histograms("moe/layer0/iter0/expert_load")[-1].histogram_value
    # Expert loads of the whole (2-rank) micro-batch: 2 ranks x 8 sequences x 128 tokens x top-2 copies.
    assert sum(hist.bucket) == 2 * 8 * 128 * 2
    records = {m["step"]: m for m in metrics(straight) if "lm_loss" in m}
    for event in acc.Scalars("lm_loss"):
        assert abs(event.value - records[event.step]["lm_loss"]) <= 1e-6 * abs(event.value)
    assert {e.step for e in acc.Scalars("lm_loss")} == set(range(1, 7))


def test_eval_of_ep2_checkpoint_in_one_process_matches_training(straight, capsys):
    from coe_dist.cli import main

    assert main(["eval", "--checkpoint", str(straight), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    trained = [m["valid/loss"] for m in metrics(straight) if "valid/loss" in m][-1]
    assert result["checkpoint"].endswith("step_6")
    assert abs(result["valid_loss"] - trained) / trained < 1e-5


def test_generate_is_greedy_deterministic_and_of_the_requested_length(straight, capsys):
    """Greedy decoding from the ep-2 checkpoint: exactly the requested number of new tokens (no end-of-document
    stop), the same twice, and each new token the argmax of one forward pass over prompt + continuation (an
    independent check of the decoding loop); the CLI prints the prompt and that continuation."""
    from coe_dist.cli import main
    from coe_dist.data.tokenizer import load_tokenizer
    from coe_dist.train.inference import greedy, load_model

    prompt, n = "Tom has", 8
    cfg, model, _ = load_model(straight)
    tok = load_tokenizer(cfg.data.tokenizer)
    ids = tok.encode(prompt)
    new = greedy(model, ids, n, eod=None)
    assert len(new) == n
    assert greedy(model, ids, n, eod=None) == new
    with torch.no_grad():
        logits = model(torch.tensor([ids + new])).logits[0]
    assert [int(logits[len(ids) - 1 + i].argmax()) for i in range(n)] == new
    # The CLI stops early only at the end-of-document id, and only where greedy decoding would produce it.
    stopped = new.index(tok.eod) if tok.eod in new else n
    for _ in range(2):
        assert main(["generate", "--checkpoint", str(straight), "--prompt", prompt, "--max-new-tokens", str(n)]) == 0
        assert capsys.readouterr().out == prompt + tok.decode(new[:stopped]) + "\n"


def test_weights_only_load_used():
    """Every torch.load in the package passes weights_only=True."""
    import pathlib

    root = pathlib.Path(checkpoint.__file__).parents[1]
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{n}"



def test_reference_layout_export_import_roundtrip(tmp_path, straight, capsys):
    """export -> import into a differently initialised model reproduces every CoE layer's outputs."""
    import torch

    from coe_dist.cli import main
    from coe_dist.train.checkpoint import load_model
    from coe_dist.train.reference_layout import import_reference

    out = tmp_path / "exported"
    assert main(["convert", "export", "--checkpoint", str(straight), "--output", str(out)]) == 0
    ref = json.loads((out / "config.json").read_text())
    assert (ref["n_routed_experts"], ref["num_experts_per_tok"], ref["inner_iter"], ref["use_igate"]) == (8, 2, 2, True)
    cfg, trained, _ = load_model(straight)
    from coe_dist.model import CoETransformer

    fresh = CoETransformer(cfg.model, cfg.moe, seed=cfg.train.seed + 1)
    u = torch.randn(2, 16, cfg.model.hidden_size)
    before = [torch.equal(a(u)[0], b(u)[0]) for a, b in zip(trained.coe_layers(), fresh.coe_layers(), strict=True)]
    assert not any(before)
    assert import_reference(fresh, cfg.moe, out) == 2
    # The run balanced with moe.expert_bias_rate; the reference layout has no place for the biases (the export
    # says so): they travel by hand here, everything else through the files.
    assert cfg.moe.expert_bias_rate > 0 and "expert biases" in capsys.readouterr().out
    for a, b in zip(trained.coe_layers(), fresh.coe_layers(), strict=True):
        for ra, rb in zip(a.routers, b.routers, strict=True):
            rb.expert_bias.copy_(ra.expert_bias)
    for a, b in zip(trained.coe_layers(), fresh.coe_layers(), strict=True):
        ha, auxa = a(u)
        hb, auxb = b(u)
        assert torch.equal(ha, hb) and torch.equal(auxa, auxb)
    bad = cfg.moe.__class__(**{**cfg.moe.__dict__, "top_k": 3})
    with pytest.raises(Exception, match="num_experts_per_tok=2"):
        import_reference(fresh, bad, out)


def test_replacement_moves_experts_and_keeps_the_function(tmp_path, straight, capsys):
    """moe.placement on a resume: every expert, its router rows, expert biases and Adam moments move to the
    plan's slots (here: all reversed, so every expert changes rank); the loss curve matches the straight run as
    a resume at another layout does, and the checkpoint records the placement."""
    from coe_dist.cli import main

    plan_file = tmp_path / "plan.json"
    assert main(["placement", "plan", "--checkpoint", str(straight), "--output", str(plan_file)]) == 0
    printed = capsys.readouterr().out
    assert "rows per token" in printed and "busiest rank's rows / mean" in printed
    plan = json.loads(plan_file.read_text())
    assert plan["ep_size"] == 2 and sorted(plan["layers"]) == ["0", "1"]
    plan["layers"] = {k: list(reversed(range(8))) for k in plan["layers"]}
    plan_file.write_text(json.dumps(plan))
    resumed = _resume(tmp_path / "run", straight, 2, "moe.ep_size=2", f"moe.placement={plan_file}")
    full = losses(straight)
    assert sorted(resumed) == [4, 5, 6]
    for s in resumed:
        assert abs(resumed[s] - full[s]) / full[s] < 1e-5, (s, resumed[s], full[s])
    moved, kept = tmp_path / "run" / "checkpoints" / "step_6", straight / "checkpoints" / "step_6"
    assert json.loads((moved / "meta.json").read_text())["placement"] == plan["layers"]
    for name, bias in expert_biases(kept).items():  # slot s now holds expert 7 - s
        assert torch.allclose(expert_biases(moved)[name], bias.flip(0), atol=1e-6), name
    # Read back in order (eval, export): the same model as the straight run's.
    from coe_dist.train.checkpoint import load_model

    (_, a, _), (_, b, _) = load_model(kept), load_model(moved)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (a(tokens).logits - b(tokens).logits).abs().max() < 1e-4


def test_automatic_replacement_at_saves_keeps_the_loss_curve(tmp_path, straight):
    """moe.replace_interval=3: at the step-3 save the run plans a placement from its own co-selection and reloads
    into it; the curve matches the straight run's (bitwise before, as a layout change after)."""
    proc = run_train(2, tmp_path, *FAST, "moe.ep_size=2", "log.save_interval=3", "log.keep_last=5",
                     "moe.replace_interval=3")
    assert "step 3: experts re-placed by co-selection" in proc.stdout
    replaced, full = losses(tmp_path), losses(straight)
    assert all(replaced[s] == full[s] for s in (1, 2, 3))
    for s in (4, 5, 6):
        assert abs(replaced[s] - full[s]) / full[s] < 1e-5, (s, replaced[s], full[s])
    placement = json.loads((tmp_path / "checkpoints" / "step_6" / "meta.json").read_text())["placement"]
    assert placement and all(order != list(range(8)) for order in placement.values())  # experts did move
    assert json.loads((tmp_path / "checkpoints" / "step_3" / "meta.json").read_text())["placement"] == {}
