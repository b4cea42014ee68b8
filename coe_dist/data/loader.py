"""Training data through megatron-core: IndexedDataset -> GPTDataset (-> BlendedDataset) -> micro-batches.

    data.dataset   'embedded' | PREFIX | a blend "0.7:prefixA,0.3:prefixB" ('embedded' may be a member)
    samples        packed runs of train.seq_len + 1 tokens across document boundaries (eod between
                   documents), shuffled by megatron-core with train.seed; tokens = run[:-1], targets = run[1:]
    splits         megatron's document split: the first 1 - valid_fraction of each prefix's documents
                   train, the rest are held out

The training stream is the sequence of global sample positions 0, 1, 2, ...; position p is epoch
p // N, sample p % N of that epoch (N = train samples per epoch). Epoch 0 is megatron's shuffled order,
epoch e >= 1 a permutation of it seeded by (train.seed, e). A micro-step takes the next
micro_batch_size * dp_size positions; rank r gets the r-th run of micro_batch_size of them. Hence:
  * micro-step m of step s on rank r = positions base + m*mb*dp + r*mb ... + mb, base = s*mb*ga*dp;
  * world 1 with grad_accum 2 sees exactly what world 2 with grad_accum 1 sees in a step;
  * the state is one number, consumed_samples, so a resume continues at the next unseen position,
    whatever dp_size / grad_accum it resumes with.

megatron-core 0.16.1 quirks handled here (see the comments at each):
  * its split string is parsed with the regex [.0-9]+, so "1e-05" would read as 1 and 05;
  * BlendedDataset calls torch.distributed.get_rank() on an index-cache miss without checking that
    torch.distributed is initialised;
  * path_to_cache=None does not mean "no cache": GPTDataset then writes into PREFIX/cache/;
  * weighted blends need a sample count for every split, including the unused test split;
  * with torch.distributed initialised its builder calls torch.distributed.barrier() itself (rank 0
    builds the index cache first), so every rank must call build_data, and the cache dir must be on a
    filesystem all ranks share.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from coe_dist.atomic_file import DISK_ERRNOS
from coe_dist.config import RunConfig
from coe_dist.data.embedded import file_lock, prepare_embedded
from coe_dist.data.errors import DataError
from coe_dist.data.indexed import IndexedInfo, inspect_indexed, max_token_id, quiet_megatron_import
from coe_dist.data.tokenizer import Tokenizer, load_tokenizer

Batch = tuple[torch.Tensor, torch.Tensor]  # tokens_BL, targets_BL (int64)


# ---------------------------------------------------------------- the dataset spec

def parse_blend(spec: str) -> tuple[list[str], list[float] | None]:
    """'a' -> ([a], None); 'a,b' -> ([a, b], None: weighted by size); '0.7:a,0.3:b' -> ([a, b], [.7, .3])."""
    prefixes, weights = [], []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            raise DataError(f"data.dataset={spec!r} has an empty entry: write 'PREFIX' or '0.7:PREFIX,0.3:PREFIX'")
        weight, sep, rest = item.partition(":")
        try:
            weights.append(float(weight) if sep else None)
            prefixes.append(rest.strip() if sep else item)
        except ValueError:  # a ':' inside a path, not a weight
            weights.append(None)
            prefixes.append(item)
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise DataError(f"data.dataset={spec!r} weights some entries but not others: weight all of them "
                        "('0.7:a,0.3:b') or none ('a,b', weighted by size)")
    if any(w is not None and not 0 < w < math.inf for w in weights):  # also refuses nan
        raise DataError(f"data.dataset={spec!r}: blend weights must be finite numbers > 0")
    # A prefix given as PREFIX.bin / PREFIX.idx means PREFIX.
    prefixes = [p[:-4] if p.endswith((".bin", ".idx")) else p for p in prefixes]
    return prefixes, (None if weights[0] is None else weights)


def _resolve_prefixes(cfg: RunConfig, tokenizer: Tokenizer, prefixes: list[str], dp_rank: int,
                      barrier: Callable[[], None] | None) -> list[str]:
    if "embedded" not in prefixes:
        return prefixes
    seed = getattr(cfg.data, "corpus_seed", None)
    seed = cfg.train.seed if seed is None else seed
    embedded = prepare_embedded(cfg.data.cache_dir, cfg.data.num_documents, seed, cfg.data.tokenizer,
                                tokenizer, dp_rank=dp_rank, barrier=barrier)
    return [embedded if p == "embedded" else p for p in prefixes]


def check_dataset_files(cfg: RunConfig) -> None:
    """The .bin/.idx pairs of data.dataset (every prefix of a blend) and data.valid_dataset exist and agree:
    a launcher calls it before starting any rank (a rank that failed alone would leave its peers waiting)."""
    prefixes = parse_blend(cfg.data.dataset)[0] + ([cfg.data.valid_dataset] if cfg.data.valid_dataset else [])
    for prefix in prefixes:
        if prefix != "embedded":
            inspect_indexed(prefix)


def _check_prefixes(cfg: RunConfig, tokenizer: Tokenizer, prefixes: list[str]) -> list[IndexedInfo]:
    infos = [inspect_indexed(p) for p in prefixes]
    vocab, need = cfg.model.vocab_size, cfg.train.seq_len + 1
    for info in infos:
        top = max_token_id(info)
        if top >= vocab:
            raise DataError(f"dataset {info.prefix!r} (file {info.prefix}.bin) holds token id {top} but "
                            f"model.vocab_size={vocab}: set model.vocab_size >= {max(top + 1, tokenizer.vocab_size)} "
                            f"(data.tokenizer={cfg.data.tokenizer!r} has {tokenizer.vocab_size} ids), or "
                            "preprocess with the tokenizer the model was sized for")
        if info.num_tokens < need:
            raise DataError(f"dataset {info.prefix!r} (file {info.prefix}.bin) has {info.num_tokens} tokens, "
                            f"shorter than one sample of train.seq_len + 1 = {need}: add documents or lower "
                            "train.seq_len")
    return infos


# ---------------------------------------------------------------- megatron-core

@functools.cache  # define the subclasses once, on first use (importing megatron-core takes ~5 s)
def _megatron_classes():
    quiet_megatron_import()
    from megatron.core.datasets.blended_dataset import BlendedDataset
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    # Its INFO lines (a dozen per build) would flood a trainer that logs at INFO.
    datasets_logger = logging.getLogger("megatron.core.datasets")
    if datasets_logger.level == logging.NOTSET:
        datasets_logger.setLevel(logging.WARNING)

    class LocalBlendedDataset(BlendedDataset):
        """BlendedDataset that also builds without torch.distributed.

        On an index-cache miss megatron-core 0.16.1 evaluates torch.distributed.get_rank() unguarded,
        which raises when no process group exists. The blend indices are cheap (one pass over the
        sample count), so without torch.distributed they are built in memory instead of cached.
        """

        def _build_indices(self):
            if torch.distributed.is_initialized() or self.config.path_to_cache is None:
                return super()._build_indices()
            shared = self.config
            self.config = copy.copy(shared)
            self.config.path_to_cache = None
            blend_logger = logging.getLogger("megatron.core.datasets.blended_dataset")
            level = blend_logger.level
            blend_logger.setLevel(logging.ERROR)  # silence "Cannot save the BlendedDataset indexes"
            try:
                return super()._build_indices()
            finally:
                self.config = shared
                blend_logger.setLevel(level)

    class Builder(BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            cls = LocalBlendedDataset if cls is BlendedDataset else cls
            return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank,
                                                                       synchronize_ranks, *args)

    return Builder, GPTDataset, GPTDatasetConfig


def _split_string(valid_fraction: float) -> str:
    # Fixed-point on purpose: megatron parses the split with the regex [.0-9]+, so str(1e-05) = "1e-05"
    # would be read as the two numbers 1 and 05.
    return f"{1.0 - valid_fraction:.8f},{valid_fraction:.8f},0"


def _split_sizes(cfg: RunConfig, infos: list[IndexedInfo], weighted: bool) -> list[int | None]:
    if not weighted:
        return [None, None, None]  # one epoch of each split; we wrap epochs ourselves
    # A weighted blend needs explicit sizes, for every split including the unused test split. Ask for
    # about one epoch of all the data: independent of train.steps, so a resume with more steps (or
    # fewer) sees the same sample order.
    tokens = sum(i.num_tokens for i in infos)
    vf, seq = cfg.data.valid_fraction, cfg.train.seq_len
    return [max(1, int(tokens * (1 - vf)) // seq), max(1, int(tokens * vf) // seq), 0]


def _build_splits(cfg: RunConfig, tokenizer: Tokenizer, infos: list[IndexedInfo],
                  weights: list[float] | None, split: str | None = None) -> tuple:
    Builder, GPTDataset, GPTDatasetConfig = _megatron_classes()
    cache = os.path.join(cfg.data.cache_dir, "megatron-indices")
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_len,
        blend=([os.path.abspath(i.prefix) for i in infos], weights),
        split=split or _split_string(cfg.data.valid_fraction),
        path_to_cache=cache,  # never None: see the module docstring
        tokenizer=tokenizer,  # megatron reads vocab_size, eod and unique_identifiers (its cache key)
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,  # the model applies its own causal mask; skip an L x L tensor per sample
    )
    builder = Builder(GPTDataset, _split_sizes(cfg, infos, weights is not None), lambda: True, config)
    try:
        if torch.distributed.is_initialized():
            # megatron-core synchronises itself: rank 0 writes the index cache, barrier, the others read.
            # A file lock here would deadlock against that barrier.
            train, valid, _ = builder.build()
        else:
            with file_lock(cache + ".lock"):  # its .npy cache files are written in place, not renamed
                train, valid, _ = builder.build()
    except (AssertionError, IndexError) as e:
        raise DataError(f"megatron-core could not build samples from {', '.join(i.prefix for i in infos)} "
                        f"(seq_len {cfg.train.seq_len}, valid_fraction {cfg.data.valid_fraction}): {e!r}; "
                        "check that every prefix has enough documents for both splits") from None
    return train, valid


def _check_split(dataset, split: str, cfg: RunConfig, infos: list[IndexedInfo]) -> None:
    if dataset is not None and len(dataset) > 0:
        return
    files = ", ".join(f"{i.prefix}.bin" for i in infos)
    more = "add documents (data.num_documents for the embedded corpus)"
    fix = f"raise data.valid_fraction or {more}" if split == "valid" else f"{more} or lower train.seq_len"
    raise DataError(f"the {split} split of {files} is shorter than one sample of train.seq_len + 1 = "
                    f"{cfg.train.seq_len + 1} tokens (data.valid_fraction={cfg.data.valid_fraction}): {fix}")


def _collate(dataset, indices: list[int]) -> Batch:
    samples = [dataset[int(i)] for i in indices]
    return (torch.stack([s["tokens"] for s in samples]), torch.stack([s["labels"] for s in samples]))


# ---------------------------------------------------------------- the training stream

class TrainBatches:
    """This rank's micro-batches of the deterministic global sample stream (see the module docstring)."""

    def __init__(self, dataset, *, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int,
                 seed: int, fingerprint: str) -> None:
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.fingerprint = fingerprint
        self.samples_per_epoch = len(dataset)
        self.consumed_samples = 0  # global positions consumed by all ranks together
        self._order: tuple[int, np.ndarray | None] = (0, None)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    def dataset_index(self, position: int) -> int:
        """Index into the megatron dataset of global stream position `position`."""
        epoch, i = divmod(position, self.samples_per_epoch)
        if epoch == 0:
            return i
        if self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.samples_per_epoch))
        return int(self._order[1][i])

    def positions(self, consumed: int) -> list[int]:
        start = consumed + self.dp_rank * self.micro_batch_size
        return list(range(start, start + self.micro_batch_size))

    def next_micro_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(tokens_BL int64, targets_BL int64, the B global sample positions) for this rank."""
        positions = self.positions(self.consumed_samples)
        tokens_BL, targets_BL = _collate(self.dataset, [self.dataset_index(p) for p in positions])
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return tokens_BL, targets_BL, positions

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "samples_per_epoch": self.samples_per_epoch,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
            raise DataError(f"data state consumed_samples={consumed!r}: expected an int >= 0 from "
                            "TrainBatches.state_dict()")
        if state.get("fingerprint", self.fingerprint) != self.fingerprint:
            warnings.warn("resuming the data stream on a different dataset, seed or seq_len than it was "
                          f"saved with: continuing at sample {consumed} of the new stream", stacklevel=2)
        self.consumed_samples = consumed


# ---------------------------------------------------------------- the bundle

@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: TrainBatches
    valid: object  # the megatron valid dataset
    micro_batch_size: int
    info: dict = field(default_factory=dict)

    def valid_batches(self, num_batches: int) -> list[Batch]:
        """The first num_batches * micro_batch_size held-out samples, in fixed batches.

        The same on every call and on every rank (so an all-reduced mean equals each rank's value, and
        eval losses compare across world sizes); repeats cyclically if the split is smaller.
        """
        n, mb = len(self.valid), self.micro_batch_size
        return [_collate(self.valid, [(b * mb + j) % n for j in range(mb)]) for b in range(num_batches)]


def build_data(cfg: RunConfig, *, dp_rank: int, dp_size: int,
               barrier: Callable[[], None] | None = None) -> DataBundle:
    """Tokenizer, this rank's training stream and the held-out set for a run.

    barrier: optional collective over all ranks; with it rank 0 prepares the embedded corpus before the
    others look. Not needed for safety (a file lock is), only to keep ranks from queueing on the lock.
    With torch.distributed initialised every rank must call this (megatron-core barriers inside).
    A data cache that the file system refuses to take (full disk) is a one-line DataError; megatron's index
    files written by this attempt are removed (it writes them in place and would read them cut short).
    """
    started = time.time()
    try:
        return _build_data(cfg, dp_rank=dp_rank, dp_size=dp_size, barrier=barrier)
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        _remove_index_files_since(os.path.join(cfg.data.cache_dir, "megatron-indices"), started)
        raise DataError(f"could not write the data cache {e.filename or ''} (data.cache_dir="
                        f"{cfg.data.cache_dir!r}): {e.strerror}: free space there or set data.cache_dir to a "
                        "directory with room") from None


def _remove_index_files_since(directory: str, started: float) -> None:
    for entry in os.scandir(directory) if os.path.isdir(directory) else ():
        if entry.is_file() and entry.stat().st_mtime >= started - 1:
            os.remove(entry.path)


def _build_data(cfg: RunConfig, *, dp_rank: int, dp_size: int, barrier: Callable[[], None] | None) -> DataBundle:
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    prefixes, weights = parse_blend(cfg.data.dataset)
    prefixes = _resolve_prefixes(cfg, tokenizer, prefixes, dp_rank, barrier)
    infos = _check_prefixes(cfg, tokenizer, prefixes)
    if cfg.data.valid_dataset:
        # A separate held-out set (e.g. GSM8K test): every document of data.dataset trains.
        train, _ = _build_splits(cfg, tokenizer, infos, weights, split="1,0,0")
        valid_prefixes = _resolve_prefixes(cfg, tokenizer, [cfg.data.valid_dataset], dp_rank, barrier)
        valid_infos = _check_prefixes(cfg, tokenizer, valid_prefixes)
        _, valid = _build_splits(cfg, tokenizer, valid_infos, None, split="0,1,0")
    else:
        valid_infos = infos
        train, valid = _build_splits(cfg, tokenizer, infos, weights)
    _check_split(train, "train", cfg, infos)
    _check_split(valid, "valid", cfg, valid_infos)
    stream = TrainBatches(train, micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                          dp_rank=dp_rank, dp_size=dp_size, seed=cfg.train.seed,
                          fingerprint=train.unique_description_hash)
    info = {"prefixes": prefixes, "weights": weights, "documents": sum(i.num_documents for i in infos),
            "tokens": sum(i.num_tokens for i in infos), "train_samples_per_epoch": len(train),
            "valid_samples": len(valid)}
    return DataBundle(tokenizer, stream, valid, cfg.train.micro_batch_size, info)
