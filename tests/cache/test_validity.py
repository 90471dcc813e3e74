"""One definition of a valid cache (cache/validity.py): verify reports, by file and by what is wrong,
everything `cache.open` and the verified reads refuse (issue 17)."""

from __future__ import annotations

import pytest
import torch

import cache
from cache import validity
from tests.cache.cache_producer import write_cache
from tests.cache.damage import edit_header, edit_manifest, move_rows, put_float32, read_manifest, resign, tensor_span


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_count_non_finite_agrees_with_torch_on_special_values(dtype, monkeypatch):
    monkeypatch.setattr(validity, "_FINITE_BLOCK_ELEMENTS", 7)  # many blocks, a short last one
    finfo = torch.finfo(dtype)
    specials = [0.0, -0.0, finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 4, float("inf"), -float("inf"),
                float("nan"), 1.0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, generator=g).to(dtype)
    x[torch.randperm(100, generator=g)[:len(specials)]] = torch.tensor(specials, dtype=dtype)
    nan_payload = torch.tensor([0x7FC1 if dtype != torch.float32 else 0x7FC00001], dtype=torch.int32)
    x[0] = nan_payload.to(torch.int16 if dtype != torch.float32 else torch.int32).view(dtype)[0]
    expected = int((~torch.isfinite(x)).sum())
    assert expected == 4  # inf, -inf, nan and the NaN with a payload
    assert validity.count_non_finite(x) == expected
    assert validity.count_non_finite(x[torch.isfinite(x)]) == 0


def test_rows_that_disagree_with_the_tensors(tmp_path, backend):
    path = write_cache(tmp_path / "c", backend, n_train=6)
    a, b = move_rows(path, "train", 1, 2, 3)
    problems = cache.verify(path)
    assert len(problems) == 2 and problems[0].startswith(f"shard {a}: has tensor 'layer.0' of ")
    assert problems[1].startswith(f"shard {b}: has tensor 'layer.0' of ")
    with pytest.raises(cache.DamagedShardError, match=f"shard {a} of .* has tensor 'layer.0' of .* rows, where the "
                                                      "manifest says .* rows; the cache is damaged: run `python -m "
                                                      "cache verify"):
        cache.open(path)


def test_a_dtype_that_the_shards_do_not_have(tmp_path, backend):
    path = write_cache(tmp_path / "c", backend, n_train=3)
    edit_manifest(path, lambda m: m.update(dtype="bfloat16"))
    problems = cache.verify(path)
    names = [e["name"] for s in ("train", "heldout") for e in read_manifest(path)["shards"][s]]
    assert problems == [f"shard {n}: has tensor 'layer.0' in float32, where the manifest and the format say bfloat16"
                        for n in names]
    with pytest.raises(cache.DamagedShardError, match=f"shard {names[0]} of "):
        cache.open(path)


def test_manifest_statistics_are_checked_against_the_shards_sums(tmp_path, backend):
    path = write_cache(tmp_path / "c", backend, n_train=4)
    edit_manifest(path, lambda m: m["stats"]["heldout"]["2"].update(mean_norm=m["stats"]["heldout"]["2"]["mean_norm"]
                                                                    * (1 + 1e-6)))
    assert cache.verify(path) == ["manifest.json: stats.heldout.2.mean_norm does not match the sums stored in its "
                                  "shards (the manifest was edited or is of another cache)"]
    with pytest.raises(ValueError, match=r"manifest.json: stats.heldout.2.mean_norm does not match"):
        cache.open(path)


def test_altered_shard_sums_are_blamed_on_the_shard_not_the_manifest(tmp_path):
    path = write_cache(tmp_path / "c", "safetensors", n_train=4)
    name = read_manifest(path)["shards"]["train"][1]["name"]
    begin, _ = tensor_span(path / name, "stats.5.sumnorm")
    raw = bytearray((path / name).read_bytes())
    raw[begin + 6] ^= 0x01  # the sum of norms, a little different
    (path / name).write_bytes(bytes(raw))
    problems = cache.verify(path)
    assert len(problems) == 1 and problems[0].startswith(f"shard {name}: does not match its checksum in the manifest")
    with pytest.raises(cache.DamagedShardError, match=f"shard {name} of .* does not match its checksum"):
        cache.open(path)
    resign(path, "train", 1)  # now consistent with its checksum: the sums disagree with the manifest's
    assert [p.split(":")[0] for p in cache.verify(path)] == ["manifest.json"]


def test_non_finite_statistics_and_values(tmp_path):
    path = write_cache(tmp_path / "c", "safetensors", n_train=4)
    name = put_float32(path, "train", 1, 2, {0: float("nan")})
    assert cache.verify(path) == [f"shard {name}: holds 1 non-finite values (NaN or inf) in split train, layer 2: "
                                  "no SAE can train or be measured on them"]
    c = cache.open(path)  # no decoding at open: the values are checked as they are read
    assert c.read("train", 1, 5).shape[0] > 0  # unchecked reads (verify_reads off) trust the bytes
    c.verify_reads = True
    c.read("train", 1, 5)  # another layer: fine
    with pytest.raises(cache.NonFiniteValuesError, match=f"shard {name} of .* holds 1 non-finite values .* in split "
                                                          "train, layer 2"):
        c.read("train", 1, 2, 10, 12)  # rows without the NaN: the whole mapped layer is checked, once
    begin, _ = tensor_span(path / name, "stats.0.sumsq")
    raw = bytearray((path / name).read_bytes())
    raw[begin:begin + 8] = b"\x00\x00\x00\x00\x00\x00\xf0\x7f"  # +inf
    (path / name).write_bytes(bytes(raw))
    resign(path, "train", 1)
    assert cache.verify(path) == [f"shard {name}: has non-finite statistics for layer 0 (NaN or inf values)"]
    with pytest.raises(cache.DamagedShardError, match=f"shard {name} of .* has non-finite statistics for layer 0"):
        cache.open(path)


def test_tensors_that_are_not_back_to_back(tmp_path):
    """Offsets that fit each tensor's shape but overlap (two tensors read the same bytes)."""
    path = write_cache(tmp_path / "c", "safetensors", n_train=2)
    name = read_manifest(path)["shards"]["train"][0]["name"]
    edit_header(path / name, lambda h: h["position"].update(data_offsets=h["token_ids"]["data_offsets"]))
    resign(path, "train", 0)
    problems = cache.verify(path)
    assert len(problems) == 1 and problems[0].startswith(f"shard {name}: is malformed: tensor ")
    assert "data_offsets are not back to back" in problems[0]
    with pytest.raises(cache.DamagedShardError, match=f"shard {name} of .* is malformed: .* not back to back"):
        cache.open(path)


def test_non_finite_values_in_a_zarr_shard(tmp_path):
    import zarr

    from cache.checksum import hash_tree

    path = write_cache(tmp_path / "c", "zarr", n_train=4)
    m = read_manifest(path)
    entry = m["shards"]["train"][1]
    arr = zarr.open_array(str(path / entry["name"] / "layer.5"), mode="r+")
    arr[7, 3] = float("inf")
    entry["bytes"], entry["xxh3"] = hash_tree(path / entry["name"])
    edit_manifest(path, lambda mm: mm["shards"]["train"].__setitem__(1, entry))
    assert cache.verify(path) == [f"shard {entry['name']}: holds 1 non-finite values (NaN or inf) in split train, "
                                  "layer 5: no SAE can train or be measured on them"]
    c = cache.open(path)
    c.verify_reads = True
    c.read("train", 1, 5, 0, 7)  # zarr rows are checked as they are read: these are finite
    with pytest.raises(cache.NonFiniteValuesError, match=f"shard {entry['name']} of .* in split train, layer 5"):
        c.read("train", 1, [2, 5], 5, 9)
