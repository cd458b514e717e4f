"""Token shards: writing the train/val splits at exact token counts, and reading them back verified."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qkrank import config as qconfig
from qkrank.data.common import SPLITS, DataError, is_validation, sha256_file
from qkrank.data.sources import Source, iter_documents
from qkrank.data.tokenizer import encode_batches, eos_id
from qkrank.progress import TokenBar
from qkrank.settings import DataSettings

_ENCODE_BATCH = 256  # documents per encode call (and per task sent to a worker process)


class TokenProgress(TokenBar):
    """Tokens written, as ``tokenize: n/total (p%) tokens, r tok/s``."""

    def __init__(self, total: int | None, every_s: float = 30.0, stream=None):
        super().__init__("tokenize", total, every_s=every_s, stream=stream)
        self.done = 0

    def update(self, n: int) -> None:
        self.done += n

        def line() -> str:
            of = f"/{self.total:,} ({100 * self.done / self.total:.1f}%)" if self.total else ""
            return f"{self.done:,}{of} tokens, {self.done / (time.perf_counter() - self.start):,.0f} tok/s"

        self.advance(n, line)


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


def tokenize_splits(tokenizer, data: DataSettings, sources: list[Source], out_dir: Path, dtype,
                    num_proc: int) -> dict:
    """One pass over the documents: each goes (with EOS after it) to its split until both are full.

    Returns {"tokens": {split: n}, "documents": {source label: {split: n}}, "source_tokens": ...}.
    """
    eos = eos_id(tokenizer)
    limits = {"train": data.train_tokens, "val": data.val_tokens}
    writers = {s: SplitWriter(out_dir / f"{s}.bin", limits[s], dtype) for s in SPLITS}
    labels = [s.label for s in sources]
    documents = {label: dict.fromkeys(SPLITS, 0) for label in labels}
    source_tokens = {label: dict.fromkeys(SPLITS, 0) for label in labels}
    progress = TokenProgress(None if None in limits.values() else sum(limits.values()))
    routed: deque = deque()  # (split, source) of each document sent to the encoder, in order

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for doc in iter_documents(data, sources):
            split = "val" if is_validation(doc["id"], data.val_fraction) else "train"
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
        for flat, lengths in encode_batches(tokenizer, batches(), num_proc):
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
