"""Text files -> a megatron-core indexed dataset (PREFIX.bin + PREFIX.idx), the format the loader trains on.

Inputs, by extension:
  .txt      one document per block of lines separated by a blank line (a file without blank lines is
            one document); blocks keep their inner newlines.
  .jsonl    one JSON object per line; the document is its `fields` joined with a newline.
  .parquet  one row per document; likewise `fields` joined with a newline.
`fields` defaults to ["text"]; GSM8K is `--fields question,answer`. Whitespace-only documents are skipped.

Every document is tokenized, followed by the tokenizer's end-of-document id, and stored as one megatron
document (uint16 ids when the vocabulary allows, else int32). Both files are written under temporary
names and renamed at the end, the .idx last, so an interrupted run never leaves a pair that loads.

CLI: coe-dist preprocess --input FILES... --tokenizer TOK --output PREFIX [--fields a,b] [--workers N]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from coe_dist.argtypes import positive_int
from coe_dist.config import expand_path
from coe_dist.data.errors import DataError
from coe_dist.data.indexed import bin_path, idx_path, quiet_megatron_import, token_dtype
from coe_dist.data.tokenizer import Tokenizer, load_tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")
CHUNK_DOCS = 256  # documents per worker task: large enough to amortise pickling, small for a smooth bar


# ---------------------------------------------------------------- reading documents

def _iter_txt(path: Path) -> Iterator[str]:
    block: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
    except UnicodeDecodeError as e:
        raise DataError(f"text file {str(path)!r} is not UTF-8 (byte {e.start}: {e.reason}): convert it, "
                        "e.g. `iconv -t UTF-8`") from None
    if block:
        yield "".join(block).rstrip("\n")


def _join_fields(record: dict, fields: list[str], where: str) -> str:
    missing = [f for f in fields if f not in record]
    if missing:
        raise DataError(f"{where} has no field {missing[0]!r} (it has {', '.join(map(repr, record)) or 'none'}): "
                        "choose the text columns with --fields, e.g. --fields question,answer")
    return "\n".join("" if record[f] is None else str(record[f]) for f in fields)


def _iter_jsonl(path: Path, fields: list[str]) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"JSONL file {str(path)!r} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg}): fix or remove that line") from None
            if not isinstance(record, dict):
                raise DataError(f"{where} holds a {type(record).__name__}, not an object: each line must be "
                                'a JSON object such as {"text": "..."}')
            yield _join_fields(record, fields, where)


def _iter_parquet(path: Path, fields: list[str]) -> Iterator[str]:
    pf = _open_parquet(path)
    columns = pf.schema_arrow.names
    missing = [f for f in fields if f not in columns]
    if missing:
        raise DataError(f"parquet file {str(path)!r} has no column {missing[0]!r} (it has "
                        f"{', '.join(columns)}): choose the text columns with --fields, e.g. --fields "
                        "question,answer")
    for batch in pf.iter_batches(batch_size=1024, columns=fields):
        data = batch.to_pydict()
        for row in zip(*(data[f] for f in fields), strict=True):
            yield "\n".join("" if v is None else str(v) for v in row)


def _open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants
        raise DataError(f"parquet file {str(path)!r} does not open ({e}): check that it is a complete "
                        "parquet file") from None


def count_documents(path: Path) -> int | None:
    """Rows of a parquet file from its footer (free); None where counting would mean reading the file."""
    return _open_parquet(path).metadata.num_rows if path.suffix == ".parquet" else None


def check_input(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"input file {str(path)!r} does not exist: pass existing files to --input")
    if path.suffix not in SUFFIXES:
        raise DataError(f"input file {str(path)!r} has suffix {path.suffix!r}: supported are "
                        f"{', '.join(SUFFIXES)} (rename JSON Lines files to .jsonl)")


def iter_documents(path: Path, fields: list[str] | None) -> Iterator[str]:
    check_input(path)
    if path.suffix == ".txt":
        return _iter_txt(path)
    fields = fields or ["text"]
    return _iter_jsonl(path, fields) if path.suffix == ".jsonl" else _iter_parquet(path, fields)


# ---------------------------------------------------------------- tokenizing

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_spec: str) -> None:
    global _worker_tokenizer
    # One process per core already: the Rust tokenizer's own thread pool would only oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_spec)


def _encode(tokenizer: Tokenizer, texts: list[str], dtype: type) -> list[np.ndarray]:
    # One text at a time: `tokenizers`' encode_batch was 2-3x slower here once torch was imported (its
    # thread pool competes with torch's), and --workers is the way to use more cores.
    return [np.array([*tokenizer.encode(text), tokenizer.eod], dtype=dtype) for text in texts]


def _encode_in_worker(job: tuple[list[str], type]) -> list[np.ndarray]:
    texts, dtype = job
    return _encode(_worker_tokenizer, texts, dtype)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _encoded_chunks(texts: Iterable[str], tokenizer_spec: str, tokenizer: Tokenizer, dtype: type,
                    workers: int) -> Iterator[list[np.ndarray]]:
    if workers == 1:
        for chunk in _chunks(texts, CHUNK_DOCS):
            yield _encode(tokenizer, chunk, dtype)
        return
    # spawn, not fork: the parent may hold torch / tokenizers threads, which fork does not copy safely.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_spec,)) as pool:
        # imap over a bounded window keeps the reader at most 4 chunks per worker ahead of the writer.
        jobs = ((chunk, dtype) for chunk in _chunks(texts, CHUNK_DOCS))
        for window in _chunks(jobs, 4 * workers):
            yield from pool.imap(_encode_in_worker, window)


# ---------------------------------------------------------------- writing

def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _publish(tmp_prefix: str, prefix: str) -> None:
    """Rename the finished temp pair into place; the .idx goes last, so a pair loads only when complete."""
    for path in (tmp_prefix + ".bin", tmp_prefix + ".idx"):
        _fsync(path)
    if os.path.exists(idx_path(prefix)):
        os.remove(idx_path(prefix))  # from here on an old .idx can never pair with the new .bin
    os.replace(tmp_prefix + ".bin", bin_path(prefix))
    os.replace(tmp_prefix + ".idx", idx_path(prefix))


def write_indexed(documents: Iterable[str], tokenizer_spec: str, output_prefix: str, *, workers: int = 1,
                  total: int | None = None, progress: bool | None = None) -> dict:
    """Tokenize `documents` into OUTPUT_PREFIX.bin/.idx; return a summary dict.

    progress: True shows a bar on stderr, False hides it, None shows it when stderr is a terminal.
    """
    if workers < 1:
        raise DataError(f"workers={workers}: must be >= 1 (the number of tokenizing processes)")
    start = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_spec)
    dtype = token_dtype(tokenizer.vocab_size)
    quiet_megatron_import()
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
    stats = {"skipped_empty": 0}

    def non_empty(texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            if text.strip():
                yield text
            else:
                stats["skipped_empty"] += 1

    documents_written = tokens_written = 0
    bar = tqdm(total=total, unit="doc", file=sys.stderr, disable=(None if progress is None else not progress),
               desc=f"preprocess {os.path.basename(output_prefix)}")
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
    try:
        for encoded in _encoded_chunks(non_empty(documents), tokenizer_spec, tokenizer, dtype, workers):
            for ids in encoded:
                builder.add_document(ids, [len(ids)])
                tokens_written += len(ids)
            documents_written += len(encoded)
            bar.update(len(encoded))
        if documents_written == 0:  # a dataset of no documents would only fail at training time
            raise DataError(f"no documents to write to {output_prefix}.bin/.idx: the input holds no non-empty "
                            f"text ({stats['skipped_empty']} empty skipped); nothing was written: check --input "
                            "and --fields")
        builder.finalize(tmp_prefix + ".idx")
        _publish(tmp_prefix, output_prefix)
    except OSError as e:  # a full disk: name the output, not the temporary file (or nothing, from write())
        raise OSError(e.errno, e.strerror or str(e), f"{output_prefix}.bin/.idx") from None
    finally:
        bar.close()
        with contextlib.suppress(OSError):  # a full disk fails the buffered flush again: the error is above
            builder.data_file.close()  # already closed on success; on failure, close before deleting
        for path in (tmp_prefix + ".bin", tmp_prefix + ".idx"):
            if os.path.exists(path):
                os.remove(path)
    return {"output_prefix": output_prefix, "documents": documents_written, "tokens": tokens_written,
            "skipped_empty": stats["skipped_empty"], "dtype": np.dtype(dtype).name,
            "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
            "seconds": round(time.perf_counter() - start, 3)}


def preprocess(inputs: list[str], tokenizer_spec: str, output_prefix: str, fields: list[str] | None = None,
               workers: int = 1, *, progress: bool | None = None) -> dict:
    """Tokenize .txt / .jsonl / .parquet files into OUTPUT_PREFIX.bin/.idx; return the summary.

    Summary keys: output_prefix, files, documents, tokens (including one eod per document),
    skipped_empty, dtype, vocab_size, eod, seconds.
    """
    if not inputs:
        raise DataError("no input files: pass at least one .txt, .jsonl or .parquet file to --input")
    paths = [Path(p) for p in inputs]
    for path in paths:
        check_input(path)  # fail on a typo in the last file before tokenizing the first
    counts = [count_documents(p) for p in paths]
    total = sum(counts) if None not in counts else None
    documents = itertools.chain.from_iterable(iter_documents(p, fields) for p in paths)
    summary = write_indexed(documents, tokenizer_spec, output_prefix, workers=workers, total=total,
                            progress=progress)
    return {"files": [str(p) for p in paths], **summary}


# ---------------------------------------------------------------- CLI

def _parse_fields(text: str | None) -> list[str] | None:
    if text is None:
        return None
    fields = [f.strip() for f in text.split(",") if f.strip()]
    if not fields:
        raise DataError(f"--fields {text!r}: give comma-separated column names, e.g. --fields question,answer")
    return fields


def run_cli(args: argparse.Namespace) -> int:
    """Handler of `coe-dist preprocess`: 0 on success, 2 on bad input (the message goes to stderr)."""
    try:
        summary = preprocess(args.input, args.tokenizer, args.output, _parse_fields(args.fields), args.workers)
    except DataError as e:
        print(f"coe-dist preprocess: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {summary['output_prefix']}.bin/.idx: {summary['documents']} documents, "
          f"{summary['tokens']} tokens ({summary['dtype']}), {summary['skipped_empty']} empty skipped, "
          f"{summary['seconds']:.1f} s")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `preprocess` subcommand; the caller dispatches with `args.func(args)`."""
    p = subparsers.add_parser(
        "preprocess", help="tokenize text files into a megatron indexed dataset (.bin/.idx)",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", type=expand_path,
                   help="input files: .txt, .jsonl or .parquet")
    p.add_argument("--tokenizer", default="byte", metavar="TOK",
                   help="'byte' (default) or the path of a HF tokenizer.json")
    p.add_argument("--output", required=True, metavar="PREFIX", type=expand_path,
                   help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--fields", default=None, metavar="A,B",
                   help="JSONL/parquet fields joined with a newline per document (default: text)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N", help="tokenizing processes (default 1)")
    p.set_defaults(func=run_cli)
    return p
