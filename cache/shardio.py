"""Backend dispatch: write a shard durably under a temporary name, publish shards, open one for reading."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

import durable

from . import st_backend
from .names import FLOAT_FORMAT_VERSION, FORMAT_VERSION, tmp_name

if TYPE_CHECKING:
    from .zarr_backend import ZarrShard

# zarr is imported only when a zarr cache is used: it adds most of a second to every process start.
ShardReader = Union[st_backend.StShard, "ZarrShard"]


def write_tmp(folder: Path, name: str, tensors: Mapping[str, torch.Tensor | list[torch.Tensor]], backend: str,
              zarr_compression: str | None) -> tuple[int, str]:
    """Write `tensors` (host tensors) as shard `name` under its temporary name in `folder` and fsync it.

    Returns (bytes, xxh3_64 hex). On any error the temporary is removed; an OSError is re-raised with
    the same errno and a message naming the shard. Nothing else in the folder changes.
    """
    tmp = folder / tmp_name(name)
    durable.remove_path(tmp)
    try:
        if backend == "safetensors":
            # The version of the cache's manifest: 2 only for the 8-bit dtypes (int8 codes), as names.py says.
            encoded = any((t[0] if isinstance(t, list) else t).dtype == torch.int8 for t in tensors.values())
            meta = {"format": "pt",
                    "saecache_format_version": str(FORMAT_VERSION if encoded else FLOAT_FORMAT_VERSION)}
            return st_backend.write_tmp(tmp, tensors, meta)
        from . import zarr_backend

        return zarr_backend.write_tmp(tmp, tensors, zarr_compression)
    except OSError as exc:
        durable.remove_path(tmp)
        raise durable.describe_os_error(exc, f"shard {name} in {folder}") from exc
    except BaseException:
        durable.remove_path(tmp)
        raise


def publish(folder: Path, names: list[str]) -> None:
    """Rename the fsynced temporaries of `names` to their names, in order, then fsync `folder` once.

    On error the temporaries not yet renamed are removed (a shard already renamed stays: it is not in
    the manifest, and the next writer removes it) and the OSError names the shard."""
    done = 0
    try:
        for name in names:
            os.rename(folder / tmp_name(name), folder / name)
            done += 1
        durable.fsync_dir(folder)
    except OSError as exc:
        for name in names[done:]:
            durable.remove_path(folder / tmp_name(name))
        what = names[min(done, len(names) - 1)]
        raise durable.describe_os_error(exc, f"shard {what} in {folder}") from exc


def remove_tmp(folder: Path, name: str) -> None:
    """Remove the temporary of shard `name`, if any (a prepared shard that will not be committed)."""
    durable.remove_path(folder / tmp_name(name))


def open_shard(path: Path, backend: str) -> ShardReader:
    """Open one shard for reading (safetensors: memory-mapped; zarr: lazily read arrays)."""
    if backend == "safetensors":
        return st_backend.StShard(path)
    from . import zarr_backend

    return zarr_backend.ZarrShard(path)
