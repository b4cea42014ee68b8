"""Off the tested path: the mistakes of a user running a long job, and a file system that really fills up.

    run dir      a fresh start onto another run's checkpoints is refused (they stay byte-identical);
                 --overwrite replaces them; a second run on a locked run dir is refused naming the holder,
                 a lock left by a killed run is said and taken over; `~` is expanded; paths under files
    full disk    real tmpfs mounts (size=...) for checkpoints, metrics.jsonl, TensorBoard events, the data
                 cache, stopped.json, config.yaml and the lock: one line, no partial file, `latest` kept
    resume       another model shape is refused naming each key and both values; train.steps below the
                 checkpoint's step is an error; other changes of how the run trains are allowed and named
    validation   non-finite numbers, seeds, memory that does not exist, a missing device, DeepSpeed JSON
                 that is not an object, non-UTF-8 files, YAML errors, duplicate keys, empty prompts, 0
                 documents, .idx pointers past the .bin; a checkpoint with non-finite weights is never saved

Most cases run one after the other in ONE worker process through `coe_dist.cli.main` (what `coe-dist` runs),
so torch, DeepSpeed and megatron are imported once; the concurrent-run case uses real `coe-dist` processes.
Each case asserts the exit code, exactly one `coe-dist` line on stderr with the words that name the problem,
no traceback, and what is left on disk. docs/reliability.md ("Off the tested path") lists the promises.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainrun import ROOT, TINY

# A small model and two steps: every case here is about what happens around training, not training.
FAST = ["train.dtype=fp32", "data.num_documents=200", "moe.ep_size=1", "train.steps=2", "log.eval_batches=0",
        "log.tensorboard=false", "train.micro_batch_size=2", "train.seq_len=32", "model.max_seq_len=32",
        "model.hidden_size=32", "model.num_layers=1", "model.ffn_hidden_size=64", "moe.num_experts=4",
        "moe.expert_hidden_size=32", "log.save_interval=1", "log.log_interval=1"]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "SLURM_STEP_ID", "SLURM_PROCID",
               "SLURM_RESTART_COUNT", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "COE_DIST_FAULT")

# (name, argv ({tmp} = the module's directory, {run} = the case's run dir, {good} = a finished 2-step run
#  with step_1 and step_2), exit code, words of the one line, what must hold on disk)
#  disk: "good" = the good run's files byte-identical; "nothing" = the case's run dir holds no checkpoint,
#  latest or metrics; "ckpt" / "stopped" / "cache" / ...: a check function below
CASES = [
    # ---- 1. a run directory belongs to one run
    ("fresh-start-on-checkpoints", ["--set", "log.run_dir={good}"], 2,
     ["log.run_dir=", "already holds checkpoints", "step_2", "--resume auto", "log.run_dir=NEW_DIR", "--overwrite"],
     "good"),
    ("resume-none-on-checkpoints", ["--set", "log.run_dir={good}", "--resume", "none"], 2,
     ["already holds checkpoints", "step_2"], "good"),
    ("nproc-2-fresh-start-on-checkpoints", ["--set", "log.run_dir={good}", "--nproc", "2"], 2,
     ["already holds checkpoints", "step_2", "--overwrite"], "good"),
    ("tilde-run-dir-on-checkpoints", ["--set", "log.run_dir=~/good"], 2, ["'{tmp}/good'", "step_2"], "good"),
    ("resume-empty", ["--resume", ""], 2, ["--resume ''", "empty", "--resume auto"], "nothing"),
    ("resume-blank", ["--resume", "  "], 2, ["--resume ''", "empty"], "nothing"),
    ("overwrite-with-resume", ["--overwrite", "--resume", "auto"], 2, ["--overwrite with --resume auto"], "nothing"),
    ("run-dir-under-file", ["--set", "log.run_dir={tmp}/afile/run"], 2,
     ["log.run_dir=", "afile", "regular file, not a directory"], "nothing"),
    ("cache-dir-under-file", ["--set", "data.cache_dir={tmp}/afile/cache"], 2,
     ["data.cache_dir=", "afile", "regular file"], "nothing"),
    ("dataset-under-file", ["--set", "data.dataset={tmp}/afile/corpus"], 2, ["data.dataset=", "regular file"],
     "nothing"),
    ("tokenizer-under-file", ["--set", "data.tokenizer={tmp}/afile/tok.json"], 2,
     ["data.tokenizer=", "regular file"], "nothing"),
    ("tilde-config", ["--config", "~/dup-key.yaml"], 2, ["dup-key.yaml", "appears twice"], "nothing"),
    ("tilde-resume-path", ["--resume", "~/good/checkpoints/step_2", "--set", "moe.iterations=1"], 2,
     ["{tmp}/good/checkpoints/step_2", "moe.iterations=1 (checkpoint: 2)"], "good"),
    # ---- 4. resume checks the model's shape, and train.steps
    ("resume-fewer-iterations", ["--set", "log.run_dir={good}", "--resume", "auto", "--set", "moe.iterations=1",
                                 "--set", "train.steps=4"], 2,
     ["step_2", "another model shape", "moe.iterations=1 (checkpoint: 2)"], "good"),
    ("resume-more-layers", ["--set", "log.run_dir={good}", "--resume", "auto", "--set", "model.num_layers=2",
                            "--set", "train.steps=4"], 2, ["model.num_layers=2 (checkpoint: 1)"], "good"),
    ("resume-other-experts", ["--set", "log.run_dir={good}", "--resume", "auto", "--set", "moe.num_experts=8",
                              "--set", "train.steps=4"], 2, ["moe.num_experts=8 (checkpoint: 4)"], "good"),
    ("resume-no-shared-expert", ["--set", "log.run_dir={good}", "--resume", "auto",
                                 "--set", "moe.num_shared_experts=0", "--set", "train.steps=4"], 2,
     ["moe.num_shared_experts=0 (checkpoint: 1)"], "good"),
    ("resume-other-hidden", ["--set", "log.run_dir={good}", "--resume", "auto", "--set", "model.hidden_size=64",
                             "--set", "train.steps=4"], 2, ["model.hidden_size=64 (checkpoint: 32)"], "good"),
    ("resume-other-expert-width", ["--set", "log.run_dir={good}", "--resume", "auto",
                                   "--set", "moe.expert_hidden_size=64", "--set", "train.steps=4"], 2,
     ["moe.expert_hidden_size=64 (checkpoint: 32)"], "good"),
    ("resume-other-vocab", ["--resume", "{good}/checkpoints/step_1", "--set", "model.vocab_size=512"], 2,
     ["step_1", "model.vocab_size=512 (checkpoint: 264)"], "nothing"),
    ("resume-two-keys-differ", ["--resume", "{good}/checkpoints/step_2", "--set", "moe.iterations=3",
                                "--set", "model.ffn_hidden_size=128"], 2,
     ["model.ffn_hidden_size=128 (checkpoint: 64)", "moe.iterations=3 (checkpoint: 2)"], "nothing"),
    ("resume-nproc-2-other-shape", ["--set", "log.run_dir={good}", "--resume", "auto", "--nproc", "2",
                                    "--set", "moe.iterations=1", "--set", "train.steps=4"], 2,
     ["moe.iterations=1 (checkpoint: 2)"], "good"),
    ("resume-steps-below-checkpoint", ["--set", "log.run_dir={good}", "--resume", "auto", "--set", "train.steps=1"],
     2, ["train.steps=1", "below the step of", "step_2", "(2)"], "good"),
    # ---- 6. validation catches what fails later
    ("lr-inf", ["--set", "optim.lr=inf"], 2, ["optim.lr='inf'", "finite"], "nothing"),
    ("norm-eps-yaml-inf", ["--set", "model.norm_eps=.inf"], 2, ["model.norm_eps=inf", "finite"], "nothing"),
    ("timeout-inf", ["--set", "parallel.timeout_s=inf"], 2, ["parallel.timeout_s", "finite"], "nothing"),
    ("timeout-overflows", ["--set", "parallel.timeout_s=1e300"], 2, ["parallel.timeout_s=1e+300", "at most"],
     "nothing"),
    ("beta-nan", ["--set", "optim.betas=[0.9, nan]"], 2, ["optim.betas", "finite"], "nothing"),
    ("capacity-factor-inf", ["--set", "moe.capacity_factor=inf"], 2, ["moe.capacity_factor", "finite"], "nothing"),
    ("collapse-share-nan-in-yaml", ["--config", "{tmp}/nan.yaml"], 2, ["log.collapse_share=nan", "finite"],
     "nothing"),
    ("seed-negative", ["--set", "train.seed=-1"], 2, ["train.seed=-1", "[0, 4294967295]"], "nothing"),
    ("seed-too-large", ["--set", "train.seed=4294967296"], 2, ["train.seed=4294967296", "numpy"], "nothing"),
    ("model-too-large", ["--set", "model.hidden_size=16384", "--set", "model.num_heads=64",
                         "--set", "model.num_layers=64"], 2, ["needs at least", "GiB", "available", "hidden_size"],
     "nothing"),
    ("vocab-too-large", ["--set", "model.vocab_size=2000000000"], 2, ["needs at least", "GiB"], "nothing"),
    ("device-cuda-missing", ["--set", "train.device=cuda"], 2, ["train.device=cuda", "no CUDA device"], "nothing"),
    ("deepspeed-json-list", ["--set", "parallel.deepspeed_config={tmp}/ds-list.json"], 2,
     ["ds-list.json", "JSON list, not an object"], "nothing"),
    ("deepspeed-json-string", ["--set", "parallel.deepspeed_config={tmp}/ds-str.json"], 2,
     ["JSON str, not an object"], "nothing"),
    ("deepspeed-json-invalid", ["--set", "parallel.deepspeed_config={tmp}/ds-bad.json"], 2,
     ["ds-bad.json", "not valid JSON"], "nothing"),
    ("deepspeed-json-latin1", ["--set", "parallel.deepspeed_config={tmp}/ds-latin1.json"], 2,
     ["ds-latin1.json", "not UTF-8"], "nothing"),
    ("config-latin1", ["--config", "{tmp}/latin1.yaml"], 2, ["latin1.yaml", "not UTF-8"], "nothing"),
    ("set-yaml-unclosed-list", ["--set", "optim.betas=[0.9"], 2, ["--set 'optim.betas=[0.9'", "not valid YAML"],
     "nothing"),
    ("set-yaml-unclosed-map", ["--set", "train.steps={a"], 2, ["train.steps={a", "not valid YAML"], "nothing"),
    ("set-yaml-tab", ["--set", "log.run_dir=\t@x: y"], 2, ["log.run_dir", "not valid YAML"], "nothing"),
    ("set-yaml-backtick", ["--set", "train.steps=`x"], 2, ["train.steps=`x", "not valid YAML"], "nothing"),
    ("set-line-break-comment", ["--set", "log.run_dir=runs/a\n# b"], 2, ["log.run_dir", "line break"], "nothing"),
    ("duplicate-key", ["--config", "{tmp}/dup-key.yaml"], 2, ["dup-key.yaml", "'steps' appears twice"], "nothing"),
    ("duplicate-section", ["--config", "{tmp}/dup-section.yaml"], 2, ["'train' appears twice"], "nothing"),
    ("nproc-zero", ["--nproc", "0"], 2, ["--nproc: 0 is not allowed", ">= 1"], "nothing"),
    ("idx-pointer-past-bin", ["--set", "data.dataset={tmp}/far"], 1, ["far.idx", "sequence 3", "points at bytes"],
     "nothing"),
    ("idx-pointer-negative", ["--set", "data.dataset={tmp}/neg"], 1, ["neg.idx", "sequence 0", "points at bytes"],
     "nothing"),
    ("lr-overflows-float32", ["--set", "optim.lr=1e38", "--set", "optim.min_lr=0"], 2,
     ["optim.lr=1e+38", "overflows float32", "at most 3.4e+37"], "nothing"),
    ("lr-times-decay-overflows", ["--set", "optim.weight_decay=1e37", "--set", "optim.lr=100"], 2,
     ["optim.lr=100", "weight_decay overflows float32"], "nothing"),
    # ---- 2. a file system that really fills up (tmpfs mounts; see `mounts`)
    ("disk-full-checkpoint-after-good-ones", ["--set", "log.run_dir={tmp}/mnt-ckpt", "--resume", "auto",
                                              "--set", "train.steps=3"], 1,
     ["could not write checkpoint step_3", "No space left on device", "removed the partial copy", "--resume auto"],
     "ckpt"),
    ("disk-full-first-checkpoint", ["--set", "log.run_dir={tmp}/mnt-first"], 1,
     ["could not write checkpoint step_1", "No space left on device"], "nothing"),
    ("disk-full-metrics", ["--set", "log.run_dir={run}"], 1,
     ["could not write", "metrics.jsonl", "No space left on device", "--resume auto"], "nothing"),
    ("disk-full-tensorboard", ["--set", "log.run_dir={run}", "--set", "log.tensorboard=true"], 1,
     ["could not write", "/tb", "No space left on device"], "no-tmp"),
    ("disk-full-data-cache", ["--set", "data.cache_dir={tmp}/mnt-full/cache"], 1,
     ["data cache", "data.cache_dir=", "No space left on device"], "cache"),
    ("disk-full-stopped-json", ["--set", "log.run_dir={tmp}/mnt-stop"], 1,
     ["stopped at step 2", "step_1", "not recorded in", "stopped.json", "No space left on device"], "stopped"),
    ("disk-full-coselection", ["--set", "log.run_dir={tmp}/mnt-cosel"], 1,
     ["could not write", "coselection.safetensors", "No space left on device"], "cosel"),
    ("disk-full-config-yaml", ["--set", "log.run_dir={tmp}/mnt-1page"], 1,
     ["could not write", "config.yaml", "No space left on device"], "nothing"),
    ("disk-full-lock", ["--set", "log.run_dir={tmp}/mnt-full/run"], 1,
     ["cannot write the lock file", "No space left on device"], "nothing"),
]

# Other commands: (name, argv, exit code, words, disk)
COMMANDS = [
    ("generate-empty-prompt", ["generate", "--checkpoint", "{good}", "--prompt", ""], 2,
     ["--prompt ''", "empty"], "good"),
    ("generate-zero-new-tokens", ["generate", "--checkpoint", "{good}", "--prompt", "a", "--max-new-tokens", "0"], 2,
     ["--max-new-tokens: 0 is not allowed", ">= 1"], "good"),
    ("eval-negative-batches", ["eval", "--checkpoint", "{good}", "--batches", "-1"], 2,
     ["--batches: -1 is not allowed"], "good"),
    ("preprocess-zero-documents", ["preprocess", "--input", "{tmp}/blank.jsonl", "--output", "{tmp}/blank"], 2,
     ["no documents", "blank", "nothing was written"], "no-blank"),
    ("preprocess-disk-full", ["preprocess", "--input", "{tmp}/docs.jsonl", "--output", "{tmp}/mnt-full/docs"], 1,
     ["could not write", "mnt-full/docs", "No space left on device"], "no-docs"),
]

MOUNTS = {  # name -> tmpfs size (None: sized in the worker from the good run's checkpoints)
    "mnt-ckpt": None, "mnt-first": "96k", "mnt-full": "4k", "mnt-stop": "12k", "mnt-cosel": "12k", "mnt-1page": "4k",
    "mnt-metrics": "4k", "mnt-tb": "4k"}

WORKER = r'''
import hashlib, json, os, shutil, subprocess, sys
from pathlib import Path
sys.path.insert(0, "tests")
from trainrun import call_main

tmp, config, plan = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
FAST = [a for o in plan["fast"] for a in ("--set", o)]

def hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}

def run(name, argv, env=None, command="train"):
    run_dir = tmp / name
    os.environ.pop("COE_DIST_FAULT", None)
    os.environ.update(env or {})
    fill = lambda a: a.replace("{tmp}", str(tmp)).replace("{good}", str(tmp / "good")).replace("{run}", str(run_dir))
    argv = [fill(a) for a in argv]
    full = (["train", "--config", config, "--set", f"log.run_dir={run_dir}", *FAST, *argv] if command == "train"
            else argv)
    before = hashes(tmp / "good" / "checkpoints")
    code, out, err = call_main(full)
    files = sorted(str(p.relative_to(tmp)) for p in run_dir.rglob("*")) if run_dir.exists() else []
    print(json.dumps({"name": name, "code": code, "stderr": err, "stdout": out[-3000:],
                      "files": files, "good_same": before == hashes(tmp / "good" / "checkpoints"),
                      "good_hashes": before}), flush=True)

# The good run: 2 steps, step_1 and step_2; a lock left behind by a killed run (a pid that is gone) first.
(tmp / "good").mkdir()
(tmp / "good" / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": plan["dead_pid"],
                                                   "time": 0}))
run("good", ["--set", "log.run_dir={good}"])
# A run dir on a tmpfs holding copies of the good checkpoints, with room for half a checkpoint more.
ckpt = tmp / "mnt-ckpt"
if plan["mounted"]:
    shutil.copytree(tmp / "good" / "checkpoints", ckpt / "checkpoints")
    used = os.statvfs(ckpt).f_blocks - os.statvfs(ckpt).f_bfree
    size = used * 4096 + (sum(f.stat().st_size for f in (ckpt / "checkpoints" / "step_2").iterdir()) // 2)
    subprocess.run(["mount", "-o", f"remount,size={size}", str(ckpt)], check=True)
    print(json.dumps({"name": "mnt-ckpt-before", "hashes": hashes(ckpt / "checkpoints")}), flush=True)
# metrics.jsonl and tb/ of these runs live on full file systems; stopped.json's run dir keeps its checkpoints
# and metrics elsewhere, so that stopped.json is the write that fails
if plan["mounted"]:
    (tmp / "disk-full-metrics").mkdir()
    (tmp / "disk-full-metrics" / "metrics.jsonl").symlink_to(tmp / "mnt-metrics" / "metrics.jsonl")
    (tmp / "disk-full-tensorboard").mkdir()
    (tmp / "disk-full-tensorboard" / "tb").symlink_to(tmp / "mnt-tb")
    (tmp / "stop-elsewhere" / "checkpoints").mkdir(parents=True)
    (tmp / "mnt-stop" / "checkpoints").symlink_to(tmp / "stop-elsewhere" / "checkpoints")
    (tmp / "mnt-stop" / "metrics.jsonl").symlink_to(tmp / "stop-elsewhere" / "metrics.jsonl")
    (tmp / "mnt-stop" / "coselection.safetensors").symlink_to(tmp / "stop-elsewhere" / "coselection.safetensors")
    # the routing statistics are the one file of this run on the full disk (written after each checkpoint)
    (tmp / "cosel-elsewhere" / "checkpoints").mkdir(parents=True)
    (tmp / "mnt-cosel" / "checkpoints").symlink_to(tmp / "cosel-elsewhere" / "checkpoints")
    (tmp / "mnt-cosel" / "metrics.jsonl").symlink_to(tmp / "cosel-elsewhere" / "metrics.jsonl")
shutil.copytree(tmp / "good", tmp / "overwrite")
run("overwrite", ["--overwrite", "--set", "train.steps=1"])
# a resume that changes how the run trains (the --set a tired user adds or leaves off), and one that changes
# only its length and layout
shutil.copytree(tmp / "good", tmp / "resume-changed")
run("resume-changed", ["--resume", "auto", "--set", "train.steps=3", "--set", "train.dtype=bf16",
                       "--set", "moe.top_k=1", "--set", "optim.lr=0.01", "--set", "moe.dispatch=dedup",
                       "--set", "moe.router_score=sigmoid", "--set", "moe.expert_bias_rate=0.001",
                       "--set", "moe.routing_groups=2", "--set", "moe.capacity_factor=1.0",
                       "--set", "moe.aux_loss_type=global"])
shutil.copytree(tmp / "good", tmp / "resume-longer")
run("resume-longer", ["--resume", "auto", "--set", "train.steps=3", "--set", "moe.dispatch=dedup"])
for name, argv, env, command in plan["cases"]:
    if name.startswith("disk-full") and not plan["mounted"]:
        continue
    run(name, argv, env, command)
'''


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_inputs(tmp: Path) -> None:
    (tmp / "afile").write_text("a regular file\n")
    (tmp / "dup-key.yaml").write_text("train:\n  steps: 2\n  steps: 3\n")
    (tmp / "dup-section.yaml").write_text("train:\n  steps: 2\ntrain:\n  seed: 1\n")
    (tmp / "nan.yaml").write_text("log:\n  collapse_share: .nan\n")
    (tmp / "latin1.yaml").write_bytes("# caf\xe9\ntrain:\n  steps: 2\n".encode("latin-1"))
    (tmp / "ds-list.json").write_text("[1, 2]")
    (tmp / "ds-str.json").write_text('"zero_optimization"')
    (tmp / "ds-bad.json").write_text('{"train_batch_size": ')
    (tmp / "ds-latin1.json").write_bytes('{"note": "caf\xe9"}'.encode("latin-1"))
    (tmp / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    (tmp / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(200)))


def _write_bad_indexes(tmp: Path) -> None:
    """A good .bin/.idx pair, then copies whose sequence pointers leave the .bin (sizes still agree)."""
    from coe_dist.data.indexed import HEADER_BYTES
    from coe_dist.data.preprocess import preprocess

    preprocess([str(tmp / "docs.jsonl")], "byte", str(tmp / "ok"), None, 1, progress=False)
    num_seq = int.from_bytes((tmp / "ok.idx").read_bytes()[18:26], "little")
    for name, seq, pointer in (("far", 3, 10**9), ("neg", 0, -8)):
        (tmp / f"{name}.bin").write_bytes((tmp / "ok.bin").read_bytes())
        idx = bytearray((tmp / "ok.idx").read_bytes())
        at = HEADER_BYTES + 4 * num_seq + 8 * seq
        idx[at:at + 8] = pointer.to_bytes(8, "little", signed=True)
        (tmp / f"{name}.idx").write_bytes(bytes(idx))


def _mount(path: Path, size: str) -> str | None:
    """A tmpfs of `size` at `path` (mode 0700); the reason when mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip() or f"mount exited {proc.returncode}")


def _fill(path: Path) -> None:
    """Leave no free page: the tmpfs then refuses any write that needs one."""
    with open(path / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("misuse")
    _write_inputs(tmp)
    _write_bad_indexes(tmp)
    home = tmp  # `~` in the cases means this directory
    refused = None
    mounted = []
    try:
        for name, size in MOUNTS.items():
            refused = refused or _mount(tmp / name, size or "64m")
            if refused:
                break
            mounted.append(tmp / name)
        if not refused:  # mnt-1page keeps its one page: the lock record gets it, config.yaml does not
            (tmp / "mnt-metrics" / "metrics.jsonl").write_text("")
            for name in ("mnt-full", "mnt-tb", "mnt-metrics"):
                _fill(tmp / name)
        yield from _run_worker(tmp, home, refused)
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _run_worker(tmp: Path, home: Path, refused: str | None):
    cases = [(c[0], c[1], {"COE_DIST_FAULT": "train.loss@step2:nan"} if c[0] == "disk-full-stopped-json" else {},
              "train") for c in CASES] + [(c[0], c[1], {}, "command") for c in COMMANDS]
    plan = {"fast": FAST, "cases": cases, "mounted": not refused, "dead_pid": _dead_pid()}
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}, "OMP_NUM_THREADS": "1",
           "HOME": str(home), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp), str(TINY), json.dumps(plan)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith('{"name"'):
            rec = json.loads(line)
            out[rec["name"]] = rec
    assert "good" in out and out["good"]["code"] == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (tmp / "worker.log").write_text(proc.stdout + "\n---- stderr\n" + proc.stderr)
    yield tmp, out, refused


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _one_line(rec: dict, code: int, words: list[str], tmp: Path) -> str:
    assert rec["code"] == code, rec
    assert "Traceback" not in rec["stderr"], rec["stderr"]
    lines = [line for line in rec["stderr"].splitlines() if line.startswith("coe-dist")]
    assert len(lines) == 1, rec["stderr"]
    line = lines[0]
    for word in words:
        assert word.replace("{tmp}", str(tmp)) in line, (word, line)
    return line


def _nothing_valid(tmp: Path, rec: dict) -> None:
    left = [f for f in rec["files"] if "step_" in f or f.endswith(("latest", "metrics.jsonl", "stopped.json"))
            and not f.startswith(("disk-full-metrics", "mnt-stop", "mnt-cosel"))]
    assert not left, left


def _check_ckpt(tmp: Path, out: dict) -> None:
    """The previous checkpoints on the full disk are byte-identical, `latest` still names step_2, no .tmp-*."""
    root = tmp / "mnt-ckpt" / "checkpoints"
    before = out["mnt-ckpt-before"]["hashes"]
    now = {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}
    assert now == before
    assert (root / "latest").read_text().strip() == "step_2"
    assert not list(root.glob(".tmp-*")) and not (root / "step_3").exists()


def _check_stopped(tmp: Path, out: dict) -> None:
    """The last good state is saved and verifies; no stopped.json, complete or partial, on the full disk."""
    from coe_dist.train import checkpoint

    assert checkpoint.verify(tmp / "stop-elsewhere" / "checkpoints" / "step_1")["step"] == 1
    assert not [p.name for p in (tmp / "mnt-stop").iterdir() if "stopped" in p.name]


def _check_coselection(tmp: Path, out: dict) -> None:
    """The checkpoint saved before the statistics verifies; no statistics file, complete or partial, is left."""
    from coe_dist.train import checkpoint

    assert checkpoint.verify(tmp / "cosel-elsewhere" / "checkpoints" / "step_1")["step"] == 1
    assert not [p.name for p in (tmp / "mnt-cosel").iterdir() if "coselection" in p.name]


def _check_cache(tmp: Path, out: dict) -> None:
    assert not [p for p in (tmp / "mnt-full" / "cache").rglob("*") if p.suffix in (".bin", ".idx", ".npy")]


DISK_CHECKS = {
    "ckpt": _check_ckpt, "stopped": _check_stopped, "cosel": _check_coselection, "cache": _check_cache,
    "no-blank": lambda tmp, out: not list(tmp.glob("blank.*[bx]")) or pytest.fail("blank.bin/.idx written"),
    "no-docs": lambda tmp, out: not list((tmp / "mnt-full").glob("docs*")) or pytest.fail("partial docs left"),
    "no-tmp": lambda tmp, out: not list(tmp.glob("disk-full-tensorboard/**/.tmp-*")) or pytest.fail(".tmp-* left"),
}


@pytest.mark.parametrize("case", CASES + COMMANDS, ids=[c[0] for c in CASES + COMMANDS])
def test_misuse_fails_with_one_line_and_leaves_disk_right(case, results):
    tmp, out, refused = results
    name, _argv, code, words, disk = case
    if name.startswith("disk-full") and refused:
        pytest.skip(f"mounting a tmpfs was refused here: {refused}")
    if name == "device-cuda-missing" and out.get(name, {}).get("code") != 2 and _cuda_visible():
        pytest.skip("a CUDA device is visible here: train.device=cuda is not a mistake")
    assert name in out, f"case {name} did not run"
    rec = out[name]
    _one_line(rec, code, words, tmp)
    if disk == "good":
        assert rec["good_same"], "the good run's checkpoints changed"
    elif disk == "nothing":
        _nothing_valid(tmp, rec)
    else:
        DISK_CHECKS[disk](tmp, out)


def test_good_run_took_over_a_stale_lock_and_released_its_own(results):
    """The control: the same settings without a mistake train and save; the lock a killed run left was said."""
    tmp, out, _ = results
    rec = out["good"]
    assert "taking over" in rec["stdout"] and "that process is not running" in rec["stdout"], rec["stdout"]
    assert {"step_1", "step_2"} <= {Path(f).name for f in rec["files"]}
    assert (tmp / "good" / "run.lock").read_text() == ""  # a clean end empties the record
    assert not (Path.cwd() / "~").exists() and not (ROOT / "~").exists()  # `~` never made literally


# ---------------------------------------------------------------- non-finite weights are never a good checkpoint

@pytest.mark.parametrize("where", ["dense-param-inf", "expert-param-nan", "adam-moment-inf"])
def test_checkpoint_with_non_finite_values_is_never_saved(tmp_path, where):
    """Diverged weights or moments are refused before anything is renamed: no step_2, no .tmp-*, and `latest`
    and step_1 byte-identical. (At the CLI a finite lr that big is now a config error, see lr-overflows-*.)"""
    from types import SimpleNamespace

    import torch

    from coe_dist.config import ModelConfig, MoEConfig
    from coe_dist.model import CoETransformer
    from coe_dist.train import checkpoint

    model = CoETransformer(ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, ffn_hidden_size=32,
                                       max_seq_len=8), MoEConfig(num_experts=4, top_k=2, expert_hidden_size=8), seed=0)
    engine = SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters()))  # ZeRO 0: moments in its state
    checkpoint.save(tmp_path, 1, model, engine, {"optimizer_step": 1}, keep_last=5)
    root = tmp_path / "checkpoints"
    before = {str(p): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}
    params = dict(model.named_parameters())
    with torch.no_grad():
        if where == "dense-param-inf":
            params["layers.0.attn.o_proj.weight"][1, 2] = float("inf")
        elif where == "expert-param-nan":
            params["layers.0.ffn.experts.w_down_EDF"][3, 0, 1] = float("nan")
        else:
            p = params["lm_head.weight"]
            engine.optimizer.state[p] = {"exp_avg": torch.full_like(p, float("inf")), "exp_avg_sq": torch.ones_like(p)}
    with pytest.raises(checkpoint.CheckpointError, match="refused to save checkpoint step_2: .* non-finite") as info:
        checkpoint.save(tmp_path, 2, model, engine, {"optimizer_step": 2}, keep_last=5)
    assert "\n" not in str(info.value) and "latest" in str(info.value)
    assert {str(p): sha(p) for p in sorted(root.rglob("*")) if p.is_file()} == before
    assert (root / "latest").read_text().strip() == "step_1"
    assert not (root / "step_2").exists() and not list(root.glob(".tmp-*"))


# ---------------------------------------------------------------- two runs at once, real processes

def _coe_dist(run_dir: Path, *args: str, env: dict | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "coe_dist.cli", "train", "--config", str(TINY), "--set", f"log.run_dir={run_dir}"]
    for o in FAST:
        cmd += ["--set", o]
    return cmd + list(args)


def test_second_run_on_a_locked_run_dir_is_refused_naming_the_holder(tmp_path):
    """A real trainer holds the lock (paused at step 1); a second one, and a second `--nproc 2` job, refuse
    with one line naming its host and pid before starting anything; SIGKILLed, the holder leaves its record."""
    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}, "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen(_coe_dist(run_dir), env={**env, "COE_DIST_FAULT": "train.step@step1:sleep=600"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lock = run_dir / "run.lock"
        deadline = time.time() + 300
        while not (lock.is_file() and lock.read_text().strip()):
            assert holder.poll() is None and time.time() < deadline, holder.communicate()
            time.sleep(0.5)
        assert json.loads(lock.read_text())["pid"] == holder.pid
        seconds = []
        for extra in ((), ("--nproc", "2")):
            start = time.time()
            proc = subprocess.run(_coe_dist(run_dir, *extra), env=env, capture_output=True, text=True,
                                  timeout=300, cwd=ROOT)
            seconds.append(time.time() - start)
            assert proc.returncode == 1, proc
            lines = [line for line in proc.stderr.splitlines() if line.startswith("coe-dist")]
            assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert "in use by another run" in lines[0] and f"pid {holder.pid}" in lines[0], lines
            assert socket.gethostname() in lines[0] and "log.run_dir=NEW_DIR" in lines[0], lines
            assert "torch.distributed.run" not in proc.stdout  # the --nproc job started no trainer
        metrics = run_dir / "metrics.jsonl"  # the holder opened it; nobody has logged a step into it
        assert not metrics.exists() or metrics.read_text() == ""
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    # A killed run leaves its record (the kernel dropped the lock): the next run reports and takes it over,
    # as the good run of `results` does with a record naming a pid that is gone.
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == holder.pid


def test_a_resume_names_each_setting_it_changes_from_the_checkpoint(results):
    """Allowed (a new dtype on another machine is a real need), but said: config.yaml names only the new values."""
    tmp, out, _ = results
    rec = out["resume-changed"]
    assert rec["code"] == 0, rec["stderr"][-3000:]
    lines = [line for line in rec["stdout"].splitlines() if "settings other than its checkpoint's" in line]
    assert len(lines) == 1, rec["stdout"]
    for said in ("moe.top_k=1 (checkpoint: 2)", "optim.lr=0.01 (checkpoint: ", "train.dtype=bf16 (checkpoint: fp32)",
                 "moe.router_score=sigmoid (checkpoint: softmax)", "moe.routing_groups=2 (checkpoint: 1)",
                 "moe.expert_bias_rate=0.001 (checkpoint: 0.0)", "moe.capacity_factor=1.0 (checkpoint: None)"):
        assert said in lines[0], (said, lines[0])
    assert "train.steps" not in lines[0] and "moe.dispatch" not in lines[0]  # length and layout: not a change
    assert "step_3" in {Path(f).name for f in rec["files"]}
    longer = out["resume-longer"]
    assert longer["code"] == 0 and "settings other than" not in longer["stdout"], longer["stdout"]


def test_overwrite_replaces_the_earlier_run(results):
    """--overwrite on a copy of the good run (2 steps): its step_2 and metrics go; the new 1-step run's stay."""
    tmp, out, _ = results
    rec = out["overwrite"]
    assert rec["code"] == 0, rec["stderr"][-3000:]
    assert "--overwrite: removed checkpoints, metrics.jsonl" in rec["stdout"], rec["stdout"]
    root = tmp / "overwrite" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]
    assert (root / "latest").read_text().strip() == "step_1"
    steps = [json.loads(line)["step"] for line in (tmp / "overwrite" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1]  # the earlier run's two records are gone, not mixed in
