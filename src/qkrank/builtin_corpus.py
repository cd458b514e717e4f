"""The embedded default corpus: CPython's own documentation, shipped as one gzip file.

It is built once from the interpreter (``python -m qkrank.builtin_corpus --rebuild``) and committed,
so every machine reads the same bytes whatever its Python patch version. Documents are the
``pydoc_data.topics`` help pages and the docstrings of standard-library modules, classes and functions.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path

CORPUS_PATH = Path(__file__).with_name("corpus") / "python_docs.jsonl.gz"
# Modules whose import has side effects (opens a browser, prints, needs a display) or is slow.
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
         "venv", "pydoc_data", "__future__", "__hello__", "__phello__", "test", "xxsubtype"}
_MIN_DOC_CHARS = 120


def _docstrings(module) -> list[tuple[str, str]]:
    found = []
    if module.__doc__:
        found.append((module.__name__, module.__doc__))
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            if doc:
                found.append((f"{module.__name__}.{name}", doc))
        if inspect.isclass(obj):
            for meth_name, meth in sorted(vars(obj).items()):
                if not meth_name.startswith("_") and inspect.isfunction(meth) and meth.__doc__:
                    found.append((f"{module.__name__}.{name}.{meth_name}", inspect.cleandoc(meth.__doc__)))
    return found


def build_documents() -> list[dict]:
    """Documents from the running interpreter, in a fixed order: help topics, then stdlib docstrings."""
    import pydoc_data.topics

    docs = [{"id": f"topic:{k}", "text": v} for k, v in sorted(pydoc_data.topics.topics.items())]
    warnings.simplefilter("ignore")
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP:
            continue
        try:
            module = importlib.import_module(name)
        except Exception:  # platform-specific modules (msvcrt, winreg, ...) are simply absent
            continue
        for doc_id, text in _docstrings(module):
            if len(text) >= _MIN_DOC_CHARS:
                docs.append({"id": f"doc:{doc_id}", "text": text})
    return docs


def write_corpus(docs: list[dict], path: Path = CORPUS_PATH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)
    # mtime=0 keeps the gzip bytes reproducible.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(lines.encode())


def load_documents(path: Path = CORPUS_PATH) -> list[dict]:
    """The shipped documents: list of {"id", "text"}."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def corpus_sha256(path: Path = CORPUS_PATH) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rebuild", action="store_true", help="regenerate the shipped corpus file")
    args = parser.parse_args(argv)
    if args.rebuild:
        write_corpus(build_documents())
    docs = load_documents()
    print(f"{CORPUS_PATH}: {len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters, "
          f"sha256 {corpus_sha256()}")


if __name__ == "__main__":
    main()
