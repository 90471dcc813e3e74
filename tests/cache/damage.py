"""Ways to damage a small safetensors cache on purpose, for the validity tests (cache and train):
edit one manifest field, put values into a layer and re-sign the shard so that its checksum holds."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import xxhash

from cache.names import MANIFEST


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_bytes())


def edit_manifest(folder: Path, edit: Callable[[dict], None]) -> None:
    m = read_manifest(folder)
    edit(m)
    (folder / MANIFEST).write_text(json.dumps(m))


def tensor_span(shard: Path, name: str) -> tuple[int, int]:
    """Byte range [begin, end) of tensor `name` in a safetensors file, from its own header."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def resign(folder: Path, split: str, index: int) -> None:
    """Make the manifest's size and xxh3 of one shard those of its current bytes (a checksum-consistent
    alteration, as a buggy writer or a hand edit would leave)."""
    m = read_manifest(folder)
    entry = m["shards"][split][index]
    raw = (folder / entry["name"]).read_bytes()
    entry["bytes"], entry["xxh3"] = len(raw), xxhash.xxh3_64(raw).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(m))


def put_float32(folder: Path, split: str, index: int, layer: int, values: dict[int, float]) -> str:
    """Overwrite float32 elements (flat index -> value) of `layer.{layer}` in one shard and re-sign it;
    returns the shard's name. The shard's statistics are left as they were."""
    name = read_manifest(folder)["shards"][split][index]["name"]
    path = folder / name
    begin, _end = tensor_span(path, f"layer.{layer}")
    raw = bytearray(path.read_bytes())
    for i, v in values.items():
        raw[begin + 4 * i:begin + 4 * i + 4] = struct.pack("<f", v)
    path.write_bytes(bytes(raw))
    resign(folder, split, index)
    return name


def move_rows(folder: Path, split: str, a: int, b: int, k: int) -> tuple[str, str]:
    """Say in the manifest that shard `a` of `split` has k rows fewer and shard `b` k more than they hold;
    the split's totals and statistics stay consistent. Returns the two shards' names."""
    def edit(m: dict) -> None:
        m["shards"][split][a]["rows"] -= k
        m["shards"][split][b]["rows"] += k

    edit_manifest(folder, edit)
    entries = read_manifest(folder)["shards"][split]
    return entries[a]["name"], entries[b]["name"]


def edit_header(shard: Path, edit: Callable[[dict], None]) -> None:
    """Edit a safetensors file's JSON header in place (same length, padded with spaces)."""
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, "the edited header must not be longer"
    raw[8:8 + n] = text + b" " * (n - len(text))
    shard.write_bytes(bytes(raw))
