"""Documents from local files: .txt, .json, .jsonl and .parquet; a file, a folder or a glob.

Rules (the README repeats them):
- A folder is read recursively, files sorted by relative path, hidden files and folders and
  files of other types skipped. A glob (`*`, `?`, `[`; `**` recurses) keeps the matching files
  of the supported types, sorted.
- .txt: a .txt file named directly is split into documents at blank lines (a big text file is
  usually many passages); a .txt file reached through a folder or glob is one document (a
  folder of texts is usually one text per file). Read as UTF-8, undecodable bytes replaced.
- .jsonl: one JSON record per line. .json: a list of records, an object holding exactly one
  such list (e.g. {"data": [...]}), or JSON Lines. A record is an object (the text is one of
  its fields) or a bare string.
- .parquet: read in record batches, only the text column.
- The text field: `text_field` when given, else the first of TEXT_FIELDS present, else the only
  string field; decided per file from its schema (parquet) or first object record (json).
Empty and whitespace-only texts are skipped.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

import xxhash

from harvest.errors import TextError

TEXT_FIELDS = ("text", "content", "document", "body", "raw_content", "article")
SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
_GLOB_CHARS = set("*?[")


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in _GLOB_CHARS)


def local_files(path: str) -> tuple[list[Path], bool]:
    """The files `path` names, sorted, and whether it named a single file directly."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() not in SUFFIXES:
            raise TextError(f"{path} is a {p.suffix or 'suffix-less'} file; data.train_path takes "
                            f"{', '.join(SUFFIXES)} files (or a folder or glob of them)")
        return [p], True
    if p.is_dir():
        files = sorted((f for f in p.rglob("*") if _wanted(f, p)), key=lambda f: f.relative_to(p).as_posix())
        where = f"folder {path}"
    elif is_glob(path):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if _wanted(Path(f), None))
        where = f"glob {path}"
    else:
        raise TextError(f"no such file or folder {path}; set data.train_path to an existing file, folder or glob")
    if not files:
        raise TextError(f"{where} holds no {', '.join(SUFFIXES)} files; point data.train_path at text files")
    return files, False


def local_documents(path: str, text_field: str | None) -> Iterator[str]:
    """Document texts from the files `path` names, in order (see the module docstring)."""
    files, single = local_files(path)
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".txt":
            yield from _txt_documents(f, split_paragraphs=single)
        elif suffix == ".parquet":
            yield from _parquet_documents(f, text_field)
        else:
            yield from _json_documents(f, text_field)


def local_fingerprint(path: str) -> dict:
    """File names (relative to their common folder), sizes and xxh3 hashes of the contents."""
    files, single = local_files(path)
    # Names relative to the folder the files share, so that moving the corpus keeps the identity.
    root = Path(os.path.commonpath([f.resolve().parent for f in files]))
    entries = [{"name": f.resolve().relative_to(root).as_posix(), "bytes": f.stat().st_size, "xxh3": _file_hash(f)}
               for f in files]
    return {"source": "local", "txt_mode": "paragraphs" if single else "files", "files": entries}


def pick_text_field(fields: list[str], string_fields: list[str], text_field: str | None, where: str) -> str:
    """The field holding the text: the override, a known name, or the only string field."""
    if text_field is not None:
        if text_field not in fields:
            raise TextError(f"{where} has no field {text_field!r} (fields: {', '.join(fields) or 'none'}); "
                            "fix data.text_field")
        return text_field
    for name in TEXT_FIELDS:
        if name in fields:
            return name
    if len(string_fields) == 1:
        return string_fields[0]
    raise TextError(f"cannot tell which field of {where} holds the text (fields: {', '.join(fields) or 'none'}); "
                    "set data.text_field")


def _wanted(f: Path, root: Path | None) -> bool:
    parts = f.relative_to(root).parts if root is not None else (f.name,)
    return f.is_file() and f.suffix.lower() in SUFFIXES and not any(part.startswith(".") for part in parts)


def _file_hash(f: Path) -> str:
    h = xxhash.xxh3_64()
    with open(f, "rb") as fh:
        while block := fh.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def _txt_documents(f: Path, split_paragraphs: bool) -> Iterator[str]:
    text = f.read_text(encoding="utf-8", errors="replace")
    if not split_paragraphs:
        yield text
        return
    paragraph: list[str] = []
    for line in text.splitlines():
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _json_records(f: Path) -> Iterator:
    if f.suffix.lower() == ".json":
        try:
            data = json.loads(f.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):
                raise TextError(f"{f} is not valid JSON ({e}); fix the file or use JSON Lines (.jsonl)") from e
        else:
            if isinstance(data, dict):
                lists = [v for v in data.values() if isinstance(v, list)]
                if len(lists) != 1:
                    raise TextError(f"{f} is a JSON object without exactly one list of records; "
                                    "write a list of records or JSON Lines")
                data = lists[0]
            if not isinstance(data, list):
                raise TextError(f"{f} holds a JSON {type(data).__name__}, not records; write a list of records")
            yield from data
            return
    with open(f, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise TextError(f"{f} line {number} is not valid JSON ({e}); fix or remove that line") from e


def _json_documents(f: Path, text_field: str | None) -> Iterator[str]:
    field = None
    for record in _json_records(f):
        if isinstance(record, str):
            text = record
        elif isinstance(record, dict):
            if field is None:
                strings = [k for k, v in record.items() if isinstance(v, str)]
                field = pick_text_field(list(record), strings, text_field, str(f))
            text = record.get(field)  # type: ignore[assignment]  # checked below: not a str -> skipped
        else:
            raise TextError(f"{f} holds a {type(record).__name__} record; records must be objects or strings")
        yield from _checked(text, field, f)


def _parquet_documents(f: Path, text_field: str | None) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
        raise TextError(f"{f} is not a readable parquet file ({e}); fix or remove it") from e
    schema = pf.schema_arrow
    strings = [n for n in schema.names if pa.types.is_string(schema.field(n).type)
               or pa.types.is_large_string(schema.field(n).type)]
    field = pick_text_field(list(schema.names), strings, text_field, str(f))
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            yield from _checked(text, field, f)


def _checked(text, field: str | None, f: Path) -> Iterator[str]:
    if text is None:
        return
    if not isinstance(text, str):
        raise TextError(f"field {field!r} of {f} holds a {type(text).__name__}, not text; set data.text_field "
                        "to a text field")
    if text.strip():
        yield text
