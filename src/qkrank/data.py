"""Corpora → tokenizer → token shards (numpy memmaps) with a JSON manifest.

``python -m qkrank.data --config config.yaml --out results/data`` writes ``tokenizer.json``,
``train.bin``, ``val.bin`` and ``manifest.json`` (sources, token counts, sha256 of every file).
Documents go to validation by a hash of their id, so the split is the same for a stream and a list.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qkrank import builtin_corpus
from qkrank import config as qconfig

EOS = "<|endoftext|>"
SPLITS = ("train", "val")
FILES = ("tokenizer.json", "train.bin", "val.bin", "manifest.json")
_ENCODE_BATCH = 256


class DataError(RuntimeError):
    """Missing, empty or corrupt data; the message names the path."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic document-level split: the first 8 bytes of sha256(id) as a uniform number."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    return u < val_fraction


# ---------------------------------------------------------------- document sources

def _builtin_documents(data_cfg: dict) -> Iterator[dict]:
    yield from builtin_corpus.load_documents()


def _files_documents(data_cfg: dict) -> Iterator[dict]:
    import datasets

    files_cfg = data_cfg["files"]
    paths = files_cfg["paths"]
    if not paths:
        raise DataError("config field 'data.files.paths' is empty; give local parquet/json/txt files or globs")
    resolved = []
    for pattern in paths:
        matches = sorted(Path().glob(pattern)) if any(c in pattern for c in "*?[") else [Path(pattern)]
        if not matches or not all(m.exists() for m in matches):
            raise DataError(f"config field 'data.files.paths': no file matches {pattern!r}")
        resolved += [str(m) for m in matches]
    builder = {"parquet": "parquet", "json": "json", "text": "text", "csv": "csv"}[files_cfg["format"]]
    ds = datasets.load_dataset(builder, data_files=resolved, split="train", streaming=True)
    column = "text" if builder == "text" else files_cfg["text_column"]
    for i, row in enumerate(ds):
        if column not in row:
            raise DataError(f"config field 'data.files.text_column': column {column!r} not in {sorted(row)}")
        yield {"id": str(row.get("id", f"row{i}")), "text": row[column]}


def _hf_documents(data_cfg: dict) -> Iterator[dict]:
    """Weighted, seeded interleaving of streamed Hugging Face datasets."""
    import datasets

    sources = data_cfg["hf"]["sources"]
    if not sources:
        raise DataError("config field 'data.hf.sources' is empty; name at least one dataset")
    streams = []
    for src in sources:
        ds = datasets.load_dataset(src["path"], src["name"], split=src["split"], streaming=True,
                                   data_dir=src["data_dir"])
        column = src["text_column"]
        ds = ds.map(lambda row, c=column, p=src["path"]: {"text": row[c], "qk_source": p})
        streams.append(ds.select_columns(["text", "qk_source"]))
    if len(streams) == 1:
        mixed = streams[0]
    else:
        total = sum(s["weight"] for s in sources)
        mixed = datasets.interleave_datasets(
            streams, probabilities=[s["weight"] / total for s in sources], seed=data_cfg["seed"],
            stopping_strategy="all_exhausted")
    for i, row in enumerate(mixed):
        yield {"id": f"{row['qk_source']}#{i}", "text": row["text"], "source": row["qk_source"]}


DOCUMENT_SOURCES = {"builtin": _builtin_documents, "files": _files_documents, "hf": _hf_documents}


def iter_documents(data_cfg: dict) -> Iterator[dict]:
    for doc in DOCUMENT_SOURCES[data_cfg["source"]](data_cfg):
        if doc["text"] and doc["text"].strip():
            yield doc


# ---------------------------------------------------------------- tokenizer

def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer with ``<|endoftext|>`` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_pretrained(name_or_path: str):
    from tokenizers import Tokenizer

    if Path(name_or_path).is_file():
        return Tokenizer.from_file(name_or_path)
    try:
        return Tokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise DataError(f"config field 'data.tokenizer.name_or_path': cannot load {name_or_path!r} "
                        f"(not a file; hub load failed: {e}); on an offline node give a tokenizer.json path") from None


def eos_id(tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS)
    if token_id is None:
        raise DataError(f"tokenizer has no {EOS} token")
    return token_id


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


# ---------------------------------------------------------------- shards

def _write_split(tokenizer, docs: Iterable[dict], path: Path, limit: int | None, dtype, desc: str) -> int:
    """Encode documents (EOS after each) into a flat binary file; stop at ``limit`` tokens."""
    eos = eos_id(tokenizer)
    written = 0
    bar = tqdm(total=limit, unit="tok", unit_scale=True, desc=desc, disable=not sys.stderr.isatty())
    batch: list[str] = []

    def flush(f) -> bool:
        nonlocal written
        for enc in tokenizer.encode_batch(batch):
            ids = np.asarray(enc.ids + [eos], dtype=dtype)
            if limit is not None:
                ids = ids[: limit - written]
            f.write(ids.tobytes())
            written += len(ids)
            bar.update(len(ids))
            if limit is not None and written >= limit:
                return True
        batch.clear()
        return False

    with open(path, "wb") as f:
        for doc in docs:
            batch.append(doc["text"])
            if len(batch) >= _ENCODE_BATCH and flush(f):
                break
        else:
            if batch:
                flush(f)
    bar.close()
    return written


def prepare(data_cfg: dict, out_dir: Path) -> dict:
    """Build tokenizer, train/val shards and manifest in ``out_dir``, atomically (all or nothing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-data-", dir=out_dir))
    try:
        frac = data_cfg["val_fraction"]
        tok_cfg = data_cfg["tokenizer"]
        if tok_cfg["kind"] == "bpe":
            # The tokenizer is trained on the training documents only.
            train_texts = (d["text"] for d in iter_documents(data_cfg) if not is_validation(d["id"], frac))
            tokenizer = train_bpe(train_texts, tok_cfg["vocab_size"])
        else:
            if not tok_cfg["name_or_path"]:
                raise DataError("config field 'data.tokenizer.name_or_path' is required when kind is 'pretrained'")
            tokenizer = load_pretrained(tok_cfg["name_or_path"])
        tokenizer.save(str(tmp / "tokenizer.json"))
        vocab = tokenizer.get_vocab_size()
        dtype = token_dtype(vocab)
        counts = {}
        for split in SPLITS:
            docs = (d for d in iter_documents(data_cfg) if is_validation(d["id"], frac) == (split == "val"))
            counts[split] = _write_split(tokenizer, docs, tmp / f"{split}.bin", data_cfg[f"{split}_tokens"],
                                         dtype, desc=f"tokenize {split}")
            if counts[split] == 0:
                raise DataError(f"data: the {split} split is empty (source {data_cfg['source']!r}, "
                                f"val_fraction {frac}); the corpus has no usable documents for it")
        manifest = {
            "source": data_cfg["source"],
            "data_config": data_cfg,
            "data_config_hash": qconfig.config_hash(data_cfg),
            "vocab_size": vocab,
            "eos_id": eos_id(tokenizer),
            "dtype": np.dtype(dtype).name,
            "tokens": counts,
            "sha256": {name: sha256_file(tmp / name) for name in ("tokenizer.json", "train.bin", "val.bin")},
        }
        if data_cfg["source"] == "builtin":
            manifest["builtin_corpus_sha256"] = builtin_corpus.corpus_sha256()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for name in FILES:  # the manifest last: its presence means the rest is complete
            os.replace(tmp / name, out_dir / name)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- reading

class TokenShards:
    """Read-only view of a prepared data directory, verified against its manifest."""

    def __init__(self, data_dir: str | Path, verify_hashes: bool = True):
        self.dir = Path(data_dir)
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.exists():
            raise DataError(f"{manifest_path} is missing: run the data stage first")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest_path} is not valid JSON ({e}); delete it and rerun the data stage") from None
        dtype = np.dtype(self.manifest["dtype"])
        self.splits: dict[str, np.ndarray] = {}
        for split in SPLITS:
            path = self.dir / f"{split}.bin"
            expected = self.manifest["tokens"][split] * dtype.itemsize
            if not path.exists() or path.stat().st_size != expected:
                size = path.stat().st_size if path.exists() else "missing"
                raise DataError(f"{path}: size {size} != {expected} bytes in the manifest (truncated?); "
                                f"rerun the data stage")
            if verify_hashes and sha256_file(path) != self.manifest["sha256"][f"{split}.bin"]:
                raise DataError(f"{path}: sha256 differs from the manifest (corrupted); rerun the data stage")
            self.splits[split] = np.memmap(path, dtype=dtype, mode="r")

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def content_hash(self) -> str:
        return qconfig.config_hash(self.manifest["sha256"])

    def windows(self, split: str, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows of ``length`` consecutive tokens beginning at each start: int64 array (len(starts), length)."""
        tokens = self.splits[split]
        idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length, dtype=np.int64)[None, :]
        return tokens[idx].astype(np.int64)

    def n_windows(self, split: str, length: int) -> int:
        n = len(self.splits[split]) - length + 1
        if n < 1:
            raise DataError(f"{self.dir / (split + '.bin')}: {len(self.splits[split])} tokens, fewer than one "
                            f"window of {length}; lower seq_len or add data")
        return n

    def fixed_windows(self, split: str, n_rows: int, length: int) -> np.ndarray:
        """``n_rows`` evenly spaced windows covering the split: the same tokens every call."""
        n = self.n_windows(split, length)
        starts = np.linspace(0, n - 1, num=n_rows).round().astype(np.int64)
        return self.windows(split, starts, length)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Tokenize the study's corpus into token shards.")
    qconfig.add_config_args(parser)
    parser.add_argument("--data-json", help="only the config's data section, as JSON (what the workflow passes)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    args = parser.parse_args(argv)
    try:
        data_cfg = qconfig.validate_data_section(json.loads(args.data_json)) if args.data_json \
            else qconfig.load_from_args(args)["data"]
        manifest = prepare(data_cfg, args.out)
    except (qconfig.ConfigError, DataError) as e:
        sys.exit(f"qkrank.data: error: {e}")
    print(json.dumps({"tokens": manifest["tokens"], "vocab_size": manifest["vocab_size"]}))


if __name__ == "__main__":
    main()
