"""The offline text source "python-docs": English prose that ships with Python and the
installed packages, so the default pipeline runs with no network.

Documents, in this order (each part in a sorted, deterministic order):
1. the `pydoc_data.topics` help pages (by topic name);
2. docstrings of the standard library's modules, classes and functions, read with `ast` from the
   .py files under `sysconfig.get_paths()["stdlib"]` (never imported: importing runs code), by
   relative path and then source order, skipping test suites, codec tables, IDLE, lib2to3 and
   the demo folders, and docstrings under MIN_CHARS characters;
3. the long descriptions (README payloads) of installed distributions, by normalised name then
   version, skipping those under MIN_CHARS characters.
Exact duplicates (after stripping surrounding whitespace) are kept once, at first occurrence.
The corpus therefore depends on the Python version and the installed packages; its fingerprint
hashes the documents themselves.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

NAME = "python-docs"
VERSION = 2  # bump when the extraction rules change: it enters the fingerprint
MIN_CHARS = 200
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib",
                        "encodings", "lib2to3", "turtledemo", "pydoc_data", "ensurepip", "venv"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@functools.cache
def python_docs() -> tuple[str, ...]:
    """All python-docs documents, deduplicated, in their fixed order (cached per process: the
    stdlib parse takes a few seconds)."""
    seen: set[int] = set()
    docs = []
    for text in _raw_documents():
        text = text.strip()
        key = xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))
        if len(text) >= MIN_CHARS and key not in seen:
            seen.add(key)
            docs.append(text)
    return tuple(docs)


def python_docs_fingerprint() -> dict:
    """Identity of the python-docs corpus: rules version, document count and a hash of the text."""
    h = xxhash.xxh3_64()
    docs = python_docs()
    for text in docs:
        data = text.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return {"source": NAME, "version": VERSION, "documents": len(docs), "xxh3": h.hexdigest()}


def _raw_documents() -> Iterator[str]:
    yield from _pydoc_topics()
    yield from _stdlib_docstrings(Path(sysconfig.get_paths()["stdlib"]))
    yield from _distribution_descriptions()


def _pydoc_topics() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return
    for name in sorted(topics):
        yield topics[name]


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py") and not n.startswith("test_")]
    return files


def _stdlib_docstrings(root: Path) -> Iterator[str]:
    for path in _stdlib_files(root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)  # old escape sequences in some modules
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a file this Python cannot parse (e.g. a template) has no docs for us
        for node in ast.walk(tree):
            if isinstance(node, _DOC_NODES):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS:
                    yield doc


# This project's own README changes with every commit, and an editable install republishes it:
# leaving it out keeps the default cache's identity (and `make demo` reruns) stable across updates.
_OWN_DISTRIBUTION = "saecache"


def _distribution_descriptions() -> Iterator[str]:
    found = []
    for dist in importlib.metadata.distributions():
        meta: Any = dist.metadata  # an email.message.Message at run time
        if meta is None:
            continue
        name = re.sub(r"[-_.]+", "-", (meta.get("Name") or "")).lower()
        body = meta.get_payload() if hasattr(meta, "get_payload") else None
        text = body if isinstance(body, str) and body.strip() else (meta.get("Description") or "")
        if name != _OWN_DISTRIBUTION and text.strip() and text.strip() != "UNKNOWN":
            found.append((name, meta.get("Version") or "", text))
    for _, _, text in sorted(found):
        yield text
