"""Where documents come from: "python-docs", local files, a `save_to_disk` folder, or a hub
dataset; each document numbered in a deterministic order, with a fingerprint for the cache's
identity.

`data.train_path` is read as: "python-docs"; else an existing file or folder, or a glob (a folder
written by `Dataset.save_to_disk` is loaded with `datasets.load_from_disk`, any other folder is
read as local files); else, if it looks like a path (absolute, ./, ~, a file suffix), an error;
else a hub dataset name for `datasets.load_dataset(name, data.dataset_name,
split=data.dataset_split, streaming=data.streaming)`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import xxhash

from harvest import local_files, pydocs
from harvest.errors import TextError
from harvest.local_files import pick_text_field
from harvest.tokenization import looks_like_local_path

_DISK_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def source_kind(train_path: str) -> str:
    """"python-docs" | "disk" (a save_to_disk folder) | "local" | "hub"; raises for a missing path."""
    if train_path == pydocs.NAME:
        return pydocs.NAME
    p = Path(train_path).expanduser()
    if p.is_dir() and any((p / m).is_file() for m in _DISK_DATASET_MARKERS):
        return "disk"
    if p.exists() or local_files.is_glob(train_path):
        return "local"
    if looks_like_local_path(train_path):
        raise TextError(_missing(train_path))
    return "hub"


def iter_documents(data_cfg: Any) -> Iterator[tuple[int, str]]:
    """(document index, text) pairs in a fixed order, at most `data_cfg.max_samples` of them;
    empty texts are skipped before numbering. Raises TextError for an empty corpus."""
    if data_cfg.max_samples is not None and data_cfg.max_samples < 1:
        raise TextError(f"data.max_samples must be at least 1 (got {data_cfg.max_samples}); use null for no limit")
    texts = _texts(data_cfg)
    count = 0
    for count, text in enumerate(itertools.islice(texts, data_cfg.max_samples), 1):
        yield count - 1, text
    if count == 0:
        raise TextError(f"the text source {data_cfg.train_path} holds no documents (no non-empty text); "
                        "point data.train_path at a non-empty corpus")


def source_fingerprint(data_cfg: Any) -> dict:
    """A JSON-able description of the text source for the cache's identity: hub name, config and
    split; for local and offline sources a hash of the contents (names relative to the corpus
    folder, so moving it keeps the identity). Budgets (max_samples) are not part of it."""
    kind = source_kind(data_cfg.train_path)
    if kind == pydocs.NAME:
        return pydocs.python_docs_fingerprint()
    if kind == "local":
        return {**local_files.local_fingerprint(data_cfg.train_path), "text_field": data_cfg.text_field}
    if kind == "disk":
        return {**_folder_fingerprint(Path(data_cfg.train_path).expanduser()), "split": data_cfg.dataset_split,
                "text_field": data_cfg.text_field}
    return {"source": "hub", "name": data_cfg.train_path, "config": data_cfg.dataset_name,
            "split": data_cfg.dataset_split, "text_field": data_cfg.text_field}


def hub_documents(name: str, config_name: str | None, split: str, streaming: bool, text_field: str | None,
                  **load_kwargs: Any) -> Iterator[str]:
    """Texts of `datasets.load_dataset(name, config_name, split=split, streaming=streaming,
    **load_kwargs)` (load_kwargs: e.g. data_files for the "json" or "parquet" builders)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split=split, streaming=streaming, **load_kwargs)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise TextError(f"{_missing(name)} ({_first_line(e)})") from e
    return _dataset_texts(ds, text_field, f"dataset {name}")


def disk_documents(folder: str, split: str, text_field: str | None) -> Iterator[str]:
    """Texts of a folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(Path(folder).expanduser()))
    except (OSError, ValueError) as e:
        raise TextError(f"cannot load the saved dataset in {folder} ({_first_line(e)}); re-save it with "
                        "save_to_disk or point data.train_path at text files") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise TextError(f"saved dataset {folder} has no split {split!r} (splits: {', '.join(ds)}); "
                            "fix data.dataset_split")
        ds = ds[split]
    return _dataset_texts(ds, text_field, f"saved dataset {folder}")


def _texts(data_cfg: Any) -> Iterator[str]:
    kind = source_kind(data_cfg.train_path)
    if kind == pydocs.NAME:
        return iter(pydocs.python_docs())
    if kind == "local":
        return local_files.local_documents(data_cfg.train_path, data_cfg.text_field)
    if kind == "disk":
        return disk_documents(data_cfg.train_path, data_cfg.dataset_split, data_cfg.text_field)
    return hub_documents(data_cfg.train_path, data_cfg.dataset_name, data_cfg.dataset_split, data_cfg.streaming,
                         data_cfg.text_field)


def _dataset_texts(ds: Iterable[dict], text_field: str | None, where: str) -> Iterator[str]:
    field = None
    features = getattr(ds, "features", None)
    if features:
        strings = [k for k, v in features.items() if getattr(v, "dtype", None) in ("string", "large_string")]
        field = pick_text_field(list(features), strings, text_field, where)
    for record in ds:
        if field is None:  # streaming datasets may not know their features until the first record
            strings = [k for k, v in record.items() if isinstance(v, str)]
            field = pick_text_field(list(record), strings, text_field, where)
        text = record.get(field)
        if text is None:
            continue
        if not isinstance(text, str):
            raise TextError(f"field {field!r} of {where} holds a {type(text).__name__}, not text; "
                            "set data.text_field to a text field")
        if text.strip():
            yield text


def _folder_fingerprint(folder: Path) -> dict:
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    h = xxhash.xxh3_64()
    for f in files:
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 23):
                h.update(block)
    return {"source": "disk", "files": len(files), "xxh3": h.hexdigest()}


def _missing(name: str) -> str:
    return (f"no such file or folder {name}; hub datasets need a network (set HF_DATASETS_OFFLINE=0 and be "
            "online) or point data.train_path at local files")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
