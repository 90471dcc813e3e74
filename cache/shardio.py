"""Backend dispatch: write a shard durably under its final name, open one for reading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch

import durable

from . import st_backend
from .names import FORMAT_VERSION, tmp_name

if TYPE_CHECKING:
    from .zarr_backend import ZarrShard

# zarr is imported only when a zarr cache is used: it adds most of a second to every process start.
ShardReader = Union[st_backend.StShard, "ZarrShard"]


def write_shard(folder: Path, name: str, tensors: dict[str, torch.Tensor], backend: str,
                zarr_compression: str | None) -> tuple[int, str]:
    """Write `tensors` as shard `name` in `folder`: temp name, fsync, atomic rename, fsync folder.

    Returns (bytes, xxh3_64 hex). On any OSError the temp file is removed and an OSError with the
    same errno and a message naming the shard is raised; nothing else in the folder changes.
    """
    tmp = folder / tmp_name(name)
    durable.remove_path(tmp)
    try:
        if backend == "safetensors":
            meta = {"format": "pt", "saecache_format_version": str(FORMAT_VERSION)}
            result = st_backend.write_tmp(tmp, tensors, meta)
        else:
            from . import zarr_backend

            result = zarr_backend.write_tmp(tmp, tensors, zarr_compression)
        os.rename(tmp, folder / name)
        durable.fsync_dir(folder)
    except OSError as exc:
        durable.remove_path(tmp)
        raise durable.describe_os_error(exc, f"shard {name} in {folder}") from exc
    except BaseException:
        durable.remove_path(tmp)
        raise
    return result


def open_shard(path: Path, backend: str) -> ShardReader:
    """Open one shard for reading (safetensors: memory-mapped; zarr: lazily read arrays)."""
    if backend == "safetensors":
        return st_backend.StShard(path)
    from . import zarr_backend

    return zarr_backend.ZarrShard(path)
