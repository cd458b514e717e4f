"""Document sources (``data.source``): builtin, local files, Hugging Face datasets; seeded shuffling and mixing.

Every source gives documents {"id", "text"} in an order that is a function of the config alone.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkrank import builtin_corpus
from qkrank.data.common import DataError
from qkrank.settings import DataSettings, HFSource

_MIX_DRAWS = 4096  # source choices drawn from the generator at once


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


def _builtin_sources(data: DataSettings) -> list[Source]:
    def documents():
        docs = builtin_corpus.load_documents()
        rng = np.random.default_rng([data.seed, 0])
        return buffer_shuffle(docs, data.shuffle_buffer, rng)

    return [Source("builtin", 1.0, documents,
                   {"kind": "builtin", "path": f"qkrank/corpus/{builtin_corpus.CORPUS_PATH.name}",
                    "sha256": builtin_corpus.corpus_sha256()})]


def resolve_paths(patterns: Iterable[str]) -> list[Path]:
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


def _files_sources(data: DataSettings) -> list[Source]:
    paths = resolve_paths(data.files.paths)
    fmt = data.files.format
    column = "text" if fmt == "text" else data.files.text_column
    seed, buffer = data.seed, data.shuffle_buffer

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


def _hf_sources(data: DataSettings) -> list[Source]:
    if not data.hf.sources:
        raise DataError("config field 'data.hf.sources' is empty; name at least one dataset")
    return [Source(src.label, src.weight,
                   lambda src=src, k=k: _hf_documents(src, k, data.seed, data.shuffle_buffer),
                   {"kind": "hf", **src.to_dict()})
            for k, src in enumerate(data.hf.sources)]


def _hf_documents(src: HFSource, index: int, seed: int, buffer: int) -> Iterator[dict]:
    """One streamed dataset; ``IterableDataset.shuffle`` permutes its shard order and fills a buffer."""
    import datasets

    label, column = src.label, src.text_column
    where = f"config field 'data.hf.sources[{index}]' ({label})"
    try:
        ds = datasets.load_dataset(src.path, src.name, split=src.split, streaming=True,
                                   data_dir=src.data_dir, revision=src.revision)
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


def document_sources(data: DataSettings) -> list[Source]:
    """The configured sources, checked (files exist, at least one dataset) before anything is read."""
    return SOURCE_KINDS[data.source](data)


def iter_documents(data: DataSettings, sources: list[Source] | None = None) -> Iterator[dict]:
    """Non-empty documents {"id", "text", "source"} of all sources, mixed by weight, in the config's order."""
    sources = sources or document_sources(data)
    streams = [s.documents() for s in sources]
    for index, doc in weighted_interleave(streams, [s.weight for s in sources], data.seed):
        text = doc["text"]
        if isinstance(text, str) and text.strip():
            yield {"id": doc["id"], "text": text, "source": index}
