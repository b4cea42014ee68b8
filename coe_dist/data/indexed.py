"""The megatron-core indexed dataset file pair PREFIX.bin / PREFIX.idx: checking it before megatron reads it.

megatron-core checks these files with bare `assert`s (or not at all: a truncated .bin only fails when
a sample past its end is read, mid-training). `inspect_indexed` reads the .idx header and sizes itself
and raises a DataError naming the file, the problem and the fix.

.idx layout (version 1): 9-byte magic, u64 version, u8 dtype code, u64 sequence count S, u64 document
count D, then int32[S] sequence lengths, int64[S] byte pointers into the .bin, int64[D] document
boundaries (sequence indices, starting at 0 and ending at S).
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np

from coe_dist.data.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
# megatron-core's DType codes (indexed_dataset.DType); repeated so a bad file is diagnosed before import.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}


@dataclass(frozen=True)
class IndexedInfo:
    prefix: str
    dtype: type
    num_sequences: int
    num_documents: int  # megatron counts D - 1: the first boundary is the leading 0
    num_tokens: int


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def token_dtype(vocab_size: int) -> type:
    """uint16 halves the file when every id fits; the same threshold as megatron's optimal_dtype."""
    return np.uint16 if vocab_size < 65500 else np.int32


def quiet_megatron_import() -> None:
    """Import megatron.core without its import-time warnings.

    Any megatron.core submodule import runs megatron/core/__init__.py, which pulls in the whole
    model-parallel stack (about 5 s) and warns about things this package never uses: missing
    Transformer Engine / Apex kernels, deprecated torch.jit decorators, its own import cycles.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.datasets.indexed_dataset  # noqa: F401


def _rerun_hint(prefix: str) -> str:
    return f"re-create it with `coe-dist preprocess --input FILES... --output {prefix}`"


def _read_header(prefix: str) -> tuple[type, int, int]:
    path = idx_path(prefix)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != INDEX_MAGIC:
        raise DataError(f"index file {path!r} is not a megatron-core .idx ({size} bytes, bad or short "
                        f"header): {_rerun_hint(prefix)}")
    version, code, num_seq, num_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in DTYPE_CODES:
        raise DataError(f"index file {path!r} has version {version}, dtype code {code}; expected version 1 "
                        f"and a code in {sorted(DTYPE_CODES)}: {_rerun_hint(prefix)}")
    expected = HEADER_BYTES + num_seq * (4 + 8) + num_doc * 8
    if size < expected:
        raise DataError(f"index file {path!r} is truncated: {size} bytes, its header promises {expected} "
                        f"({num_seq} sequences, {num_doc} document boundaries): {_rerun_hint(prefix)}")
    return DTYPE_CODES[code], num_seq, num_doc


def inspect_indexed(prefix: str) -> IndexedInfo:
    """Check that PREFIX.bin/.idx exist, agree with each other and are complete."""
    for path in (idx_path(prefix), bin_path(prefix)):
        if not os.path.isfile(path):
            raise DataError(f"dataset file {path!r} does not exist (dataset prefix {prefix!r}): check "
                            f"data.dataset, or {_rerun_hint(prefix)}")
    dtype, num_seq, num_doc = _read_header(prefix)
    index = np.memmap(idx_path(prefix), mode="r", dtype=np.uint8)
    lengths = np.frombuffer(index, dtype=np.int32, count=num_seq, offset=HEADER_BYTES)
    bounds = np.frombuffer(index, dtype=np.int64, count=num_doc, offset=HEADER_BYTES + 12 * num_seq)
    if num_doc == 0 or bounds[0] != 0 or bounds[-1] != num_seq:
        raise DataError(f"index file {idx_path(prefix)!r} has inconsistent document boundaries: "
                        f"{_rerun_hint(prefix)}")
    num_tokens = int(lengths.sum(dtype=np.int64))
    expected = num_tokens * np.dtype(dtype).itemsize
    actual = os.path.getsize(bin_path(prefix))
    if actual != expected:
        problem = "is truncated" if actual < expected else "is longer than its index describes"
        raise DataError(f"data file {bin_path(prefix)!r} {problem}: {actual} bytes, the index "
                        f"{idx_path(prefix)!r} describes {expected} ({num_tokens} tokens of "
                        f"{np.dtype(dtype).name}): {_rerun_hint(prefix)}")
    _check_pointers(prefix, index, num_seq, lengths, np.dtype(dtype).itemsize, actual)
    return IndexedInfo(prefix, dtype, num_seq, num_doc - 1, num_tokens)


def _check_pointers(prefix: str, index: np.ndarray, num_seq: int, lengths: np.ndarray, itemsize: int,
                    bin_bytes: int) -> None:
    """Every sequence [pointer, pointer + length) lies inside the .bin (megatron would read past it mid-run)."""
    pointers = np.frombuffer(index, dtype=np.int64, count=num_seq, offset=HEADER_BYTES + 4 * num_seq)
    ends = pointers + lengths.astype(np.int64) * itemsize
    bad = np.flatnonzero((lengths < 0) | (pointers < 0) | (ends > bin_bytes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"index file {idx_path(prefix)!r}: sequence {i} (of {num_seq}, {bad.size} bad) points at "
                        f"bytes {int(pointers[i])}..{int(ends[i])} but {bin_path(prefix)!r} has {bin_bytes}: "
                        f"{_rerun_hint(prefix)}")


def max_token_id(info: IndexedInfo) -> int:
    """Largest id in the .bin: one vectorised pass over the memory map (about 1 GB/s)."""
    if info.num_tokens == 0:
        return -1
    return int(np.memmap(bin_path(info.prefix), mode="r", dtype=info.dtype).max())
