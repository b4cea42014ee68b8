"""Data: the embedded corpus, tokenizers, `coe-dist preprocess`, and the megatron-core training loader.

    corpus.py      generate_corpus(num_documents, seed): GSM8K-style word problems, no download
    tokenizer.py   ByteTokenizer, HFTokenizer, load_tokenizer("byte" | path/to/tokenizer.json)
    preprocess.py  text / JSONL / parquet -> PREFIX.bin + PREFIX.idx; register_cli(subparsers)
    indexed.py     checks of a .bin/.idx pair before megatron-core reads it
    embedded.py    the embedded corpus, preprocessed once into data.cache_dir (file-locked)
    loader.py      build_data(cfg, dp_rank=, dp_size=, barrier=) -> DataBundle (train stream, valid set)
    errors.py      DataError

Importing this package is cheap: megatron-core (about 5 s to import) loads on first use.
"""

from coe_dist.data.errors import DataError

__all__ = ["DataError"]
