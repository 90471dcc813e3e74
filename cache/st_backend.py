"""safetensors shards: a spec-conformant writer and a zero-copy, memory-mapped reader.

We write the file ourselves (8-byte little-endian header length, JSON header padded with spaces to an
8-byte boundary, then the tensors back to back) so that every byte is hashed on the way out and goes
to the disk without a detour through the page cache where the filesystem allows (cache/directio.py).
`safetensors.safe_open` reads these files; the tests check it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from . import directio

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",  # the codes of the 8-bit dtype (cache/encoding.py)
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
MAX_HEADER_BYTES = 100 << 20


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("the cache format is little-endian; this host is big-endian")


Tensorlike = torch.Tensor | list[torch.Tensor]


def _spec(t: Tensorlike) -> tuple[torch.dtype, list[int], int]:
    """(dtype, shape, bytes) of a tensor, or of the row-wise concatenation of a list of pieces."""
    if isinstance(t, torch.Tensor):
        return t.dtype, list(t.shape), t.numel() * t.element_size()
    first = t[0]
    shape = [sum(p.shape[0] for p in t), *first.shape[1:]]
    return first.dtype, shape, sum(p.numel() for p in t) * first.element_size()


def _layout(tensors: Mapping[str, Tensorlike]) -> list[str]:
    # Wider items first: every tensor then starts at a multiple of its item size, which torch needs
    # to view the mapped bytes in place (the data section itself starts 8-aligned).
    return sorted(tensors, key=lambda n: -_spec(tensors[n])[0].itemsize)


def encode_header(tensors: Mapping[str, Tensorlike], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The 8-byte length plus padded JSON header, and the order the tensor bytes follow in."""
    order = _layout(tensors)
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        dtype, shape, nbytes = _spec(tensors[name])
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def write_tmp(path: Path, tensors: Mapping[str, Tensorlike], metadata: dict[str, str]) -> tuple[int, str]:
    """Write a new file at `path` (must not exist) and fsync it; return (bytes, xxh3_64 hex).

    tensors: CPU tensors of the dtypes in DTYPE_CODES, any shape, written in C order; a list of
    tensors (pieces of the same dtype and trailing shape) is written as their concatenation along
    the first dimension, without concatenating them in memory. The bytes go to the disk directly
    when the filesystem allows it (cache/directio.py).
    """
    _check_little_endian()
    head, order = encode_header(tensors, metadata)
    parts = [memoryview(head)]
    for name in order:
        t = tensors[name]
        for piece in t if isinstance(t, list) else [t]:
            parts.append(memoryview(piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data))
    return directio.write_new_file(path, parts)


class ShardFormatError(ValueError):
    """A shard file does not follow the safetensors layout."""


def _parse_entry(name: str, entry: object, data_len: int, data_start: int, where: str) -> tuple:
    if not isinstance(entry, dict) or entry.get("dtype") not in CODE_DTYPES:
        raise ShardFormatError(f"{where}: tensor '{name}' has no known dtype")
    dtype = CODE_DTYPES[entry["dtype"]]
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ShardFormatError(f"{where}: tensor '{name}' has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ShardFormatError(f"{where}: tensor '{name}' has invalid data_offsets {offsets!r}")
    begin, end = offsets
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * itemsize:
        raise ShardFormatError(f"{where}: tensor '{name}' data_offsets {offsets} do not fit its shape "
                               f"{shape} or the file (truncated?)")
    if (data_start + begin) % itemsize:
        raise ShardFormatError(f"{where}: tensor '{name}' is not aligned to its item size")
    return dtype, tuple(shape), data_start + begin, data_start + end


def _check_packed(entries: dict[str, tuple], data_start: int, size: int, where: str) -> None:
    """The tensors' bytes are back to back, from the buffer's start to the file's end (FORMAT.md 3.1):
    no overlap, no hole, no trailing bytes."""
    at = data_start
    for name, (_dtype, _shape, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != at:
            what = "overlaps the tensor before it" if begin < at else f"leaves {begin - at} unused bytes before it"
            raise ShardFormatError(f"{where}: tensor '{name}' {what} (data_offsets are not back to back)")
        at = end
    if at != size:
        raise ShardFormatError(f"{where}: {size - at} bytes after the last tensor (the file is not one safetensors "
                               "buffer)")


class StShard:
    """One safetensors shard mapped read-only; tensors are views of the page cache."""

    def __init__(self, path: Path) -> None:
        _check_little_endian()
        where = str(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise ShardFormatError(f"{where}: {size} bytes is too short for a safetensors file")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (hlen,) = struct.unpack("<Q", self._mm[:8])
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            raise ShardFormatError(f"{where}: header length {hlen} does not fit a {size}-byte file")
        try:
            header = json.loads(self._mm[8:8 + hlen])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardFormatError(f"{where}: header is not valid JSON ({exc})") from exc
        if not isinstance(header, dict):
            raise ShardFormatError(f"{where}: header is not a JSON object")
        self.entries = {
            name: _parse_entry(name, entry, size - 8 - hlen, 8 + hlen, where)
            for name, entry in header.items() if name != "__metadata__"
        }
        _check_packed(self.entries, 8 + hlen, size, where)
        with warnings.catch_warnings():
            # The map is read-only on purpose; torch warns that it has no read-only tensors.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            self._base = torch.frombuffer(self._mm, dtype=torch.uint8)

    def spec(self, name: str) -> tuple[torch.dtype, tuple[int, ...]] | None:
        entry = self.entries.get(name)
        return None if entry is None else (entry[0], entry[1])

    def get(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Zero-copy view of tensor `name`, rows [start, stop) of its first dimension."""
        dtype, shape, begin, end = self.entries[name]
        t = self._base[begin:end].view(dtype).view(shape)
        return t if start is None and stop is None else t[start:stop]
