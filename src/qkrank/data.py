"""Corpora → tokenizer → token shards (numpy memmaps) with a JSON manifest.

``python -m qkrank.data --config config.yaml --out results/data`` writes ``tokenizer.json``,
``train.bin``, ``val.bin`` and ``manifest.json`` (sources, document and token counts, sha256 of every file).

Sources (``data.source``): ``builtin`` (the shipped corpus), ``files`` (local parquet / json(l) / txt / csv
files or globs read with ``datasets.load_dataset``) and ``hf`` (Hugging Face datasets, streamed, mixed by
weight). Documents go to validation by a hash of their id, so the split is the same for a stream and a
list; each split is cut at exactly its configured token count. The order of documents is a function of
the config alone (``data.seed`` drives shuffling and mixing), so the same config gives the same bytes.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qkrank import builtin_corpus
from qkrank import config as qconfig

EOS = "<|endoftext|>"
SPLITS = ("train", "val")
FILES = ("tokenizer.json", "train.bin", "val.bin", "manifest.json")
TMP_PREFIX = ".tmp-data-"
_ENCODE_BATCH = 256  # documents per encode call (and per task sent to a worker process)
# Byte-level BPE averages about 4 characters of English per token: with a token budget, the BPE tokenizer
# is trained on roughly the text that will be tokenized instead of reading a whole streamed corpus.
_BPE_CHARS_PER_TOKEN = 4
_MIX_DRAWS = 4096  # source choices drawn from the generator at once


class DataError(RuntimeError):
    """Missing, empty or corrupt data; the message names the path or field."""


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

@dataclass
class Source:
    """One stream of documents: ``documents()`` gives a fresh iterator of {"id", "text"} in a fixed order."""

    label: str
    weight: float
    documents: Callable[[], Iterator[dict]]
    description: dict


def buffer_shuffle(items: Iterable, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Seeded streaming shuffle: keep ``buffer_size`` items, emit a random one as each new item arrives."""
    if buffer_size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def weighted_interleave(streams: list[Iterator], weights: list[float], seed: int) -> Iterator[tuple[int, object]]:
    """Yield (stream index, item): each item comes from stream i with probability w_i / Σw.

    Stops as soon as a drawn stream is exhausted, so the mix never drifts from its weights.
    """
    if len(streams) == 1:
        for item in streams[0]:
            yield 0, item
        return
    p = np.asarray(weights, dtype=np.float64)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    while True:
        for i in rng.choice(len(streams), size=_MIX_DRAWS, p=p):
            try:
                item = next(streams[i])
            except StopIteration:
                return
            yield int(i), item


def _doc_id(row: dict, label: str, index: int) -> str:
    """A dataset's own string ``id`` (FineWeb has one) or the row's position in its source."""
    own = row.get("id")
    return own if isinstance(own, str) and own else f"{label}#{index}"


def _builtin_sources(data_cfg: dict) -> list[Source]:
    def documents():
        docs = builtin_corpus.load_documents()
        rng = np.random.default_rng([data_cfg["seed"], 0])
        return buffer_shuffle(docs, data_cfg["shuffle_buffer"], rng)

    return [Source("builtin", 1.0, documents,
                   {"kind": "builtin", "path": f"qkrank/corpus/{builtin_corpus.CORPUS_PATH.name}",
                    "sha256": builtin_corpus.corpus_sha256()})]


def resolve_paths(patterns: list[str]) -> list[Path]:
    """Files named by paths or globs (``**`` recursive), sorted within each pattern, duplicates dropped."""
    if not patterns:
        raise DataError("config field 'data.files.paths' is empty; give local parquet/json/txt/csv files or globs")
    resolved: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise DataError(f"config field 'data.files.paths': {pattern!r} matches no file "
                            f"(relative paths are taken from {Path.cwd()})")
        resolved += [f for f in files if f not in resolved]
    return resolved


_BUILDERS = {"parquet": "parquet", "json": "json", "text": "text", "csv": "csv"}


def _file_rows(path: Path, fmt: str) -> Iterator[dict]:
    import datasets

    # txt: one document per blank-line-separated paragraph (one per line would split prose mid-thought).
    extra = {"sample_by": "paragraph"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(_BUILDERS[fmt], data_files=[str(path)], split="train", streaming=True, **extra)
        yield from ds
    except DataError:
        raise
    except Exception as e:  # pyarrow/json errors: say which file and which format was assumed
        raise DataError(f"{path}: cannot read as data.files.format {fmt!r}: {type(e).__name__}: {e}") from None


def _files_sources(data_cfg: dict) -> list[Source]:
    files_cfg = data_cfg["files"]
    paths = resolve_paths(files_cfg["paths"])
    fmt = files_cfg["format"]
    column = "text" if fmt == "text" else files_cfg["text_column"]
    seed, buffer = data_cfg["seed"], data_cfg["shuffle_buffer"]

    def documents():
        rng = np.random.default_rng([seed, 0])
        order = [paths[i] for i in rng.permutation(len(paths))] if buffer > 1 else paths
        return buffer_shuffle(_rows_of_files(order, fmt, column), buffer, rng)

    return [Source("files", 1.0, documents,
                   {"kind": "files", "format": fmt, "text_column": column,
                    "files": [{"path": str(p), "bytes": p.stat().st_size} for p in paths]})]


def _rows_of_files(paths: list[Path], fmt: str, column: str) -> Iterator[dict]:
    for path in paths:
        for i, row in enumerate(_file_rows(path, fmt)):
            if column not in row:
                raise DataError(f"{path}: no column {column!r} (config field 'data.files.text_column'); "
                                f"columns: {sorted(row)}")
            yield {"id": _doc_id(row, path.name, i), "text": row[column]}


def _hf_label(src: dict) -> str:
    return src["path"] + (f":{src['name']}" if src["name"] else "")


def _hf_sources(data_cfg: dict) -> list[Source]:
    sources = data_cfg["hf"]["sources"]
    if not sources:
        raise DataError("config field 'data.hf.sources' is empty; name at least one dataset")
    out = []
    for k, src in enumerate(sources):
        out.append(Source(_hf_label(src), src["weight"],
                          lambda src=src, k=k: _hf_documents(src, k, data_cfg["seed"], data_cfg["shuffle_buffer"]),
                          {"kind": "hf", **src}))
    return out


def _hf_documents(src: dict, index: int, seed: int, buffer: int) -> Iterator[dict]:
    """One streamed dataset; ``IterableDataset.shuffle`` permutes its shard order and fills a buffer."""
    import datasets

    label, column = _hf_label(src), src["text_column"]
    where = f"config field 'data.hf.sources[{index}]' ({label})"
    try:
        ds = datasets.load_dataset(src["path"], src["name"], split=src["split"], streaming=True,
                                   data_dir=src["data_dir"], revision=src["revision"])
    except Exception as e:
        raise DataError(f"{where}: cannot open the dataset: {type(e).__name__}: {e}; offline, give a local "
                        f"directory as path or pre-download it (docs/cluster.md)") from None
    if ds.features is not None and column not in ds.features:
        raise DataError(f"{where}: no column {column!r} (text_column); columns: {sorted(ds.features)}")
    if buffer > 1:
        ds = ds.shuffle(seed=int(np.random.SeedSequence([seed, index]).generate_state(1)[0]), buffer_size=buffer)
    for i, row in enumerate(ds):
        if column not in row:
            raise DataError(f"{where}: no column {column!r} (text_column); columns: {sorted(row)}")
        yield {"id": _doc_id(row, label, i), "text": row[column]}


SOURCE_KINDS = {"builtin": _builtin_sources, "files": _files_sources, "hf": _hf_sources}


def document_sources(data_cfg: dict) -> list[Source]:
    """The configured sources, checked (files exist, at least one dataset) before anything is read."""
    return SOURCE_KINDS[data_cfg["source"]](data_cfg)


def iter_documents(data_cfg: dict, sources: list[Source] | None = None) -> Iterator[dict]:
    """Non-empty documents {"id", "text", "source"} of all sources, mixed by weight, in the config's order."""
    sources = sources or document_sources(data_cfg)
    streams = [s.documents() for s in sources]
    for index, doc in weighted_interleave(streams, [s.weight for s in sources], data_cfg["seed"]):
        text = doc["text"]
        if isinstance(text, str) and text.strip():
            yield {"id": doc["id"], "text": text, "source": index}


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
    """A ``tokenizer.json`` file (or a directory holding one), else a Hub repo's tokenizer.json (e.g. ``gpt2``).

    Hub files come through the Hugging Face cache, so a node with HF_HUB_OFFLINE=1 uses a pre-filled cache.
    """
    from tokenizers import Tokenizer

    field = "config field 'data.tokenizer.name_or_path'"
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"{field}: {path} is not a tokenizers JSON file: {e}") from None
    if path.suffix == ".json" or name_or_path.startswith(("/", ".", "~")):
        raise DataError(f"{field}: {path} does not exist; give a tokenizer.json path or a Hub name such as gpt2")
    from huggingface_hub import hf_hub_download

    try:
        return Tokenizer.from_file(hf_hub_download(name_or_path, "tokenizer.json"))
    except Exception as e:
        raise DataError(f"{field}: cannot load {name_or_path!r}: not a local file, and the Hub download failed "
                        f"({type(e).__name__}: {e}); on an offline node give a tokenizer.json path") from None


def eos_id(tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS)
    if token_id is None:
        raise DataError(f"the tokenizer has no {EOS} token (documents are separated by it); use one that has")
    return token_id


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def build_tokenizer(data_cfg: dict, sources: list[Source]):
    tok_cfg = data_cfg["tokenizer"]
    if tok_cfg["kind"] == "pretrained":
        if not tok_cfg["name_or_path"]:
            raise DataError("config field 'data.tokenizer.name_or_path' is required when kind is 'pretrained' "
                            "(a tokenizer.json path or a Hub name such as gpt2)")
        return load_pretrained(tok_cfg["name_or_path"])
    budget = data_cfg["train_tokens"] and data_cfg["train_tokens"] * _BPE_CHARS_PER_TOKEN

    def train_texts():
        # Trained on training documents only, so validation text never shapes the vocabulary.
        chars = 0
        for doc in iter_documents(data_cfg, sources):
            if is_validation(doc["id"], data_cfg["val_fraction"]):
                continue
            yield doc["text"]
            chars += len(doc["text"])
            if budget and chars >= budget:
                return

    return train_bpe(train_texts(), tok_cfg["vocab_size"])


# ---------------------------------------------------------------- encoding (one or several processes)

_worker_tokenizer = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer

    # One thread per worker process: num_proc processes, not num_proc × all cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.from_str(tokenizer_json)


def _encode(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all texts, concatenated (uint32), and each text's length: cheap to send between processes."""
    ids = [np.asarray(e.ids, dtype=np.uint32) for e in tokenizer.encode_batch(texts)]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    return (np.concatenate(ids) if ids else np.zeros(0, np.uint32)), lengths


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode(_worker_tokenizer, texts)


def encode_batches(tokenizer, batches: Iterable[list[str]], num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in input order: in this process, or by ``num_proc`` worker processes.

    At most 2 × num_proc batches are in flight, so an endless stream is read only as far as it is used.
    """
    if num_proc <= 1:
        for texts in batches:
            yield _encode(tokenizer, texts)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process holding tokenizer/torch threads
    pool = context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.to_str(),))
    try:
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.apply_async(_encode_in_worker, (texts,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()
        pool.join()


# ---------------------------------------------------------------- shards

class TokenProgress:
    """Tokens written: a tqdm bar on a terminal, a plain line every ``every_s`` seconds in a log file."""

    def __init__(self, total: int | None, every_s: float = 30.0, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.every_s, self.done = total, every_s, 0
        self.bar = tqdm(total=total, unit="tok", unit_scale=True, desc="tokenize", file=self.stream,
                        disable=not self.stream.isatty())
        self._start = self._last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(n)
        now = time.perf_counter()
        if self.bar.disable and now - self._last >= self.every_s:
            of = f"/{self.total:,} ({100 * self.done / self.total:.1f}%)" if self.total else ""
            print(f"tokenize: {self.done:,}{of} tokens, {self.done / (now - self._start):,.0f} tok/s",
                  file=self.stream, flush=True)
            self._last = now

    def close(self) -> None:
        self.bar.close()


class SplitWriter:
    """Appends token ids to one split's file and stops at exactly ``limit`` tokens (None = no limit)."""

    def __init__(self, path: Path, limit: int | None, dtype):
        self.file = open(path, "wb")
        self.limit, self.dtype, self.written = limit, dtype, 0

    @property
    def full(self) -> bool:
        return self.limit is not None and self.written >= self.limit

    def add(self, ids: np.ndarray) -> int:
        """Write as many of ``ids`` as fit; return how many were written."""
        if self.limit is not None:
            ids = ids[: self.limit - self.written]
        self.file.write(ids.astype(self.dtype).tobytes())
        self.written += len(ids)
        return len(ids)

    def close(self) -> None:
        self.file.close()


def tokenize_splits(tokenizer, data_cfg: dict, sources: list[Source], out_dir: Path, dtype) -> dict:
    """One pass over the documents: each goes (with EOS after it) to its split until both are full.

    Returns {"tokens": {split: n}, "documents": {source label: {split: n}}, "source_tokens": ...}.
    """
    eos = eos_id(tokenizer)
    frac = data_cfg["val_fraction"]
    writers = {s: SplitWriter(out_dir / f"{s}.bin", data_cfg[f"{s}_tokens"], dtype) for s in SPLITS}
    labels = [s.label for s in sources]
    documents = {label: dict.fromkeys(SPLITS, 0) for label in labels}
    source_tokens = {label: dict.fromkeys(SPLITS, 0) for label in labels}
    limits = [w.limit for w in writers.values()]
    progress = TokenProgress(None if None in limits else sum(limits))
    routed: deque = deque()  # (split, source) of each document sent to the encoder, in order

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for doc in iter_documents(data_cfg, sources):
            split = "val" if is_validation(doc["id"], frac) else "train"
            if writers[split].full:
                if all(w.full for w in writers.values()):
                    break
                continue
            routed.append((split, labels[doc["source"]]))
            batch.append(doc["text"])
            if len(batch) == _ENCODE_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    try:
        for flat, lengths in encode_batches(tokenizer, batches(), data_cfg["num_proc"]):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for j in range(len(lengths)):
                split, label = routed.popleft()
                writer = writers[split]
                if writer.full:
                    continue
                ids = np.append(flat[offsets[j]:offsets[j + 1]], np.uint32(eos))
                n = writer.add(ids)
                documents[label][split] += 1
                source_tokens[label][split] += n
                progress.update(n)
            if all(w.full for w in writers.values()):
                break
    finally:
        progress.close()
        for w in writers.values():
            w.close()
    return {"tokens": {s: w.written for s, w in writers.items()}, "documents": documents,
            "source_tokens": source_tokens}


def _check_counts(data_cfg: dict, sources: list[Source], counts: dict) -> None:
    what = ", ".join(s.label for s in sources)
    for split in SPLITS:
        n, wanted = counts[split], data_cfg[f"{split}_tokens"]
        if n == 0:
            raise DataError(f"data: the {split} split is empty: source {data_cfg['source']!r} ({what}) has no "
                            f"documents with text for it (val_fraction {data_cfg['val_fraction']})")
        if wanted is not None and n < wanted:
            raise DataError(f"config field 'data.{split}_tokens': {wanted:,} requested, but source "
                            f"{data_cfg['source']!r} ({what}) ran out after {n:,} {split} tokens; lower it to at "
                            f"most {n:,} or add data")


def remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary directories left by a killed run (Snakemake's lock keeps two runs from sharing ``out_dir``)."""
    for stale in out_dir.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def prepare(data_cfg: dict, out_dir: Path) -> dict:
    """Build tokenizer, train/val shards and manifest in ``out_dir``, atomically (all or nothing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    sources = document_sources(data_cfg)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir))
    try:
        tokenizer = build_tokenizer(data_cfg, sources)
        tokenizer.save(str(tmp / "tokenizer.json"))
        vocab = tokenizer.get_vocab_size()
        dtype = token_dtype(vocab)
        result = tokenize_splits(tokenizer, data_cfg, sources, tmp, dtype)
        _check_counts(data_cfg, sources, result["tokens"])
        manifest = {
            "source": data_cfg["source"],
            "sources": [{"label": s.label, "weight": s.weight, **s.description,
                         "documents": result["documents"][s.label], "tokens": result["source_tokens"][s.label]}
                        for s in sources],
            "data_config": data_cfg,
            # num_proc changes how fast, not what: it is left out of the identity.
            "data_config_hash": qconfig.config_hash({k: v for k, v in data_cfg.items() if k != "num_proc"}),
            "tokenizer": {**data_cfg["tokenizer"], "vocab_size": vocab},
            "vocab_size": vocab,
            "eos_id": eos_id(tokenizer),
            "dtype": np.dtype(dtype).name,
            "tokens": result["tokens"],
            "sha256": {name: sha256_file(tmp / name) for name in ("tokenizer.json", "train.bin", "val.bin")},
            "versions": _versions(),
        }
        if data_cfg["source"] == "builtin":
            manifest["builtin_corpus_sha256"] = builtin_corpus.corpus_sha256()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # The old manifest goes first and the new one comes last: while files are being swapped there is
        # no manifest, so a reader never pairs one run's manifest with another run's shards.
        (out_dir / "manifest.json").unlink(missing_ok=True)
        for name in FILES:
            os.replace(tmp / name, out_dir / name)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("datasets", "tokenizers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


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
    parser.add_argument("--num-proc", type=int, help="tokenizer processes (overrides data.num_proc)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    args = parser.parse_args(argv)
    try:
        data_cfg = qconfig.validate_data_section(json.loads(args.data_json)) if args.data_json \
            else qconfig.load_from_args(args)["data"]
        if args.num_proc:
            data_cfg["num_proc"] = args.num_proc
        manifest = prepare(data_cfg, args.out)
    except (qconfig.ConfigError, DataError) as e:
        sys.exit(f"qkrank.data: error: {e}")
    print(json.dumps({"tokens": manifest["tokens"], "vocab_size": manifest["vocab_size"],
                      "sources": [{k: s[k] for k in ("label", "documents", "tokens")} for s in manifest["sources"]]}))


if __name__ == "__main__":
    main()
