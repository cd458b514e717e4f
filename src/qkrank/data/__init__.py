"""Corpora → tokenizer → token shards (numpy memmaps) with a JSON manifest.

``python -m qkrank.data --config config.yaml --out results/data`` writes ``tokenizer.json``,
``train.bin``, ``val.bin`` and ``manifest.json`` (sources, document and token counts, sha256 of every file).

Sources (``data.source``): ``builtin`` (the shipped corpus), ``files`` (local parquet / json(l) / txt / csv
files or globs read with ``datasets.load_dataset``) and ``hf`` (Hugging Face datasets, streamed, mixed by
weight). Documents go to validation by a hash of their id, so the split is the same for a stream and a
list; each split is cut at exactly its configured token count. The order of documents is a function of
the config alone (``data.seed`` drives shuffling and mixing), so the same config gives the same bytes.

Modules: ``common`` (errors, file names, the split rule), ``sources``, ``tokenizer`` (training, loading,
encoding), ``shards`` (writing and reading token files), ``manifest`` (the stage, atomically), ``cli``.
"""

from qkrank.data.cli import main
from qkrank.data.common import EOS, FILES, SPLITS, TMP_PREFIX, DataError, is_validation, sha256_file
from qkrank.data.manifest import prepare, remove_stale_temporaries
from qkrank.data.shards import SplitWriter, TokenProgress, TokenShards, tokenize_splits
from qkrank.data.sources import (
    SOURCE_KINDS,
    Source,
    buffer_shuffle,
    document_sources,
    iter_documents,
    resolve_paths,
    weighted_interleave,
)
from qkrank.data.tokenizer import build_tokenizer, encode_batches, eos_id, load_pretrained, token_dtype, train_bpe

__all__ = [
    "EOS", "FILES", "SOURCE_KINDS", "SPLITS", "TMP_PREFIX", "DataError", "Source", "SplitWriter", "TokenProgress",
    "TokenShards", "buffer_shuffle", "build_tokenizer", "document_sources", "encode_batches", "eos_id",
    "is_validation", "iter_documents", "load_pretrained", "main", "prepare", "remove_stale_temporaries",
    "resolve_paths", "sha256_file", "token_dtype", "tokenize_splits", "train_bpe", "weighted_interleave",
]
