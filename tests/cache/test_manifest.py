"""The reader refuses incomplete caches and malformed manifests with messages that say what to fix."""

from __future__ import annotations

import json

import pytest

import cache
from cache.manifest import ManifestError
from tests.cache.cache_producer import write_cache


def _edit(path, fn) -> None:
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_incomplete_cache_is_refused_unless_allowed(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=3, finish=False)
    refused = r"cache at .* is incomplete: \d+ shards \(manifest.json says complete: false.*rerun make harvest"
    with pytest.raises(ValueError, match=refused):
        cache.open(tmp_path / "c")
    c = cache.open(tmp_path / "c", allow_incomplete=True)
    assert not c.complete and c.num_rows("train") > 0


def test_newer_format_version_is_refused(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=2)
    newer = cache.FORMAT_VERSION + 1  # version 2 is the 8-bit dtype's (tests/cache/test_int8.py)
    _edit(tmp_path / "c", lambda m: m.update(format_version=newer))
    with pytest.raises(ManifestError, match=f"format_version {newer} is newer.*upgrade"):
        cache.open(tmp_path / "c")


@pytest.mark.parametrize("version", [0, "1", 1.0, None])
def test_other_format_versions_are_refused(tmp_path, version):
    write_cache(tmp_path / "c", "safetensors", n_train=2)
    _edit(tmp_path / "c", lambda m: m.update(format_version=version))
    with pytest.raises(ManifestError, match="format_version"):
        cache.open(tmp_path / "c")


def test_missing_key_is_named(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=2)
    _edit(tmp_path / "c", lambda m: m.pop("d_model"))
    with pytest.raises(ManifestError, match="key 'd_model' is missing"):
        cache.open(tmp_path / "c")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(d_model="12"), "key 'd_model' must be int, got str"),
    (lambda m: m.update(complete="yes"), "key 'complete' must be bool"),
    (lambda m: m.update(layers=[0, 0]), "key 'layers' must be a non-empty list of distinct ints"),
    (lambda m: m.update(dtype="int8"), "key 'dtype' must be one of"),
    (lambda m: m["shards"]["train"][0].update(rows="40"), r"key 'shards.train\[0\].rows' must be int"),
    (lambda m: m["shards"]["train"][0].update(xxh3="XYZ"), r"shards.train\[0\].xxh3' must be 16 lowercase hex"),
    (lambda m: m["shards"]["train"][0].update(end=[1]), r"shards.train\[0\].end' must be \[chunk, offset\]"),
    (lambda m: m["shards"]["train"][0].update(name="x.safetensors"), r"shards.train\[0\].name' must be"),
    (lambda m: m["rows"].update(train=1), "key 'rows.train' is 1 but its shards hold"),
    (lambda m: m["stats"]["train"]["2"].update(mean=[0.0]), r"key 'stats.train.2.mean' must be a list of 12"),
    (lambda m: m["stats"]["train"].pop("5"), "key 'stats.train.5' is missing"),
])
def test_wrong_types_and_values_are_named(tmp_path, edit, message):
    write_cache(tmp_path / "c", "safetensors", n_train=2)
    _edit(tmp_path / "c", edit)
    with pytest.raises(ManifestError, match=message):
        cache.open(tmp_path / "c")


def test_unknown_keys_are_ignored_when_the_version_matches(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=2)
    _edit(tmp_path / "c", lambda m: m.update(future_key={"a": 1}))
    assert cache.open(tmp_path / "c").num_rows("train") > 0


def test_damaged_json_and_missing_manifest(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=2)
    (tmp_path / "c" / "manifest.json").write_text('{"format_version": 1,')
    with pytest.raises(ManifestError, match="not valid JSON"):
        cache.open(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="is not a cache: no manifest.json"):
        cache.open(tmp_path / "nowhere")


def test_missing_or_resized_shard_is_refused_on_open(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=3)
    c = cache.open(tmp_path / "c")
    first, second = c.shards("train")[:2]
    target = tmp_path / "c" / second.name
    if target.is_dir():
        next(p for p in sorted(target.rglob("*")) if p.is_file() and p.name != "zarr.json").unlink()
    else:
        target.write_bytes(target.read_bytes()[:-5])
    with pytest.raises(ValueError, match=f"shard {second.name} of .* has .* bytes, the manifest says"):
        cache.open(tmp_path / "c")
    import shutil

    shutil.rmtree(tmp_path / "c" / first.name) if backend == "zarr" else (tmp_path / "c" / first.name).unlink()
    with pytest.raises(ValueError, match=f"shard {first.name} of .* is missing"):
        cache.open(tmp_path / "c")


def test_incremental_manifest_text_is_the_compact_json_of_each_manifest():
    import copy

    from cache.manifest import ManifestText, new

    m = new(identity={"model": "x", "ünï": [1, 2.5]}, metadata={"note": None}, layers=[0, 3], d_model=2,
            dtype="float32", backend="safetensors", shard_rows=4, zarr_compression=None)
    text = ManifestText()
    history = []
    for i in range(5):
        split = "heldout" if i == 3 else "train"
        entry = {"name": f"{split}-{i:06d}.safetensors", "rows": 4, "bytes": 100 + i, "xxh3": "0" * 16, "end": [i, 1]}
        m = {**m, "shards": {s: list(v) for s, v in m["shards"].items()}, "stats": dict(m["stats"])}
        m["shards"][split].append(entry)
        m["stats"][split] = {"0": {"count": i, "mean": [0.1 * i, 1 / 3], "mean_sq_norm": 2.0, "mean_norm": 1e-300}}
        history.append(copy.deepcopy(m))
        assert text.encode(m) == json.dumps(m, separators=(",", ":")).encode()
    # An older manifest (a failed rewrite is retried from the last committed one) is encoded right too.
    assert text.encode(history[1]) == json.dumps(history[1], separators=(",", ":")).encode()
    assert json.loads(text.encode(m)) == m
