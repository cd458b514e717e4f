"""The data stage: builtin / files / hf sources, tokenizers, exact token counts, manifest, clean restarts."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qkrank import config as qconfig
from qkrank import data
from qkrank.data import DataError, TokenShards

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ("attention key query norm gamma rank spectrum layer token model training learning rate optimizer "
         "muon gradient matrix vector dimension head value collapse recovery plateau").split()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test here may touch the network: datasets and the Hub run in offline mode."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def sentences(rng: np.random.Generator, marker: str = "", n_min: int = 5, n_max: int = 40) -> str:
    words = rng.choice(WORDS, size=int(rng.integers(n_min, n_max)))
    return " ".join([marker, *words]).strip() + "."


def fineweb_rows(n: int, seed: int, marker: str = "") -> dict:
    """Columns of FineWeb-Edu's schema, with synthetic text."""
    rng = np.random.default_rng(seed)
    texts = [sentences(rng, marker) for _ in range(n)]
    return {
        "text": texts,
        "id": [f"<urn:uuid:{uuid.UUID(int=int(rng.integers(2**62)) + seed)}>" for _ in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{seed}/{i}" for i in range(n)],
        "date": ["2024-02-21T10:00:00Z"] * n,
        "file_path": [f"s3://commoncrawl/crawl-data/CC-MAIN-2024-10/segments/{seed}.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": rng.uniform(0.65, 1.0, n).tolist(),
        "token_count": [len(t.split()) for t in texts],
        "score": rng.uniform(2.5, 5.0, n).tolist(),
        "int_score": rng.integers(3, 6, n).tolist(),
    }


def write_parquet(path: Path, rows: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def write_jsonl(path: Path, rows: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(rows)
    with open(path, "w") as f:
        for values in zip(*(rows[k] for k in keys), strict=True):
            f.write(json.dumps(dict(zip(keys, values, strict=True))) + "\n")
    return path


def data_cfg(**section) -> dict:
    return qconfig.validate_data_section(section)


def in_val(doc_id: str, fraction: float) -> bool:
    """The documented split rule, written out independently: sha256(id)[:8] as a fraction of 2**64."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64 < fraction


def decoded_documents(out: Path, split: str) -> list[str]:
    """Documents of a prepared split, decoded with the saved tokenizer (the last one may be cut)."""
    from tokenizers import Tokenizer

    manifest = json.loads((out / "manifest.json").read_text())
    tokens = np.fromfile(out / f"{split}.bin", dtype=manifest["dtype"])
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    cuts = np.flatnonzero(tokens == manifest["eos_id"])
    pieces = np.split(tokens, cuts + 1)
    return [tok.decode(p[p != manifest["eos_id"]].tolist()) for p in pieces if len(p)]


@pytest.fixture(scope="module")
def fineweb_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fineweb")
    write_parquet(root / "sample" / "000_00000.parquet", fineweb_rows(300, seed=1))
    write_parquet(root / "sample" / "000_00001.parquet", fineweb_rows(300, seed=2))
    return root


# ---------------------------------------------------------------- files: FineWeb parquet end to end

def test_fineweb_parquet_through_files_end_to_end(fineweb_dir, tmp_path):
    cfg = data_cfg(source="files", files={"paths": [str(fineweb_dir / "sample" / "*.parquet")]},
                   tokenizer={"kind": "bpe", "vocab_size": 300}, val_fraction=0.2,
                   train_tokens=6000, val_tokens=1500)
    manifest = data.prepare(cfg, tmp_path / "out")
    shards = TokenShards(tmp_path / "out")

    assert manifest["tokens"] == {"train": 6000, "val": 1500}  # exactly the configured counts
    assert len(shards.splits["train"]) == 6000 and len(shards.splits["val"]) == 1500
    assert shards.splits["train"].dtype == np.uint16
    files = manifest["sources"][0]["files"]
    assert [Path(f["path"]).name for f in files] == ["000_00000.parquet", "000_00001.parquet"]
    assert manifest["sha256"]["train.bin"] == hashlib.sha256((tmp_path / "out" / "train.bin").read_bytes()).hexdigest()

    # The train shard is the training documents in file order, each followed by EOS, cut at the limit.
    rows = [fineweb_rows(300, seed=s) for s in (1, 2)]
    expected = {split: [t for r in rows for t, i in zip(r["text"], r["id"], strict=True)
                        if in_val(i, 0.2) == (split == "val")] for split in data.SPLITS}
    for split in data.SPLITS:
        got = decoded_documents(tmp_path / "out", split)
        assert got[:-1] == expected[split][: len(got) - 1]
        assert expected[split][len(got) - 1].startswith(got[-1][:10])
        assert manifest["sources"][0]["documents"][split] == len(got)
    windows = shards.fixed_windows("val", 4, 65)
    assert windows.shape == (4, 65) and windows.max() < shards.vocab_size


def test_same_config_same_bytes_with_several_processes(fineweb_dir, tmp_path):
    base = dict(source="files", files={"paths": [str(fineweb_dir / "sample")  + "/*.parquet"]},
                tokenizer={"kind": "bpe", "vocab_size": 300}, train_tokens=5000, val_tokens=800,
                shuffle_buffer=64, seed=3)
    one = data.prepare(data_cfg(**base), tmp_path / "one")
    two = data.prepare(data_cfg(**base, num_proc=2), tmp_path / "two")
    assert one["sha256"] == two["sha256"]
    assert one["data_config_hash"] == two["data_config_hash"]  # num_proc is not part of the data's identity
    reseeded = data.prepare(data_cfg(**{**base, "seed": 4}), tmp_path / "reseeded")
    assert reseeded["sha256"]["train.bin"] != one["sha256"]["train.bin"]  # the seed orders the documents


def test_jsonl_text_column_and_csv(tmp_path):
    rows = {"body": [f"document {i}: " + " ".join(WORDS[i % 7:]) for i in range(40)],
            "id": [f"d{i}" for i in range(40)]}
    write_jsonl(tmp_path / "docs" / "a.jsonl", rows)
    cfg = data_cfg(source="files", files={"paths": [str(tmp_path / "docs" / "a.jsonl")], "format": "json",
                                          "text_column": "body"},
                   tokenizer={"kind": "bpe", "vocab_size": 280}, val_fraction=0.25)
    manifest = data.prepare(cfg, tmp_path / "out")
    train_docs = [t for t, i in zip(rows["body"], rows["id"], strict=True) if not in_val(i, 0.25)]
    assert decoded_documents(tmp_path / "out", "train") == train_docs  # no limit: every document, whole
    assert manifest["sources"][0]["documents"]["train"] == len(train_docs)

    (tmp_path / "c.csv").write_text("body,id\n" + "".join(f'"{t}",{i}\n' for t, i in zip(rows["body"], rows["id"],
                                                                                          strict=True)))
    csv_cfg = data_cfg(source="files", files={"paths": [str(tmp_path / "c.csv")], "format": "csv",
                                              "text_column": "body"},
                       tokenizer={"kind": "bpe", "vocab_size": 280}, val_fraction=0.25)
    assert data.prepare(csv_cfg, tmp_path / "csv")["sha256"]["train.bin"] == manifest["sha256"]["train.bin"]


def test_txt_files_one_document_per_paragraph(tmp_path):
    paragraphs = [f"paragraph {i} " + " ".join(WORDS[i % 20:i % 20 + 9]) for i in range(30)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs) + "\n")
    cfg = data_cfg(source="files", files={"paths": [str(tmp_path / "*.txt")], "format": "text"},
                   tokenizer={"kind": "bpe", "vocab_size": 270}, val_fraction=0.3)
    manifest = data.prepare(cfg, tmp_path / "out")
    docs = manifest["sources"][0]["documents"]
    assert docs["train"] + docs["val"] == 30
    assert all(d.strip() in paragraphs for d in decoded_documents(tmp_path / "out", "train"))


# ---------------------------------------------------------------- hf: local dataset directories, mixing

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Two local dataset directories laid out as on the Hub: parquet shards, and jsonl files without ids."""
    root = tmp_path_factory.mktemp("hub")
    fineweb = root / "fineweb-edu"
    write_parquet(fineweb / "data" / "train-00000-of-00002.parquet", fineweb_rows(400, seed=10, marker="alpha"))
    write_parquet(fineweb / "data" / "train-00001-of-00002.parquet", fineweb_rows(400, seed=11, marker="alpha"))
    cosmo = root / "cosmopedia"
    rng = np.random.default_rng(5)
    write_jsonl(cosmo / "data" / "train.jsonl",
                {"prompt": ["write"] * 600, "text": [sentences(rng, "beta") for _ in range(600)],
                 "format": ["textbook"] * 600})
    return fineweb, cosmo


def test_hf_single_local_dataset_matches_its_rows(hf_dirs, tmp_path):
    fineweb, _ = hf_dirs
    cfg = data_cfg(source="hf", hf={"sources": [{"path": str(fineweb)}]}, val_fraction=0.1,
                   tokenizer={"kind": "bpe", "vocab_size": 300}, train_tokens=4000, val_tokens=500)
    manifest = data.prepare(cfg, tmp_path / "out")
    assert manifest["tokens"] == {"train": 4000, "val": 500}
    rows = [fineweb_rows(400, seed=s, marker="alpha") for s in (10, 11)]
    train_docs = [t for r in rows for t, i in zip(r["text"], r["id"], strict=True) if not in_val(i, 0.1)]
    got = decoded_documents(tmp_path / "out", "train")
    assert got[:-1] == train_docs[: len(got) - 1]


def test_hf_mix_of_two_sources_respects_weights(hf_dirs, tmp_path):
    fineweb, cosmo = hf_dirs
    cfg = data_cfg(source="hf", seed=7, val_fraction=0.1, tokenizer={"kind": "bpe", "vocab_size": 300},
                   train_tokens=30000, val_tokens=1000,
                   hf={"sources": [{"path": str(fineweb), "weight": 3.0}, {"path": str(cosmo), "weight": 1.0}]})
    manifest = data.prepare(cfg, tmp_path / "out")
    docs = decoded_documents(tmp_path / "out", "train")[:-1]  # the cut last document may lose its marker
    alpha = sum(d.startswith("alpha") for d in docs)
    beta = sum(d.startswith("beta") for d in docs)
    assert alpha + beta == len(docs) > 250
    # Binomial(n, 3/4): the count from the first source lies within 4 standard deviations of 3n/4.
    n = len(docs)
    assert abs(alpha - 0.75 * n) < 4 * np.sqrt(n * 0.75 * 0.25), (alpha, beta)
    labels = [s["label"] for s in manifest["sources"]]
    assert labels == [str(fineweb), str(cosmo)]
    counted = [s["documents"]["train"] for s in manifest["sources"]]
    assert counted[0] - alpha in (0, 1) and counted[1] - beta in (0, 1)  # the manifest counts the cut one too
    assert sum(s["tokens"]["train"] for s in manifest["sources"]) == 30000
    again = data.prepare(cfg, tmp_path / "again")
    assert again["sha256"] == manifest["sha256"]  # the mix is seeded


def test_hf_shuffle_is_seeded_and_loses_nothing(hf_dirs, tmp_path):
    # The jsonl source: datasets' shuffle of a parquet stream sleeps 5 s when it ends (an arrow workaround).
    _, cosmo = hf_dirs
    cfg = data_cfg(source="hf", hf={"sources": [{"path": str(cosmo)}]}, tokenizer={"kind": "bpe", "vocab_size": 300},
                   shuffle_buffer=50, seed=1)
    shuffled = data.prepare(cfg, tmp_path / "a")
    assert data.prepare(cfg, tmp_path / "b")["sha256"] == shuffled["sha256"]
    plain = data.prepare({**cfg, "shuffle_buffer": 0}, tmp_path / "plain")
    docs = {split: decoded_documents(tmp_path / "a", split) for split in data.SPLITS}
    assert docs["train"] != decoded_documents(tmp_path / "plain", "train")
    # Ids are positions in the shuffled stream, so the split may differ; the documents are the same 600.
    assert sorted(docs["train"] + docs["val"]) == sorted(decoded_documents(tmp_path / "plain", "train")
                                                         + decoded_documents(tmp_path / "plain", "val"))
    assert plain["sha256"]["train.bin"] != shuffled["sha256"]["train.bin"]


def test_hf_mix_stops_when_a_source_runs_out(hf_dirs, tmp_path):
    fineweb, cosmo = hf_dirs
    cfg = data_cfg(source="hf", tokenizer={"kind": "bpe", "vocab_size": 300}, train_tokens=10**7,
                   hf={"sources": [{"path": str(fineweb)}, {"path": str(cosmo)}]})
    with pytest.raises(DataError, match=r"'data.train_tokens': 10,000,000 requested.*ran out"):
        data.prepare(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob(data.TMP_PREFIX + "*"))


def test_hf_missing_text_column_names_the_source(hf_dirs, tmp_path):
    fineweb, _ = hf_dirs
    cfg = data_cfg(source="hf", tokenizer={"kind": "bpe", "vocab_size": 300},
                   hf={"sources": [{"path": str(fineweb), "text_column": "content"}]})
    with pytest.raises(DataError, match=r"sources\[0\].*fineweb-edu.*no column 'content'.*'text'"):
        data.prepare(cfg, tmp_path / "out")


# ---------------------------------------------------------------- pretrained tokenizers

def test_pretrained_tokenizer_from_a_local_tokenizer_json(fineweb_dir, tmp_path):
    rng = np.random.default_rng(0)
    tok = data.train_bpe([sentences(rng) for _ in range(200)], vocab_size=290)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = data_cfg(source="files", files={"paths": [str(fineweb_dir / "sample" / "000_00000.parquet")]},
                   tokenizer={"kind": "pretrained", "name_or_path": str(tmp_path / "tokenizer.json")},
                   train_tokens=2000, val_tokens=300)
    manifest = data.prepare(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    assert manifest["vocab_size"] == tok.get_vocab_size() and manifest["tokenizer"]["kind"] == "pretrained"
    first_train = next(t for t, i in zip(*(fineweb_rows(300, 1)[k] for k in ("text", "id")), strict=True)
                       if not in_val(i, 0.1))
    expected = tok.encode(first_train).ids + [tok.token_to_id(data.EOS)]
    assert TokenShards(tmp_path / "out").splits["train"][: len(expected)].tolist() == expected
    # A directory holding tokenizer.json works too.
    assert data.load_pretrained(str(tmp_path)).get_vocab_size() == tok.get_vocab_size()


def test_large_vocabulary_gives_uint32_shards(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {data.EOS: 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    texts = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(20)) for i in range(60)]
    write_jsonl(tmp_path / "d.jsonl", {"text": texts, "id": [f"x{i}" for i in range(60)]})
    cfg = data_cfg(source="files", files={"paths": [str(tmp_path / "d.jsonl")], "format": "json"},
                   tokenizer={"kind": "pretrained", "name_or_path": str(tmp_path / "tokenizer.json")})
    manifest = data.prepare(cfg, tmp_path / "out")
    shards = TokenShards(tmp_path / "out")
    assert manifest["dtype"] == "uint32" and shards.splits["train"].dtype == np.uint32
    assert shards.splits["train"].max() > np.iinfo(np.uint16).max
    train_texts = [t for i, t in enumerate(texts) if not in_val(f"x{i}", 0.1)]
    expected = [tok.token_to_id(w) for t in train_texts for w in [*t.split(), data.EOS]]
    assert shards.splits["train"].tolist() == expected


def test_pretrained_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"name_or_path.*nope/tokenizer.json does not exist"):
        data.load_pretrained(str(tmp_path / "nope" / "tokenizer.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match=r"bad.json is not a tokenizers JSON file"):
        data.load_pretrained(str(tmp_path / "bad.json"))
    with pytest.raises(DataError, match=r"cannot load 'gpt2'.*tokenizer.json path"):
        data.load_pretrained("gpt2")  # offline and not cached here
    with pytest.raises(DataError, match=r"name_or_path' is required"):
        data.prepare(data_cfg(tokenizer={"kind": "pretrained"}), tmp_path / "out")


# ---------------------------------------------------------------- bad input

def test_missing_file_names_the_path(tmp_path):
    cfg = data_cfg(source="files", files={"paths": [str(tmp_path / "absent" / "*.parquet")]})
    with pytest.raises(DataError, match=r"'data.files.paths': '.*absent/\*.parquet' matches no file"):
        data.prepare(cfg, tmp_path / "out")
    with pytest.raises(DataError, match=r"'data.files.paths' is empty"):
        data.prepare(data_cfg(source="files"), tmp_path / "out")


def test_absent_text_column_names_file_and_columns(fineweb_dir, tmp_path):
    path = fineweb_dir / "sample" / "000_00000.parquet"
    cfg = data_cfg(source="files", files={"paths": [str(path)], "text_column": "content"})
    with pytest.raises(DataError, match=r"000_00000.parquet: no column 'content'.*text_column.*'int_score'"):
        data.prepare(cfg, tmp_path / "out")


def test_empty_corpus_is_an_error(tmp_path):
    rows = fineweb_rows(20, seed=3)
    rows["text"] = ["   "] * 20
    write_parquet(tmp_path / "empty.parquet", rows)
    cfg = data_cfg(source="files", files={"paths": [str(tmp_path / "empty.parquet")]})
    with pytest.raises(DataError, match=r"the train split is empty: source 'files'"):
        data.prepare(cfg, tmp_path / "out")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"bad.parquet: cannot read as data.files.format 'parquet'"):
        data.prepare(data_cfg(source="files", files={"paths": [str(tmp_path / "bad.parquet")]}), tmp_path / "o2")


# ---------------------------------------------------------------- interruption

KILL_SCRIPT = """
import os, signal, sys, json
from pathlib import Path
from qkrank import data
from qkrank.data import tokenizer
calls = 0
original = tokenizer._encode
def encode_then_die(tokenizer, texts):
    global calls
    calls += 1
    if calls == 3:  # mid-tokenization: tokenizer saved, shards half written
        os.kill(os.getpid(), signal.SIGKILL)
    return original(tokenizer, texts)
tokenizer._encode = encode_then_die
data.prepare(json.loads(sys.argv[1]), Path(sys.argv[2]))
"""


def test_killed_tokenization_restarts_cleanly(fineweb_dir, tmp_path):
    cfg = data_cfg(source="files", files={"paths": [str(fineweb_dir / "sample" / "*.parquet")]},
                   tokenizer={"kind": "bpe", "vocab_size": 300})
    out = tmp_path / "out"
    old = data.prepare(data_cfg(**{**cfg, "val_fraction": 0.5}), out)  # an earlier, different dataset
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    stale = list(out.glob(data.TMP_PREFIX + "*"))
    assert stale and (stale[0] / "train.bin").exists()  # killed while writing its temporary directory
    assert TokenShards(out).manifest["sha256"] == old["sha256"]  # the previous outputs are untouched

    fresh = data.prepare(cfg, out)
    assert not list(out.glob(data.TMP_PREFIX + "*"))
    assert fresh["sha256"] == data.prepare(cfg, tmp_path / "clean")["sha256"]
    TokenShards(out)


def test_error_midway_leaves_no_partial_outputs(fineweb_dir, tmp_path, monkeypatch):
    cfg = data_cfg(source="files", files={"paths": [str(fineweb_dir / "sample" / "*.parquet")]},
                   tokenizer={"kind": "bpe", "vocab_size": 300})

    def fail(tokenizer, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(data.tokenizer, "_encode", fail)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cfg, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- pieces

def test_buffer_shuffle_is_a_seeded_permutation():
    items = list(range(1000))
    a = list(data.buffer_shuffle(items, 50, np.random.default_rng(1)))
    b = list(data.buffer_shuffle(items, 50, np.random.default_rng(1)))
    assert sorted(a) == items and a == b and a != items
    assert list(data.buffer_shuffle(items, 0, np.random.default_rng(1))) == items
    # Item i is still unread while the first i - 50 items come out: nothing moves more than 50 places early.
    assert all(pos >= item - 50 for pos, item in enumerate(a))


def test_weighted_interleave_proportions_and_exhaustion():
    streams = [iter(range(100_000)), iter(range(100_000))]
    pairs = data.weighted_interleave(streams, [1.0, 4.0], seed=0)
    drawn = [next(pairs)[0] for _ in range(20_000)]
    assert abs(np.mean(drawn) - 0.8) < 4 * np.sqrt(0.16 / 20_000)
    short = list(data.weighted_interleave([iter(range(10)), iter(range(10**6))], [1.0, 1.0], seed=0))
    assert sum(1 for i, _ in short if i == 0) == 10 and len(short) < 100  # stops when the short one runs out
    ordered = [x for _, x in data.weighted_interleave([iter("abcdef")], [1.0], seed=0)]
    assert ordered == list("abcdef")


def test_progress_is_counted_in_tokens():
    stream = io.StringIO()
    progress = data.TokenProgress(total=1000, every_s=0.0, stream=stream)
    progress.update(250)
    progress.close()
    assert "tokenize: 250/1,000 (25.0%) tokens" in stream.getvalue()
