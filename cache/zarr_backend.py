"""Zarr v3 shards: one group folder per shard, one array per tensor, chunked along rows.

Zarr has no bfloat16, so bfloat16 tensors are stored as uint16 arrays holding the raw bits, with
the array attribute {"saecache_dtype": "bfloat16"}; the reader views them back as bfloat16.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec
from zarr.storage import LocalStore

import durable

from . import checksum

CHUNK_ROWS = 1024
DTYPE_ATTR = "saecache_dtype"
_NUMPY_DTYPES = {
    np.dtype("float64"): torch.float64,
    np.dtype("float32"): torch.float32,
    np.dtype("float16"): torch.float16,
    np.dtype("int64"): torch.int64,
    np.dtype("int32"): torch.int32,
    np.dtype("int8"): torch.int8,  # the codes of the 8-bit dtype (cache/encoding.py)
}


class ZarrFormatError(ValueError):
    """A zarr shard does not follow the cache layout."""


def _compressors(name: str | None, itemsize: int) -> list:
    if name is None:
        return []
    if name == "zstd":
        return [ZstdCodec(level=3)]
    if name == "gzip":
        return [GzipCodec(level=5)]
    # Byte-shuffling groups the exponent bytes of neighbouring floats, which is what compresses.
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=itemsize)]


def _to_numpy(t: torch.Tensor) -> tuple[np.ndarray, dict]:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), {DTYPE_ATTR: "bfloat16"}
    return t.numpy(), {}


def write_tmp(path: Path, tensors: Mapping[str, torch.Tensor | list[torch.Tensor]],
              compression: str | None) -> tuple[int, str]:
    """Write a new group folder at `path` (must not exist), fsync it; return (bytes, xxh3 hex).

    A list of tensors is stored as their concatenation along the first dimension."""
    group = zarr.open_group(store=LocalStore(path), mode="w-", zarr_format=3)
    for name, t in tensors.items():
        data, attrs = _to_numpy(torch.cat(t) if isinstance(t, list) else t)
        chunks = (min(max(data.shape[0], 1), CHUNK_ROWS),) + data.shape[1:] if data.ndim else ()
        arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                 compressors=_compressors(compression, data.itemsize), attributes=attrs)
        arr[...] = data
    durable.fsync_tree(path)
    return checksum.hash_tree(path)


class ZarrShard:
    """One zarr shard opened read-only; reads copy the requested rows into memory."""

    def __init__(self, path: Path) -> None:
        self._where = str(path)
        try:
            group = zarr.open_group(store=LocalStore(path, read_only=True), mode="r")
            self._arrays = dict(group.arrays())
        except Exception as exc:  # zarr raises many types for a damaged store
            raise ZarrFormatError(f"{path}: not a readable zarr v3 group ({exc})") from exc
        self._specs = {name: self._spec_of(name, a) for name, a in self._arrays.items()}

    def _spec_of(self, name: str, arr: zarr.Array) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype = np.dtype(arr.dtype)
        if dtype == np.uint16 and arr.attrs.get(DTYPE_ATTR) == "bfloat16":
            return torch.bfloat16, tuple(arr.shape)
        if dtype not in _NUMPY_DTYPES:
            raise ZarrFormatError(f"{self._where}: array '{name}' has unsupported dtype {dtype}")
        return _NUMPY_DTYPES[dtype], tuple(arr.shape)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]] | None:
        return self._specs.get(name)

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Tensor `name` (rows [start, stop) of its first dimension), copied from the store."""
        arr = self._arrays[name]
        try:
            data = arr[...] if arr.ndim == 0 else arr[start:stop]
        except Exception as exc:
            raise ZarrFormatError(f"{self._where}: cannot read array '{name}' ({exc}); run verify") from exc
        data = np.asarray(data)  # type: ignore[assignment]  # zarr's union of scalar and array types
        assert isinstance(data, np.ndarray)
        if not data.flags.c_contiguous or not data.flags.writeable:
            data = data.copy()
        if self._specs[name][0] == torch.bfloat16:
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(data)
