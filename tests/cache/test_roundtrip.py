"""Values, token fields, shard boundaries and read shapes survive a write/read round trip."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import cache
from cache import reader as reader_mod
from tests.cache.cache_producer import LAYERS, SHARD_ROWS, D, all_rows, expected_ends, make_chunk, write_cache


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_values_round_trip_in_stored_dtype(tmp_path, backend, dtype):
    write_cache(tmp_path / "c", backend, n_train=5, dtype=dtype)
    c = cache.open(tmp_path / "c")
    acts, _ = all_rows("train", 5)
    stored = getattr(torch, dtype)
    for layer in LAYERS:
        got = torch.cat([c.read("train", i, layer) for i in range(len(c.shards("train")))])
        assert got.dtype == stored
        # The reference cast is torch's own rounding of the float32 input, independent of the writer.
        assert torch.equal(got, acts[layer].to(stored))
    assert c.dtype == stored and c.layers == LAYERS and c.d_model == D


def test_shard_sizes_and_end_cursors(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=7, n_heldout=3)
    c = cache.open(tmp_path / "c")
    for split, n_chunks in (("train", 7), ("heldout", 3)):
        _, ids = all_rows(split, n_chunks)
        infos = c.shards(split)
        assert [s.rows for s in infos[:-1]] == [SHARD_ROWS] * (len(infos) - 1)
        assert sum(s.rows for s in infos) == len(ids) == c.num_rows(split)
        assert [s.end for s in infos] == expected_ends(split, n_chunks, SHARD_ROWS)
        assert [s.index for s in infos] == list(range(len(infos)))
        assert all(s.split == split and s.name.startswith(f"{split}-") for s in infos)


def test_token_fields(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=4)
    c = cache.open(tmp_path / "c")
    chunks = [make_chunk("train", i) for i in range(4)]
    for name, dtype in (("token_ids", torch.int32), ("sequence", torch.int64), ("position", torch.int32),
                        ("document", torch.int64)):
        got = torch.cat([c.read_tokens("train", i)[name] for i in range(len(c.shards("train")))])
        assert got.dtype == dtype
        assert torch.equal(got.long(), torch.cat([ch[name] for ch in chunks]).long())
    part = c.read_tokens("train", 1, 3, 9)
    assert all(v.shape == (6,) for v in part.values())


def test_row_ranges_and_multi_layer_reads(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=4)
    c = cache.open(tmp_path / "c")
    full = c.read("train", 1, 2)
    assert torch.equal(c.read("train", 1, 2, 5, 17), full[5:17])
    assert c.read("train", 1, 2, 7, 7).shape == (0, D)
    multi = c.read("train", 1, [5, 0], 3, 30)
    assert multi.shape == (27, 2, D)
    assert torch.equal(multi, torch.stack([c.read("train", 1, 5, 3, 30), c.read("train", 1, 0, 3, 30)], dim=1))


def test_bad_read_arguments(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=3)
    c = cache.open(tmp_path / "c")
    with pytest.raises(ValueError, match=r"layer 7 is not in this cache; its layers are \[0, 2, 5\]"):
        c.read("train", 0, 7)
    with pytest.raises(ValueError, match="layer 9"):
        c.read("train", 0, [0, 9])
    with pytest.raises(ValueError, match="split must be one of"):
        c.read("test", 0, 0)
    with pytest.raises(ValueError, match="shard must be an int"):
        c.read("train", 99, 0)
    with pytest.raises(ValueError, match="out of range"):
        c.read("train", 0, 0, 5, 10_000)


def _mapped_ranges(path) -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == str(path):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.append((lo, hi))
    return out


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_safetensors_single_layer_read_is_a_view_of_the_file_mapping(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=3)
    c = cache.open(tmp_path / "c")
    x = c.read("train", 1, 5, 2, 15)
    ranges = _mapped_ranges((tmp_path / "c" / c.shards("train")[1].name).resolve())
    ptr = x.data_ptr()
    assert ranges, "the shard file is not memory-mapped"
    assert any(lo <= ptr and ptr + x.numel() * x.element_size() <= hi for lo, hi in ranges)
    # A copy made by the multi-layer path is not inside the mapping.
    y = c.read("train", 1, [5])
    assert not any(lo <= y.data_ptr() < hi for lo, hi in ranges)


def test_views_outlive_the_cache_object(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=3)
    c = cache.open(tmp_path / "c")
    x = c.read("train", 0, 2)
    expected = x.clone()
    c.close()
    del c
    assert torch.equal(x, expected)


def test_many_shards_with_a_small_open_map_limit(tmp_path, backend, monkeypatch):
    monkeypatch.setattr(reader_mod, "MAX_OPEN_SHARDS", 2)
    write_cache(tmp_path / "c", backend, n_train=8)
    c = cache.open(tmp_path / "c")
    acts, _ = all_rows("train", 8)
    n = len(c.shards("train"))
    for _ in range(2):
        got = torch.cat([c.read("train", i, 0) for i in range(n)])
        assert torch.equal(got, acts[0])
    assert len(c._open) <= 2


def test_safetensors_shard_follows_the_published_layout(tmp_path):
    """An independent reader (the safetensors package) and a hand parse agree with the cache."""
    from safetensors import safe_open

    write_cache(tmp_path / "c", "safetensors", n_train=3, dtype="bfloat16")
    c = cache.open(tmp_path / "c")
    path = tmp_path / "c" / c.shards("train")[0].name
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    assert (8 + hlen) % 8 == 0
    header = json.loads(raw[8:8 + hlen])
    ends = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert ends[0][0] == 0 and ends[-1][1] == len(raw) - 8 - hlen
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:], strict=False)), "holes in the byte buffer"
    with safe_open(str(path), "pt") as f:
        assert torch.equal(f.get_tensor("layer.2"), c.read("train", 0, 2))
        assert torch.equal(f.get_tensor("sequence"), c.read_tokens("train", 0)["sequence"])
        assert f.get_tensor("stats.2.sum").dtype == torch.float64
        assert f.get_tensor("stats.2.sumsq").shape == ()


def test_the_manifest_carries_the_format_version_and_another_is_refused(tmp_path, backend):
    import json

    write_cache(tmp_path / "c", backend, n_train=2)
    path = tmp_path / "c" / "manifest.json"
    doc = json.loads(path.read_text())
    assert doc["format_version"] == 1  # float caches stay version 1 (the 8-bit dtype is version 2: test_int8.py)
    cache.open(tmp_path / "c").close()  # `cache.open` is the documented entry point
    doc["format_version"] = cache.FORMAT_VERSION + 1
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"format_version {cache.FORMAT_VERSION + 1} is newer"):
        cache.open(tmp_path / "c")


def test_numpy_integers_are_accepted_as_indices(tmp_path, backend):
    import numpy as np

    write_cache(tmp_path / "c", backend, n_train=3)
    c = cache.open(tmp_path / "c")
    assert torch.equal(c.read("train", np.int64(1), np.int32(2), np.int64(3), np.int64(9)),
                       c.read("train", 1, 2, 3, 9))
    with pytest.raises(ValueError, match="shard must be an int"):
        c.read("train", True, 2)
