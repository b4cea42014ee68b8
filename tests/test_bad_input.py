"""Bad input, tried systematically: configs, CLI arguments, environment variables, Slurm node lists, data
files, run directories, checkpoints and a full disk. Each fails fast with exit code 2 (configuration) or 1
(runtime), prints one line naming the thing and the fix (no traceback unless --debug), and leaves nothing
that a later run would take for valid output.

Cases that fail before any process group starts run in this process through `coe_dist.cli.main`; the ones
that need torch.distributed (data, checkpoints, disk full) run in one worker process, one after the other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coe_dist.cli import main
from coe_dist.launcher import LaunchError, discover

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
               "TORCHELASTIC_RESTART_COUNT", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
               "SLURM_STEP_NUM_TASKS", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID",
               "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK", "PMIX_RANK",
               "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "COE_DIST_FAULT")
SLURM_TASK = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
              "SLURM_JOB_ID": "77"}

# (id, files to write {name: text}, argv after "train" ({tmp} = the case's directory), env, exit code,
#  words the one-line message must contain)
CASES = [
    # ---- configuration files and --set values: exit 2
    ("yaml-not-mapping", {"c.yaml": "- 1\n- 2\n"}, ["--config", "{tmp}/c.yaml"], {}, 2, ["c.yaml", "mapping"]),
    ("yaml-section-list", {"c.yaml": "train: [1, 2]\n"}, ["--config", "{tmp}/c.yaml"], {}, 2,
     ["section 'train'", "mapping"]),
    ("yaml-wrong-type", {"c.yaml": "train:\n  steps: [10]\n"}, ["--config", "{tmp}/c.yaml"], {}, 2,
     ["train.steps", "integer"]),
    ("yaml-unknown-section", {"c.yaml": "optimizer:\n  lr: 1\n"}, ["--config", "{tmp}/c.yaml"], {}, 2,
     ["optimizer", "optim"]),
    ("yaml-unknown-key", {"c.yaml": "log:\n  safe_interval: 5\n"}, ["--config", "{tmp}/c.yaml"], {}, 2,
     ["log.safe_interval", "save_interval"]),
    ("missing-config", {}, ["--config", "{tmp}/nope.yaml"], {}, 2, ["nope.yaml", "does not exist"]),
    ("negative-micro-batch", {}, ["--set", "train.micro_batch_size=-8"], {}, 2, ["train.micro_batch_size=-8", "> 0"]),
    ("negative-grad-accum", {}, ["--set", "train.grad_accum=-1"], {}, 2, ["train.grad_accum=-1"]),
    ("zero-keep-last", {}, ["--set", "log.keep_last=0"], {}, 2, ["log.keep_last=0", "> 0"]),
    ("negative-save-interval", {}, ["--set", "log.save_interval=-5"], {}, 2, ["log.save_interval=-5", ">= 0"]),
    ("negative-documents", {}, ["--set", "data.num_documents=-1"], {}, 2, ["data.num_documents=-1"]),
    ("valid-fraction-1", {}, ["--set", "data.valid_fraction=1"], {}, 2, ["data.valid_fraction=1.0", "(0, 1)"]),
    ("non-divisible-experts", {}, ["--set", "moe.num_experts=6", "--set", "moe.ep_size=4"], {}, 2,
     ["moe.num_experts=6", "moe.ep_size=4", "divides"]),
    ("heads-not-dividing", {}, ["--set", "model.num_heads=3"], {}, 2, ["model.num_heads=3", "hidden_size=128"]),
    ("betas-wrong-length", {}, ["--set", "optim.betas=[0.9]"], {}, 2, ["optim.betas", "2 numbers"]),
    ("float-for-int", {}, ["--set", "train.steps=1.5"], {}, 2, ["train.steps", "integer"]),
    ("bool-for-float", {}, ["--set", "optim.lr=true"], {}, 2, ["optim.lr", "number"]),
    ("zero-timeout", {}, ["--set", "parallel.timeout_s=0"], {}, 2, ["parallel.timeout_s=0", "> 0"]),
    ("bad-backend", {}, ["--set", "parallel.backend=mpi"], {}, 2, ["parallel.backend", "gloo"]),
    ("missing-deepspeed-json", {}, ["--set", "parallel.deepspeed_config={tmp}/ds.json"], {}, 2,
     ["parallel.deepspeed_config", "ds.json", "does not exist"]),
    ("bad-nan-policy", {}, ["--set", "train.nan_policy=ignore"], {}, 2, ["train.nan_policy", "stop, skip"]),
    ("zero-max-consecutive-nan", {}, ["--set", "train.max_consecutive_nan=0"], {}, 2,
     ["train.max_consecutive_nan=0", ">= 1"]),
    ("skip-needs-zero-1-2", {}, ["--set", "train.nan_policy=skip", "--set", "parallel.zero_stage=0"], {}, 2,
     ["train.nan_policy=skip", "zero_stage=0", "nan_policy=stop"]),
    ("collapse-share-above-1", {}, ["--set", "log.collapse_share=1.5"], {}, 2, ["log.collapse_share=1.5", "(0, 1]"]),
    ("zero-collapse-steps", {}, ["--set", "log.collapse_steps=0"], {}, 2, ["log.collapse_steps=0", ">= 1"]),
    ("empty-run-dir", {}, ["--set", "log.run_dir="], {}, 2, ["log.run_dir", "expected a string"]),
    # ---- command line: exit 2
    ("set-without-equals", {}, ["--set", "train.steps"], {}, 2, ["train.steps", "section.key=value"]),
    ("set-two-dots", {}, ["--set", "a.b.c=1"], {}, 2, ["a.b.c=1", "one dot"]),
    ("nproc-not-multiple-of-ep", {}, ["--nproc", "3", "--set", "moe.ep_size=2"], {}, 2,
     ["moe.ep_size=2", "world size 3"]),
    # ---- launcher environment: exit 1
    ("rank-not-int", {}, [], {"RANK": "one", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, 1,
     ["RANK='one'", "integer"]),
    ("rank-outside-world", {}, [], {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, 1,
     ["RANK=2", "0..1"]),
    ("world-without-master", {}, [], {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, 1,
     ["MASTER_ADDR", "WORLD_SIZE=2"]),
    ("bad-master-port", {}, [], {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "99999"}, 1,
     ["MASTER_PORT='99999'", "1-65535"]),
    ("torchrun-missing-rank", {}, [], {"WORLD_SIZE": "2", "MASTER_ADDR": "h"}, 1, ["RANK is not set", "torchrun"]),
    ("slurm-bracket-never-closed", {}, [], {**SLURM_TASK, "SLURM_JOB_NODELIST": "node[01-04"}, 1,
     ["SLURM_JOB_NODELIST='node[01-04'", "never closed"]),
    ("slurm-range-backwards", {}, [], {**SLURM_TASK, "SLURM_JOB_NODELIST": "node[09-02]"}, 1,
     ["node[09-02]", "backwards"]),
    ("slurm-empty-host", {}, [], {**SLURM_TASK, "SLURM_JOB_NODELIST": ",node1"}, 1, ["empty host name"]),
    ("slurm-bad-range", {}, [], {**SLURM_TASK, "SLURM_JOB_NODELIST": "gpu[1-x]"}, 1, ["bad range '1-x'"]),
    ("slurm-nested-bracket", {}, [], {**SLURM_TASK, "SLURM_JOB_NODELIST": "n[1-[2]]"}, 1, ["nested '['"]),
    ("slurm-localid-not-int", {}, [], {**SLURM_TASK, "SLURM_LOCALID": "x", "SLURM_JOB_NODELIST": "n1"}, 1,
     ["SLURM_LOCALID='x'", "integer"]),
    ("fault-spec-malformed", {}, [], {"COE_DIST_FAULT": "train.step@step5:explode"}, 1,
     ["COE_DIST_FAULT", "unknown action 'explode'"]),
    # ---- run directory under a regular file: exit 2 (more path cases in test_misuse.py)
    ("run-dir-under-a-file", {"afile": "x"}, ["--set", "log.run_dir={tmp}/afile/run"], {}, 2,
     ["log.run_dir=", "afile/run", "regular file, not a directory"]),
]


def _argv(argv: list[str], tmp: Path) -> list[str]:
    args = ["train", "--config", str(TINY), "--set", f"log.run_dir={tmp}/run", "--set", "moe.ep_size=1"]
    return args + [a.replace("{tmp}", str(tmp)) for a in argv]


def _nothing_valid_written(tmp: Path) -> None:
    """No checkpoint, no `latest`, no metrics a later run would pick up."""
    ckpts = list(tmp.rglob("step_*")) + list(tmp.rglob("latest")) + list(tmp.rglob("metrics.jsonl"))
    assert not ckpts, ckpts


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_with_one_line(case, tmp_path, monkeypatch, capsys):
    _id, files, argv, env, code, words = case
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for name, text in files.items():
        (tmp_path / name).write_text(text)

    def no_start(*a, **k):
        raise AssertionError("bad input got as far as starting torch.distributed")

    import coe_dist.train.loop as loop

    monkeypatch.setattr(loop, "init_distributed", no_start)
    assert main(_argv(argv, tmp_path)) == code
    err = capsys.readouterr().err
    kind = "config error" if code == 2 else "error"
    assert err.startswith(f"coe-dist: {kind}: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    _nothing_valid_written(tmp_path)
    if code == 2:
        assert not (tmp_path / "run").exists()  # a config error writes nothing at all


def test_debug_adds_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COE_DIST_FAULT", "x:explode")
    for var in ("RANK", "WORLD_SIZE", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    assert main([*_argv([], tmp_path), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("coe-dist: error: COE_DIST_FAULT")


@pytest.mark.parametrize("argv,words", [
    (["train", "--nproc", "two"], ["--nproc", "'two' is not a whole number"]),
    (["train", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["trian"], ["invalid choice: 'trian'"]),
])
def test_bad_arguments_exit_2(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.rstrip().splitlines()[-1]  # argparse: the usage, then one line
    assert last.startswith("coe-dist") and ": error: " in last, err
    for word in words:
        assert word in err


@pytest.mark.parametrize("nodelist,words", [
    ("node[1-3", ["never closed"]), ("node]", ["without '['"]), ("a b", ["white space"]),
    ("node[3-1]", ["backwards"]), ("n[]", ["bad range ''"]), ("", ["is not set"]),
])
def test_malformed_nodelists_name_the_variable(nodelist, words):
    env = {**SLURM_TASK, "SLURM_STEP_NODELIST": nodelist}
    with pytest.raises(LaunchError) as info:
        discover(env, use_mpi=False)
    message = str(info.value)
    assert "SLURM_STEP_NODELIST" in message or "SLURM_JOB_NODELIST" in message, message
    for word in words:
        assert word in message, message


# ---------------------------------------------------------------- cases that need torch.distributed

WORKER = r'''
import contextlib, io, json, os, sys
from pathlib import Path
from coe_dist.cli import main
sys.path.insert(0, "tests")
from trainrun import call_main

tmp, config = Path(sys.argv[1]), sys.argv[2]
FAST = ["--set", "train.dtype=fp32", "--set", "data.num_documents=200", "--set", "moe.ep_size=1",
        "--set", "train.steps=1", "--set", "log.eval_batches=0", "--set", "log.tensorboard=false",
        "--set", "train.micro_batch_size=2", "--set", "data.cache_dir=" + str(tmp / "cache")]

def run(name, argv, env=None, command="train"):
    run_dir = tmp / name
    os.environ.pop("COE_DIST_FAULT", None)
    os.environ.update(env or {})
    code, _out, err = call_main([command, "--config", config, "--set", f"log.run_dir={run_dir}", *FAST, *argv])
    files = sorted(str(p.relative_to(tmp)) for p in run_dir.rglob("*")) if run_dir.exists() else []
    lines = [l for l in err.splitlines() if l.startswith(("coe-dist", "Traceback"))]
    print(json.dumps({"name": name, "code": code, "lines": lines, "stderr": err[-2000:],
                      "files": files}), flush=True)

# data files
(tmp / "garbage.idx").write_bytes(b"not an index at all")
(tmp / "garbage.bin").write_bytes(b"")
(tmp / "empty.jsonl").write_text("")
(tmp / "short.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
with contextlib.redirect_stdout(io.StringIO()):
    main(["preprocess", "--input", str(tmp / "empty.jsonl"), "--output", str(tmp / "empty")])
    main(["preprocess", "--input", str(tmp / "short.jsonl"), "--output", str(tmp / "short")])
run("missing-dataset", ["--set", f"data.dataset={tmp}/nowhere/corpus"])
run("garbage-index", ["--set", f"data.dataset={tmp}/garbage"])
run("empty-dataset", ["--set", f"data.dataset={tmp}/empty"])
run("too-short-dataset", ["--set", f"data.dataset={tmp}/short"])
run("tokens-out-of-vocab", ["--set", "model.vocab_size=64"])
run("missing-tokenizer", ["--set", f"data.tokenizer={tmp}/nowhere/tokenizer.json"])
run("resume-missing", ["--resume", str(tmp / "nowhere" / "step_5")])
run("disk-full-on-save", [], {"COE_DIST_FAULT": "checkpoint.before_rename:raise=ENOSPC"})
# a good checkpoint, then resume it into another model, and resume a truncated copy of it
run("good", [])
good = tmp / "good" / "checkpoints" / "step_1"
run("resume-other-model", ["--resume", str(good), "--set", "model.hidden_size=64"])
import shutil
shutil.copytree(good, tmp / "cut" / "step_1")
dense = tmp / "cut" / "step_1" / "dense.pt"
dense.write_bytes(dense.read_bytes()[: dense.stat().st_size // 2])
run("resume-truncated", ["--resume", str(tmp / "cut" / "step_1")])
'''

# name -> (exit code, words of the one line)
WORKER_CASES = {
    "missing-dataset": (1, ["nowhere/corpus", "does not exist"]),
    "garbage-index": (1, ["garbage.idx", "not a megatron-core .idx"]),
    "empty-dataset": (1, ["empty", "does not exist"]),  # preprocess refuses to write 0 documents
    "too-short-dataset": (1, ["short", "train.seq_len"]),
    "tokens-out-of-vocab": (1, ["token id", "model.vocab_size=64", "set model.vocab_size >="]),
    "missing-tokenizer": (1, ["nowhere/tokenizer.json"]),
    "resume-missing": (1, ["nowhere/step_5", "no such checkpoint directory", "--resume auto"]),
    "disk-full-on-save": (1, ["could not write checkpoint step_1", "No space left on device", "free space"]),
    "resume-other-model": (2, ["another model shape", "model.hidden_size=64 (checkpoint: 128)"]),
    "resume-truncated": (1, ["dense.pt", "checksum mismatch", "--resume auto"]),
}


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-runtime")
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}, "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp), str(TINY)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            results[rec["name"]] = rec
    assert "resume-truncated" in results, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, results


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", list(WORKER_CASES))
def test_bad_data_checkpoints_and_full_disk(name, worker_results):
    tmp, results = worker_results
    code, words = WORKER_CASES[name]
    rec = results[name]
    assert rec["code"] == code, rec
    kind = "config error" if code == 2 else "error"
    assert len(rec["lines"]) == 1 and rec["lines"][0].startswith(f"coe-dist: {kind}: "), rec
    for word in words:
        assert word in rec["lines"][0], (word, rec["lines"][0])
    # Nothing a later run would resume from: no checkpoint, complete or partial, no `latest`.
    assert not [f for f in rec["files"] if "step_" in f or f.endswith("latest")], rec["files"]


def test_good_run_in_the_worker_did_write(worker_results):
    """The control case: the same settings without the fault write a checkpoint."""
    tmp, results = worker_results
    assert results["good"]["code"] == 0, results["good"]
    assert "checkpoints/step_1/meta.json" in " ".join(results["good"]["files"])
