"""Data package, part 2: build_data through megatron-core: caching, sharding, resume, blends, errors."""

from __future__ import annotations

import collections
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from coe_dist.config import RunConfig, config_from_dict
from coe_dist.data import embedded
from coe_dist.data.corpus import generate_corpus
from coe_dist.data.errors import DataError
from coe_dist.data.loader import build_data, parse_blend
from coe_dist.data.preprocess import write_indexed

SEQ, MB = 32, 2


def make_cfg(tmp: Path, *overrides: str) -> RunConfig:
    base = [f"data.cache_dir={tmp / 'cache'}", "data.num_documents=300", f"train.seq_len={SEQ}",
            f"train.micro_batch_size={MB}", "train.grad_accum=1", "train.seed=11"]
    return config_from_dict({}, base + list(overrides))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One cache dir for the module: the embedded corpus and megatron's indices are built once."""
    return tmp_path_factory.mktemp("data-cache")


def take(batches, steps: int, grad_accum: int) -> list[tuple[list[int], torch.Tensor]]:
    """Per optimizer step, this rank's positions and tokens (micro-batches concatenated)."""
    out = []
    for _ in range(steps):
        micro = [batches.next_micro_batch() for _ in range(grad_accum)]
        out.append(([p for _, _, ids in micro for p in ids], torch.cat([t for t, _, _ in micro])))
    return out


def world(cfg: RunConfig, dp_size: int, steps: int, state: dict | None = None):
    """Run `steps` steps on every rank of a dp_size world; per step, all ranks' positions and tokens."""
    ranks = [build_data(cfg, dp_rank=r, dp_size=dp_size).train for r in range(dp_size)]
    for b in ranks:
        if state is not None:
            b.load_state_dict(state)
    per_rank = [take(b, steps, cfg.train.grad_accum) for b in ranks]
    steps_out = [([p for r in per_rank for p in r[s][0]], torch.cat([r[s][1] for r in per_rank]))
                 for s in range(steps)]
    return steps_out, ranks[0].state_dict()


# ---------------------------------------------------------------- embedded corpus and basics

def test_embedded_default_builds_once_and_packs_documents(cache):
    cfg = make_cfg(cache)
    bundle = build_data(cfg, dp_rank=0, dp_size=1)
    prefix = bundle.info["prefixes"][0]
    assert prefix.startswith(str(cache / "cache" / "embedded-"))
    mtime = os.stat(prefix + ".bin").st_mtime_ns
    tokens, targets, ids = bundle.train.next_micro_batch()
    assert tokens.shape == targets.shape == (MB, SEQ) and tokens.dtype == targets.dtype == torch.int64
    assert ids == [0, 1]
    assert torch.equal(tokens[:, 1:], targets[:, :-1])  # targets are the tokens shifted by one
    # Samples are packed runs of the corpus: between two eods lies a whole document, at the edges a
    # piece of one (this corpus is ASCII, so cutting bytes anywhere still decodes exactly).
    docs = generate_corpus(300, seed=11)
    boundaries = 0
    for _ in range(20):
        tokens, targets, _ = bundle.train.next_micro_batch()
        for row in torch.cat([tokens, targets[:, -1:]], 1).tolist():
            pieces = bundle.tokenizer.decode(row).split("<|endoftext|>")
            if len(pieces) == 1:
                assert any(pieces[0] in d for d in docs)
                continue
            first, *middle, last = pieces
            boundaries += len(pieces) - 1
            assert all(m in docs for m in middle)
            assert any(d.endswith(first) for d in docs) and any(d.startswith(last) for d in docs)
    assert boundaries > 0
    # A second build (another rank, a restart) reuses the cache.
    build_data(cfg, dp_rank=0, dp_size=1)
    assert os.stat(prefix + ".bin").st_mtime_ns == mtime
    other = build_data(make_cfg(cache, "data.num_documents=301"), dp_rank=0, dp_size=1)
    assert other.info["prefixes"][0] != prefix


def test_concurrent_builders_build_the_corpus_once(tmp_path, monkeypatch):
    calls = []
    real = embedded.write_indexed

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedded, "write_indexed", counting)
    from coe_dist.data.tokenizer import ByteTokenizer

    results, gate = [], threading.Barrier(3)

    def rank(r: int, barrier) -> None:
        results.append(embedded.prepare_embedded(str(tmp_path), 50, 0, "byte", ByteTokenizer(),
                                                 dp_rank=r, barrier=barrier))

    # Ranks 0-2 with a barrier (rank 0 first), plus two barrier-less starters racing on the lock.
    threads = [threading.Thread(target=rank, args=(r, gate.wait)) for r in range(3)]
    threads += [threading.Thread(target=rank, args=(0, None)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 5 and len(set(results)) == 1 and len(calls) == 1


def test_loader_is_deterministic_given_the_seed(cache):
    a = build_data(make_cfg(cache), dp_rank=0, dp_size=1).train
    b = build_data(make_cfg(cache), dp_rank=0, dp_size=1).train
    c = build_data(make_cfg(cache, "train.seed=12"), dp_rank=0, dp_size=1).train
    first = [a.next_micro_batch()[0] for _ in range(3)]
    assert all(torch.equal(x, b.next_micro_batch()[0]) for x in first)
    assert not all(torch.equal(x, c.next_micro_batch()[0]) for x in first)


def test_valid_batches_are_fixed_and_the_same_on_every_rank(cache):
    cfg = make_cfg(cache)
    r0 = build_data(cfg, dp_rank=0, dp_size=2)
    r1 = build_data(cfg, dp_rank=1, dp_size=2)
    v = r0.valid_batches(3)
    assert len(v) == 3 and all(t.shape == (MB, SEQ) for t, _ in v)
    for (t0, y0), (t1, y1), (t2, y2) in zip(v, r0.valid_batches(3), r1.valid_batches(3), strict=True):
        assert torch.equal(t0, t1) and torch.equal(t0, t2) and torch.equal(y0, y1) and torch.equal(y0, y2)
    n = r0.info["valid_samples"]
    rows = [row for t, _ in r0.valid_batches(n // MB + 2) for row in t]  # more than the split: wraps
    assert torch.equal(rows[n], rows[0]) and torch.equal(rows[n + 1], rows[1])
    train_rows = {tuple(r0.train.next_micro_batch()[0][0].tolist()) for _ in range(50)}
    assert not train_rows & {tuple(row.tolist()) for t, _ in v for row in t}


# ---------------------------------------------------------------- data-parallel sharding and resume

def test_dp_sharding_world1_ga2_equals_world2_ga1(cache):
    one, _ = world(make_cfg(cache, "train.grad_accum=2"), dp_size=1, steps=3)
    two, _ = world(make_cfg(cache, "train.grad_accum=1"), dp_size=2, steps=3)
    for (ids1, tok1), (ids2, tok2) in zip(one, two, strict=True):
        assert ids1 == ids2 and torch.equal(tok1, tok2)
    assert [p for ids, _ in one for p in ids] == list(range(3 * 2 * MB))


def test_micro_step_positions_follow_the_formula(cache):
    dp, ga = 3, 2
    cfg = make_cfg(cache, f"train.grad_accum={ga}")
    for r in range(dp):
        batches = build_data(cfg, dp_rank=r, dp_size=dp).train
        assert batches.global_batch_size == MB * ga * dp
        for s in range(2):
            for m in range(ga):
                base = s * MB * ga * dp
                start = base + m * MB * dp + r * MB
                assert batches.next_micro_batch()[2] == list(range(start, start + MB))


@pytest.mark.parametrize("resume_world", [(2, 1), (1, 2)])  # (dp_size, grad_accum) after the resume
def test_resume_continues_with_the_next_unseen_sample(cache, resume_world):
    k = 3
    straight, _ = world(make_cfg(cache), dp_size=2, steps=2 * k)
    first, state = world(make_cfg(cache), dp_size=2, steps=k)
    assert state["consumed_samples"] == k * 2 * MB
    dp, ga = resume_world
    second, _ = world(make_cfg(cache, f"train.grad_accum={ga}"), dp_size=dp, steps=k, state=state)
    resumed = first + second
    assert [ids for ids, _ in resumed] == [ids for ids, _ in straight]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, straight, strict=True))
    seen = [p for ids, _ in resumed for p in ids]
    assert sorted(seen) == list(range(2 * k * 2 * MB))  # none twice, none skipped


def test_epochs_wrap_around_deterministically(cache):
    batches = build_data(make_cfg(cache), dp_rank=0, dp_size=1).train
    n = batches.samples_per_epoch
    epoch0 = [batches.dataset_index(p) for p in range(n)]
    epoch1 = [batches.dataset_index(p) for p in range(n, 2 * n)]
    assert epoch0 == list(range(n)) and sorted(epoch1) == list(range(n)) and epoch1 != epoch0
    again = build_data(make_cfg(cache), dp_rank=0, dp_size=1).train
    assert [again.dataset_index(p) for p in range(2 * n, 2 * n + 20)] == \
        [batches.dataset_index(p) for p in range(2 * n, 2 * n + 20)]
    batches.load_state_dict({"consumed_samples": 2 * n - 1})  # the last sample of epoch 1 + the first of 2
    tokens, _, ids = batches.next_micro_batch()
    assert ids == [2 * n - 1, 2 * n]
    assert torch.equal(tokens[0], batches.dataset[epoch1[-1]]["tokens"])


def test_load_state_dict_checks_its_input(cache):
    batches = build_data(make_cfg(cache), dp_rank=0, dp_size=1).train
    with pytest.raises(DataError, match="consumed_samples"):
        batches.load_state_dict({"consumed_samples": -1})
    with pytest.warns(UserWarning, match="different dataset"):
        batches.load_state_dict({"consumed_samples": 4, "fingerprint": "other"})
    assert batches.next_micro_batch()[2] == [4, 5]


# ---------------------------------------------------------------- user datasets and blends

def letters_dataset(path: Path, letter: str, docs: int = 60) -> str:
    prefix = str(path / f"only_{letter}")
    write_indexed([letter * (20 + i % 30) for i in range(docs)], "byte", prefix, progress=False)
    return prefix


def test_parse_blend():
    assert parse_blend("embedded") == (["embedded"], None)
    assert parse_blend("0.7:data/a, 0.3:data/b.bin") == (["data/a", "data/b"], [0.7, 0.3])
    assert parse_blend("a,b") == (["a", "b"], None)
    with pytest.raises(DataError, match="weights some entries"):
        parse_blend("0.7:a,b")
    with pytest.raises(DataError, match="finite numbers > 0"):
        parse_blend("0:a,1:b")


def test_weighted_blend_follows_the_weights(tmp_path):
    a, b = letters_dataset(tmp_path, "a"), letters_dataset(tmp_path, "b")
    cfg = make_cfg(tmp_path, f"data.dataset=0.75:{a},0.25:{b}")
    bundle = build_data(cfg, dp_rank=0, dp_size=1)
    counts = collections.Counter()
    for _ in range(100):
        for row in bundle.train.next_micro_batch()[0]:
            counts["a" if ord("a") in row.tolist() else "b"] += 1
    assert 0.65 < counts["a"] / 200 < 0.85
    assert len(bundle.valid_batches(2)) == 2
    # Unweighted (by size), without torch.distributed: megatron-core's BlendedDataset needs the workaround.
    plain = build_data(make_cfg(tmp_path, f"data.dataset={a},{b}"), dp_rank=0, dp_size=1)
    assert plain.info["weights"] is None and plain.train.samples_per_epoch > 0


# ---------------------------------------------------------------- errors name the file and the fix

@pytest.fixture()
def user_prefix(tmp_path) -> str:
    prefix = str(tmp_path / "user")
    write_indexed(generate_corpus(40, seed=1), "byte", prefix, progress=False)
    return prefix


def test_missing_files(tmp_path, user_prefix):
    os.remove(user_prefix + ".bin")
    with pytest.raises(DataError, match=re.escape(user_prefix + ".bin") + "' does not exist.*preprocess"):
        build_data(make_cfg(tmp_path, f"data.dataset={user_prefix}"), dp_rank=0, dp_size=1)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "nothing.idx"))):
        build_data(make_cfg(tmp_path, f"data.dataset={tmp_path / 'nothing'}"), dp_rank=0, dp_size=1)


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_truncated_files(tmp_path, user_prefix, suffix):
    path = user_prefix + suffix
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) - 7])
    with pytest.raises(DataError, match=re.escape(path) + "' is truncated.*preprocess"):
        build_data(make_cfg(tmp_path, f"data.dataset={user_prefix}"), dp_rank=0, dp_size=1)


def test_token_ids_beyond_the_model_vocab(tmp_path, user_prefix):
    cfg = make_cfg(tmp_path, f"data.dataset={user_prefix}", "model.vocab_size=200")
    with pytest.raises(DataError, match=re.escape(user_prefix + ".bin") + ".*token id 256 but model.vocab_size=200"
                       r".*>= 257 \(data.tokenizer='byte' has 257 ids\)"):
        build_data(cfg, dp_rank=0, dp_size=1)


def test_dataset_shorter_than_one_sample(tmp_path):
    prefix = str(tmp_path / "tiny")
    write_indexed(["short"], "byte", prefix, progress=False)
    with pytest.raises(DataError, match=re.escape(prefix + ".bin") + ".*6 tokens, shorter than one sample"):
        build_data(make_cfg(tmp_path, f"data.dataset={prefix}"), dp_rank=0, dp_size=1)


def test_empty_valid_split(tmp_path, user_prefix):
    cfg = make_cfg(tmp_path, f"data.dataset={user_prefix}", "data.valid_fraction=0.001")
    with pytest.raises(DataError, match="valid split of " + re.escape(user_prefix + ".bin") + ".*valid_fraction"):
        build_data(cfg, dp_rank=0, dp_size=1)


def test_tokenizer_file_that_does_not_load(tmp_path):
    bad = tmp_path / "tok.json"
    bad.write_text("[]")
    with pytest.raises(DataError, match=re.escape(str(bad)) + "' does not load"):
        build_data(make_cfg(tmp_path, f"data.tokenizer={bad}"), dp_rank=0, dp_size=1)


def test_bad_rank_arguments(tmp_path):
    with pytest.raises(DataError, match="dp_rank=2, dp_size=2"):
        build_data(make_cfg(tmp_path), dp_rank=2, dp_size=2)


def test_max_token_id_matches_numpy(user_prefix):
    from coe_dist.data.indexed import inspect_indexed, max_token_id

    info = inspect_indexed(user_prefix)
    data = np.fromfile(user_prefix + ".bin", dtype=np.uint16)
    assert info.num_tokens == data.size and max_token_id(info) == data.max() == 256
