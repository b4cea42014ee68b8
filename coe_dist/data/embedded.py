"""The embedded corpus on disk: generated and preprocessed once into the cache, then reused.

It goes through the same .bin/.idx + megatron-core path as any user dataset, so the default run tests
the real pipeline. The cache directory is named by a hash of everything the files depend on
(corpus version, num_documents, seed, tokenizer content), so changing any of them builds a new one.

Several ranks (or several runs) may start at once. An exclusive `flock` on a lock file beside the
directory makes exactly one build while the others wait and then find it done; `write_indexed`
publishes the .idx last, so "the .idx exists and checks out" means "complete". This works without
torch.distributed; a caller-provided barrier only makes rank 0 go first so the others never queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from coe_dist.atomic_file import write_atomic
from coe_dist.data.corpus import CORPUS_VERSION, generate_corpus
from coe_dist.data.errors import DataError
from coe_dist.data.indexed import idx_path, inspect_indexed
from coe_dist.data.preprocess import write_indexed
from coe_dist.data.tokenizer import Tokenizer


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive lock across processes (and threads: each call opens its own file description)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def embedded_dir(cache_dir: str, num_documents: int, seed: int, tokenizer: Tokenizer) -> str:
    key = json.dumps({"corpus_version": CORPUS_VERSION, "num_documents": num_documents, "seed": seed,
                      "tokenizer": tokenizer.unique_identifiers}, sort_keys=True)
    return os.path.join(cache_dir, "embedded-" + hashlib.sha256(key.encode()).hexdigest()[:16])


def _is_complete(prefix: str) -> bool:
    if not os.path.exists(idx_path(prefix)):
        return False
    try:
        inspect_indexed(prefix)
    except DataError:
        return False  # e.g. cut short by a full disk: rebuild rather than fail the run
    return True


def ensure_embedded(cache_dir: str, num_documents: int, seed: int, tokenizer_spec: str,
                    tokenizer: Tokenizer) -> str:
    """Return the prefix of the embedded corpus in `cache_dir`, building it first if needed."""
    directory = embedded_dir(cache_dir, num_documents, seed, tokenizer)
    prefix = os.path.join(directory, "corpus")
    with file_lock(directory + ".lock"):
        if not _is_complete(prefix):
            summary = write_indexed(generate_corpus(num_documents, seed), tokenizer_spec, prefix,
                                    total=num_documents, progress=False)
            meta = {"corpus_version": CORPUS_VERSION, "num_documents": num_documents, "seed": seed,
                    "tokenizer": dict(tokenizer.unique_identifiers), **summary}
            write_atomic(Path(directory) / "meta.json", json.dumps(meta, indent=2))
    return prefix


def prepare_embedded(cache_dir: str, num_documents: int, seed: int, tokenizer_spec: str, tokenizer: Tokenizer,
                     *, dp_rank: int, barrier: Callable[[], None] | None) -> str:
    """`ensure_embedded` on every rank; with a barrier, rank 0 builds before the others look."""
    def ensure() -> str:
        return ensure_embedded(cache_dir, num_documents, seed, tokenizer_spec, tokenizer)

    if barrier is None:
        return ensure()
    prefix = ensure() if dp_rank == 0 else ""
    barrier()
    return prefix or ensure()
