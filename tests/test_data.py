"""Data package, part 1: the embedded corpus, tokenizers and `coe-dist preprocess` (.bin/.idx writing)."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coe_dist.data.corpus import TEMPLATES, format_problem, generate_corpus
from coe_dist.data.errors import DataError
from coe_dist.data.preprocess import preprocess, register_cli
from coe_dist.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

from requires import SHARED, requires

DATA = SHARED / "data"
NEOX = DATA / "tokenizers" / "gpt-neox-20b.tokenizer.json"
GSM8K = DATA / "gsm8k" / "train.parquet"
needs_neox = requires(NEOX.is_file(), f"{NEOX} absent (shared data not checked out)")
needs_gsm8k = requires(GSM8K.is_file(), f"{GSM8K} absent (shared data not checked out)")

COMPUTATION = re.compile(r"(\d+) ([-+*/]) (\d+)( / 100)? = \$?(\d+)")  # "/ 100": percentages


def read_back(prefix: str) -> list[list[int]]:
    """Documents of PREFIX.bin/.idx through megatron-core's own reader."""
    from coe_dist.data.indexed import quiet_megatron_import

    quiet_megatron_import()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def expected(tokenizer, documents: list[str]) -> list[list[int]]:
    return [tokenizer.encode(d) + [tokenizer.eod] for d in documents]


# ---------------------------------------------------------------- corpus

def test_corpus_is_deterministic_and_prefix_stable():
    a = generate_corpus(300, seed=7)
    assert a == generate_corpus(300, seed=7)
    assert a[:120] == generate_corpus(120, seed=7)
    assert a != generate_corpus(300, seed=8)
    assert len(set(a)) >= 0.95 * len(a)  # varied, not a handful of strings repeated


def _check_arithmetic(doc: str) -> None:
    question, *steps, final = doc.split("\n")
    assert question.endswith("?") and final.startswith("#### ")
    results = []
    for a, op, b, percent, c in COMPUTATION.findall("\n".join(steps)):
        a, b, c = int(a), int(b), int(c)
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if a % b == 0 else None}[op]
        value = value // 100 if percent and value % 100 == 0 else (None if percent else value)
        assert value == c, f"wrong step {a} {op} {b}{percent} = {c} in:\n{doc}"
        results.append(c)
    assert results and results[-1] == int(final[5:]), doc


def test_every_template_writes_correct_worked_answers():
    assert len(TEMPLATES) >= 10
    for template in TEMPLATES:
        docs = {format_problem(template(random.Random(k))) for k in range(25)}
        assert len(docs) >= 20, f"{template.__name__} has too little variety"
        for doc in docs:
            _check_arithmetic(doc)
            assert all(int(n) >= 0 for n in re.findall(r"-?\d+", doc)), doc


def test_corpus_mixes_templates():
    docs = generate_corpus(400, seed=0)
    for doc in docs[:100]:
        _check_arithmetic(doc)
    # The first words of the question sentence tell the template families apart.
    asks = {" ".join(d.split("\n")[0].rsplit(". ", 1)[-1].split()[:3]) for d in docs}
    assert len(asks) >= 10, asks


# ---------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257 and tok.eod == 256
    for text in ["", "3 * 4 = 12\n#### 12", "héllo wörld ✓ 数学 🙂"]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert tok.decode(tok.encode("a") + [tok.eod] + tok.encode("b")) == "a<|endoftext|>b"
    assert dict(tok.unique_identifiers)["cls"] == "ByteTokenizer"


@needs_neox
def test_hf_tokenizer_loads_offline():
    tok = load_tokenizer(str(NEOX))
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 50277
    assert tok.eod == tok._tok.token_to_id("<|endoftext|>")
    text = "Natalia sold 48/2 = 24 clips in May.\n#### 72"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.unique_identifiers["sha256"]) == 64


def test_tokenizer_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_tokenizer(str(missing))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not a tokenizer")
    with pytest.raises(DataError, match=re.escape(str(garbage)) + ".*does not load"):
        load_tokenizer(str(garbage))


def test_tokenizer_without_eod_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "no_eos.json"
    tok.save(str(path))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*no end-of-document token"):
        load_tokenizer(str(path))


# ---------------------------------------------------------------- preprocess

DOCS = ["Tom has 3 apples.\nHe buys 2 more.\n#### 5", "Ünïcode text ✓", "x" * 700, "line one\nline two"]


def write_inputs(tmp_path: Path) -> dict[str, Path]:
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n\n")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"question": [d.split("\n")[0] for d in DOCS],
                             "answer": [d.split("\n", 1)[-1] for d in DOCS]}), parquet)
    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n".join(DOCS) + "\n\n \n\n")  # blank-line-separated blocks, whitespace-only tail
    return {"jsonl": jsonl, "parquet": parquet, "txt": txt}


def test_preprocess_jsonl_parquet_txt_read_back_equal(tmp_path):
    files = write_inputs(tmp_path)
    tok = ByteTokenizer()
    s = preprocess([str(files["jsonl"])], "byte", str(tmp_path / "j"), None, 1)
    assert (s["documents"], s["dtype"]) == (len(DOCS), "uint16")
    assert s["tokens"] == sum(len(d.encode()) + 1 for d in DOCS) and s["seconds"] >= 0
    assert read_back(str(tmp_path / "j")) == expected(tok, DOCS)

    preprocess([str(files["parquet"])], "byte", str(tmp_path / "p"), ["question", "answer"], 1)
    joined = [d.split("\n")[0] + "\n" + d.split("\n", 1)[-1] for d in DOCS]
    assert read_back(str(tmp_path / "p")) == expected(tok, joined)

    # "line one\nline two" stays one document: only a blank line separates documents.
    s = preprocess([str(files["txt"])], "byte", str(tmp_path / "t"), None, 1)
    assert s["documents"] == len(DOCS)
    assert read_back(str(tmp_path / "t")) == expected(tok, DOCS)

    # Several inputs concatenate in order; empty documents are counted, not written.
    files["jsonl"].write_text(files["jsonl"].read_text() + json.dumps({"text": "   "}) + "\n")
    s = preprocess([str(files["txt"]), str(files["jsonl"])], "byte", str(tmp_path / "both"), None, 1)
    assert (s["documents"], s["skipped_empty"]) == (2 * len(DOCS), 1)
    assert read_back(str(tmp_path / "both")) == expected(tok, DOCS + DOCS)


def test_preprocess_workers_write_identical_files(tmp_path):
    docs = generate_corpus(700, seed=3)  # three chunks of 256, so the pool really splits the work
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess([str(path)], "byte", str(tmp_path / "w1"), None, 1)
    preprocess([str(path)], "byte", str(tmp_path / "w2"), None, 2)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    assert read_back(str(tmp_path / "w2")) == expected(ByteTokenizer(), docs)


@needs_gsm8k
def test_preprocess_gsm8k_fields_question_answer(tmp_path):
    s = preprocess([str(GSM8K)], "byte", str(tmp_path / "gsm"), ["question", "answer"], 1)
    table = pq.read_table(GSM8K).to_pydict()
    assert s["documents"] == len(table["question"]) == 7473
    docs = read_back(str(tmp_path / "gsm"))
    for i in (0, 1, 7472):
        text = table["question"][i] + "\n" + table["answer"][i]
        assert docs[i] == list(text.encode()) + [256]
        assert "####" in text


@needs_gsm8k
@needs_neox
def test_preprocess_gsm8k_with_neox_tokenizer(tmp_path):
    rows = pq.read_table(GSM8K).slice(0, 150)
    subset = tmp_path / "gsm_subset.parquet"
    pq.write_table(rows, subset)
    s = preprocess([str(subset)], str(NEOX), str(tmp_path / "neox"), ["question", "answer"], 1)
    assert s["dtype"] == "uint16" and s["vocab_size"] == 50277
    tok = load_tokenizer(str(NEOX))
    data = rows.to_pydict()
    texts = [q + "\n" + a for q, a in zip(data["question"], data["answer"], strict=True)]
    assert read_back(str(tmp_path / "neox")) == expected(tok, texts)


def test_preprocess_errors_name_the_file(tmp_path):
    files = write_inputs(tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=re.escape(str(files["parquet"])) + ".*no column 'text'.*--fields"):
        preprocess([str(files["parquet"])], "byte", out, None, 1)
    with pytest.raises(DataError, match=re.escape(str(files["jsonl"])) + "' line 1 has no field 'body'"):
        preprocess([str(files["jsonl"])], "byte", out, ["body"], 1)
    with pytest.raises(DataError, match="does not exist"):
        preprocess([str(tmp_path / "missing.jsonl")], "byte", out, None, 1)
    odd = tmp_path / "docs.csv"
    odd.write_text("a,b\n")
    with pytest.raises(DataError, match=re.escape(str(odd)) + ".*supported are"):
        preprocess([str(odd)], "byte", out, None, 1)
    with pytest.raises(DataError, match="workers=0"):
        preprocess([str(files["txt"])], "byte", out, None, 0)
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_failed_rewrite_leaves_old_pair_intact_and_no_temp_files(tmp_path):
    files = write_inputs(tmp_path)
    prefix = str(tmp_path / "data")
    preprocess([str(files["jsonl"])], "byte", prefix, None, 1)
    before = read_back(prefix)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "fine"}) + "\n{oops\n")
    with pytest.raises(DataError, match=re.escape(str(bad)) + "' line 3 is not valid JSON"):
        preprocess([str(bad)], "byte", prefix, None, 1)
    assert read_back(prefix) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("data")) == ["data.bin", "data.idx"]


def test_cli_subcommand(tmp_path, capsys):
    files = write_inputs(tmp_path)
    parser = argparse.ArgumentParser(prog="coe-dist")
    register_cli(parser.add_subparsers(dest="command", required=True))
    out = str(tmp_path / "cli")
    args = parser.parse_args(["preprocess", "--input", str(files["parquet"]), "--output", out,
                              "--fields", "question,answer", "--workers", "1"])
    assert args.func(args) == 0
    assert f"wrote {out}.bin/.idx: {len(DOCS)} documents" in capsys.readouterr().out
    assert os.path.exists(out + ".bin") and os.path.exists(out + ".idx")
    args = parser.parse_args(["preprocess", "--input", str(files["parquet"]), "--output", out])
    assert args.func(args) == 2
    assert str(files["parquet"]) in capsys.readouterr().err
    assert np.array_equal(np.fromfile(out + ".bin", dtype=np.uint16)[-1:], [256])  # old output intact
