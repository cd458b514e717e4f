"""The tokenizer (byte-level BPE trained on the training documents, or a pretrained tokenizer.json) and
encoding, in this process or in worker processes."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from qkrank.data.common import EOS, DataError, is_validation
from qkrank.data.sources import Source, iter_documents
from qkrank.settings import DataSettings

# Byte-level BPE averages about 4 characters of English per token: with a token budget, the BPE tokenizer
# is trained on roughly the text that will be tokenized instead of reading a whole streamed corpus.
_BPE_CHARS_PER_TOKEN = 4


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


def build_tokenizer(data: DataSettings, sources: list[Source]):
    tok = data.tokenizer
    if tok.kind == "pretrained":
        if not tok.name_or_path:
            raise DataError("config field 'data.tokenizer.name_or_path' is required when kind is 'pretrained' "
                            "(a tokenizer.json path or a Hub name such as gpt2)")
        return load_pretrained(tok.name_or_path)
    budget = data.train_tokens and data.train_tokens * _BPE_CHARS_PER_TOKEN

    seen = {"chars": 0}

    def train_texts():
        # Trained on training documents only, so validation text never shapes the vocabulary.
        for doc in iter_documents(data, sources):
            if is_validation(doc["id"], data.val_fraction):
                continue
            yield doc["text"]
            seen["chars"] += len(doc["text"])
            if budget and seen["chars"] >= budget:
                return

    trained = train_bpe(train_texts(), tok.vocab_size)
    # BPE stops early when no pair is left to merge; the model would silently get a smaller vocabulary. (No
    # training text at all is the shard writer's error: an empty split, named there.)
    if seen["chars"] and trained.get_vocab_size() < tok.vocab_size:
        raise DataError(f"config field 'data.tokenizer.vocab_size': {tok.vocab_size} is more than this corpus "
                        f"allows: byte-level BPE on its training documents ends at {trained.get_vocab_size()} "
                        f"tokens (no pair left to merge); use at most {trained.get_vocab_size()}, or more text")
    return trained


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
