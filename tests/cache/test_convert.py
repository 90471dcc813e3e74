"""`python -m cache convert`: another store dtype and backend without the model, resumable and verified."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cache
from cache import convert as convert_mod
from cache.convert import ConvertError, convert
from cache.reader import DamagedShardError
from cache.writer import CacheWriter
from tests.cache.cache_producer import LAYERS, write_cache

REPO = Path(__file__).resolve().parents[2]
SPLITS = ("train", "heldout")


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _rows(path: Path) -> dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    with cache.open(path) as c:
        out = {}
        for s in SPLITS:
            n = len(c.shards(s))
            acts = torch.cat([c.read(s, i, LAYERS) for i in range(n)])
            toks = {k: torch.cat([c.read_tokens(s, i)[k] for i in range(n)]) for k in ("token_ids", "sequence",
                                                                                       "position", "document")}
            out[s] = (acts, toks)
        return out


def test_float32_to_int8_writes_the_shards_a_direct_int8_write_writes(tmp_path, backend):
    write_cache(tmp_path / "f32", backend, n_train=6)
    write_cache(tmp_path / "direct", backend, n_train=6, dtype="int8")
    s = convert(tmp_path / "f32", tmp_path / "i8", store_dtype="int8")
    assert s.rows == {"train": cache.open(tmp_path / "f32").num_rows("train"),
                      "heldout": cache.open(tmp_path / "f32").num_rows("heldout")}
    got, ref = _manifest(tmp_path / "i8"), _manifest(tmp_path / "direct")
    # Same rows in the same order and the same shard boundaries: the shard bytes are identical.
    for split in SPLITS:
        assert [e["xxh3"] for e in got["shards"][split]] == [e["xxh3"] for e in ref["shards"][split]]
    assert got["stats"] == ref["stats"] and got["dtype"] == "int8" and got["format_version"] == 2
    assert got["identity"] == {**ref["identity"], "store_dtype": "int8", "converted_from": "float32"}
    assert got["metadata"]["converted"]["source_dtype"] == "float32"


def test_int8_back_to_float32_and_to_zarr_keeps_the_decoded_values(tmp_path):
    write_cache(tmp_path / "i8", "safetensors", n_train=5, dtype="int8")
    convert(tmp_path / "i8", tmp_path / "back", store_dtype="float32", backend="zarr", zarr_compression="zstd")
    m = _manifest(tmp_path / "back")
    assert m["backend"] == "zarr" and m["dtype"] == "float32" and m["format_version"] == 1
    a, b = _rows(tmp_path / "i8"), _rows(tmp_path / "back")
    for split in SPLITS:
        assert torch.equal(a[split][0], b[split][0])  # the decoded float32 values, exactly
        assert all(torch.equal(a[split][1][k], b[split][1][k]) for k in a[split][1])


def test_an_interrupted_conversion_resumes_to_the_same_cache(tmp_path, monkeypatch):
    write_cache(tmp_path / "f32", "safetensors", n_train=8)
    monkeypatch.setattr(convert_mod, "APPEND_ROWS", 7)
    convert(tmp_path / "f32", tmp_path / "whole", store_dtype="int8")
    original, calls = CacheWriter.append, [0]

    def failing(self, *a, **k):
        calls[0] += 1
        if calls[0] == 25:
            self.flush()  # commit what was appended so far, as a long run would have, then die
            raise KeyboardInterrupt
        return original(self, *a, **k)

    monkeypatch.setattr(CacheWriter, "append", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "f32", tmp_path / "part", store_dtype="int8")
    monkeypatch.setattr(CacheWriter, "append", original)
    partial = cache.open(tmp_path / "part", allow_incomplete=True)
    assert not partial.complete and 0 < partial.num_rows("train")
    s = convert(tmp_path / "f32", tmp_path / "part", store_dtype="int8")
    assert 0 < s.new_rows < sum(s.rows.values())
    a, b = _manifest(tmp_path / "whole"), _manifest(tmp_path / "part")
    for split in SPLITS:
        assert [e["xxh3"] for e in a["shards"][split]] == [e["xxh3"] for e in b["shards"][split]]
    assert a["stats"] == b["stats"] and b["complete"]
    # A complete conversion run again is up to date: nothing is written.
    assert convert(tmp_path / "f32", tmp_path / "part", store_dtype="int8").new_rows == 0


def test_a_damaged_source_stops_the_conversion(tmp_path):
    write_cache(tmp_path / "f32", "safetensors", n_train=4)
    shard = tmp_path / "f32" / "train-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedShardError, match="train-000001.safetensors .* does not match its checksum"):
        convert(tmp_path / "f32", tmp_path / "i8", store_dtype="int8")


def test_refusals(tmp_path):
    write_cache(tmp_path / "f32", "safetensors", n_train=2)
    with pytest.raises(ConvertError, match="is the source cache"):
        convert(tmp_path / "f32", tmp_path / "f32", store_dtype="int8")
    with pytest.raises(ConvertError, match="'int4' is not a store dtype"):
        convert(tmp_path / "f32", tmp_path / "x", store_dtype="int4")
    write_cache(tmp_path / "other", "safetensors", n_train=2, dtype="int8")
    with pytest.raises(ValueError, match="different settings"):  # a different cache at DST is left alone
        convert(tmp_path / "f32", tmp_path / "other", store_dtype="int8")


def test_cli(tmp_path):
    write_cache(tmp_path / "f32", "safetensors", n_train=3)
    run = lambda *a: subprocess.run([sys.executable, "-m", "cache", *a], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    ok = run("convert", str(tmp_path / "f32"), str(tmp_path / "i8"), "--store-dtype", "int8")
    assert ok.returncode == 0 and "verified" in ok.stdout, ok.stderr
    assert run("verify", str(tmp_path / "i8")).returncode == 0
    missing = run("convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--store-dtype", "int8")
    assert missing.returncode == 2 and "is not a cache" in missing.stderr
