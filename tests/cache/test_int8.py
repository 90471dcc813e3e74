"""The 8-bit store dtype `int8` (issue 14; FORMAT.md section 2.1, cache/encoding.py).

The stored codes and scales are checked bit for bit against a numpy implementation of the format written
here, reading the shards with the safetensors and zarr libraries themselves; decoding (reader, loader, the
torch and numpy decoders) against the format's decoding rule; statistics against float64 sums of the
decoded rows."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cache
from cache import encoding
from cache.manifest import ManifestError
from tests.cache import damage
from tests.cache.cache_producer import IDENTITY, LAYERS, SHARD_ROWS, all_rows, new_writer, produce, write_cache
from train.data import ActivationLoader

REPO = Path(__file__).resolve().parents[2]


# ---- the format, in numpy, independent of cache/encoding.py -----------------------------------------------------

def ref_encode(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FORMAT.md 2.1: codes and row scales of float32 rows x [n, d] for column scales c [d]."""
    y = x / c
    s = (np.abs(y).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(y / s[:, None]), -127, 127)
    q[s == 0] = 0
    return q.astype(np.int8), s


def ref_column_scale(x: np.ndarray) -> np.ndarray:
    c = np.sqrt((x.astype(np.float64) ** 2).sum(axis=0) / x.shape[0]).astype(np.float32)  # the writer sums in float32
    c[c == 0] = 1
    return c


def ref_decode(q: np.ndarray, s: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * s[:, None]).astype(np.float32) * c[None, :]


def raw_shard(path: Path, backend: str) -> dict[str, np.ndarray]:
    """Every tensor of a shard as the storage library itself reads it."""
    if backend == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    import zarr

    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(arr[...]) for name, arr in group.arrays()}


def outlier_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Rows with a few dimensions 100 times larger than the rest, a zero row and a zero column."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d)).astype(np.float32) * g.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
    x[:, :2] *= 100
    x[3] = 0
    x[:, 5] = 0
    return x


def write_rows(path: Path, x: dict[int, np.ndarray], backend: str = "safetensors", shard_rows: int = 64,
               dtype: str = "int8") -> Path:
    n, d = next(iter(x.values())).shape
    w = cache.CacheWriter(path, layers=list(x), d_model=d, dtype=dtype, shard_rows=shard_rows,
                          identity={"t": 1}, metadata={}, backend=backend)
    ids = torch.arange(n)
    w.append("train", chunk=0, offset=0, acts={L: torch.from_numpy(v) for L, v in x.items()}, token_ids=ids,
             sequence=ids, position=ids, document=ids)
    w.append("heldout", chunk=0, offset=0, acts={L: torch.from_numpy(v[:10]) for L, v in x.items()},
             token_ids=ids[:10], sequence=ids[:10], position=ids[:10], document=ids[:10])
    w.finish()
    return path


# ---- tests --------------------------------------------------------------------------------------------------------

def test_stored_codes_and_scales_are_the_formats_bit_for_bit(tmp_path, backend):
    x = {1: outlier_rows(150, 24, 1), 4: outlier_rows(150, 24, 2) * 3}
    write_rows(tmp_path / "c", x, backend)
    c = cache.open(tmp_path / "c")
    m = c.manifest
    assert m["format_version"] == 2 and m["dtype"] == "int8" and c.encoded and c.dtype == torch.float32
    for info in c.shards("train"):
        raw = raw_shard(tmp_path / "c" / info.name, backend)
        a = info.index * 64
        for L, rows in x.items():
            rows = rows[a:a + info.rows]
            q, s, col = raw[f"layer.{L}"], raw[f"scale.{L}.row"], raw[f"scale.{L}.col"]
            assert q.dtype == np.int8 and s.dtype == np.float32 and col.dtype == np.float32
            np.testing.assert_allclose(col, ref_column_scale(rows), rtol=1e-5)  # the writer's choice, stored
            q_ref, s_ref = ref_encode(rows, col)  # the format's codes for the stored column scales
            assert np.array_equal(s, s_ref) and np.array_equal(q, q_ref)
            decoded = ref_decode(q, s, col)
            assert np.array_equal(c.read("train", info.index, L).numpy(), decoded)
            got_q, got_s, got_c = c.read_encoded("train", info.index, L)
            assert np.array_equal(got_q.numpy(), q) and np.array_equal(got_s.numpy(), s)
    # Statistics: of the decoded values (FORMAT.md 4.3), within FORMAT.md 2's bound of a float64 sum.
    for L in x:
        rows = np.concatenate([c.read("train", i, L).numpy() for i in range(len(c.shards("train")))]).astype(np.float64)
        st = c.stats("train", L)
        norms = np.sqrt((rows ** 2).sum(1))
        assert np.abs(st.mean - rows.mean(0)).max() <= 1e-6 * norms.mean()
        np.testing.assert_allclose(st.mean_sq_norm, (norms ** 2).mean(), rtol=1e-6)
        np.testing.assert_allclose(st.mean_norm, norms.mean(), rtol=1e-6)


def test_decoders_agree_with_the_rule_in_any_dtype():
    x = torch.from_numpy(outlier_rows(300, 40))
    q, s, c = encoding.encode(x)
    ref = ref_decode(q.numpy(), s.numpy(), c.numpy())
    assert np.array_equal(encoding.decode(q, s, c).numpy(), ref)
    assert np.array_equal(encoding.decode_numpy(q.numpy(), s.numpy(), c.numpy()), ref)
    assert torch.equal(encoding.decode(q, s, c, torch.bfloat16), torch.from_numpy(ref).to(torch.bfloat16))
    # Batches of stacked layers [B, L, d] with per-row scales [B, L] decode alike (a GPU batch's shape).
    stacked = encoding.decode(torch.stack([q, q], 1), torch.stack([s, s], 1), c)
    assert torch.equal(stacked[:, 1], torch.from_numpy(ref))


def test_relative_error_with_outlier_dimensions_is_below_one_percent(tmp_path):
    x = outlier_rows(4096, 384)
    q, s, c = encoding.encode(torch.from_numpy(x))
    got = encoding.decode(q, s, c).numpy().astype(np.float64)
    rel = np.sqrt(((got - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
    # The same codes with one absmax scale per row only (the naive choice) spend them on the outliers.
    rs = np.abs(x).max(1, keepdims=True) / 127
    rs[rs == 0] = 1
    naive = np.clip(np.rint(x / rs), -127, 127) * rs
    rel_naive = np.sqrt(((naive - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
    assert rel < 0.01 and rel < rel_naive / 3, (rel, rel_naive)


def test_bytes_per_token_layer_within_the_budget(tmp_path):
    """Codes and both scales, per token and layer, against bfloat16's 2 * d_model bytes: at most 0.52."""
    x = {L: outlier_rows(2048, 384, L) for L in (0, 1)}
    write_rows(tmp_path / "i8", x, shard_rows=1024)
    c = cache.open(tmp_path / "i8")
    nbytes = 0
    for info in c.shards("train"):
        raw = raw_shard(tmp_path / "i8" / info.name, "safetensors")
        nbytes += sum(v.nbytes for k, v in raw.items() if k.startswith(("layer.", "scale.")))
    per_token_layer = nbytes / (2048 * 2)
    assert per_token_layer == 384 + 4 + 4 * 384 / 1024  # codes, row scale, the shard's column scales
    assert per_token_layer / (2 * 384) <= 0.52


def test_float_caches_stay_version_1_and_a_version_1_int8_manifest_is_refused(tmp_path):
    write_cache(tmp_path / "f", "safetensors", n_train=2)
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["format_version"] == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "f" / "train-000000.safetensors"), "np") as f:
        assert f.metadata()["saecache_format_version"] == "1"
    write_cache(tmp_path / "q", "safetensors", n_train=2, dtype="int8")
    with safe_open(str(tmp_path / "q" / "train-000000.safetensors"), "np") as f:
        assert f.metadata()["saecache_format_version"] == "2"
    path = tmp_path / "q" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["format_version"] = 1
    path.write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="key 'dtype' must be one of .* in format_version 1, got 'int8'"):
        cache.open(tmp_path / "q")


def test_the_loader_decodes_into_the_training_dtype(tmp_path, backend):
    write_cache(tmp_path / "c", backend, n_train=6, dtype="int8")
    c = cache.open(tmp_path / "c")
    every = np.concatenate([c.read("train", i, LAYERS).numpy() for i in range(len(c.shards("train")))])
    with ActivationLoader(c, LAYERS, 32, seed=3, block_rows=8, buffer_rows=64) as loader:
        it = loader.batches()
        got = np.concatenate([next(it).x.numpy() for _ in range(loader.batches_per_epoch)])
    # One epoch is a permutation of the decoded rows.
    key = lambda a: sorted(r.tobytes() for r in a)  # noqa: E731
    assert got.dtype == np.float32 and key(got) == key(every)
    with ActivationLoader(c, LAYERS, 32, seed=3, block_rows=8, buffer_rows=64) as a, \
            ActivationLoader(c, LAYERS, 32, seed=3, block_rows=8, buffer_rows=64, dtype=torch.bfloat16) as b:
        x32, x16 = next(a.batches()).x, next(b.batches()).x
    assert x16.dtype == torch.bfloat16 and torch.equal(x16, x32.to(torch.bfloat16))


def test_the_loader_on_a_single_layer_matches_reads(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=6, dtype="int8")
    c = cache.open(tmp_path / "c")
    every = np.concatenate([c.read("train", i, 2).numpy() for i in range(len(c.shards("train")))])
    with ActivationLoader(c, 2, 1000) as loader:
        got = next(loader.batches()).x.numpy()
    assert sorted(r.tobytes() for r in got) == sorted(r.tobytes() for r in every)


def test_a_resumed_write_gives_the_same_shards(tmp_path, backend):
    write_cache(tmp_path / "whole", backend, n_train=6, dtype="int8")
    w = new_writer(tmp_path / "part", backend, dtype="int8")
    produce(w, "train", 3)
    w.close()  # buffered rows are lost, as in a crash
    w = new_writer(tmp_path / "part", backend, dtype="int8")
    produce(w, "train", 6, start=w.resume_point("train"))
    produce(w, "heldout", 2)
    w.finish()
    a, b = (json.loads((tmp_path / p / "manifest.json").read_text()) for p in ("whole", "part"))
    assert [e["xxh3"] for e in a["shards"]["train"]] == [e["xxh3"] for e in b["shards"]["train"]]
    assert a["stats"] == b["stats"]


def test_writer_reads_rows_of_any_float_dtype(tmp_path):
    acts, _ = all_rows("train", 3)
    w = new_writer(tmp_path / "c", "safetensors", dtype="int8")
    n = acts[LAYERS[0]].shape[0]
    ids = torch.arange(n)
    w.append("train", chunk=0, offset=0, acts={L: a.to(torch.bfloat16) for L, a in acts.items()}, token_ids=ids,
             sequence=ids, position=ids, document=ids)
    w.finish()
    c = cache.open(tmp_path / "c")
    rows = acts[LAYERS[0]][:SHARD_ROWS].to(torch.bfloat16).to(torch.float32).numpy()
    q, s = ref_encode(rows, ref_column_scale(rows))
    assert np.array_equal(c.read_encoded("train", 0, LAYERS[0])[0].numpy(), q)


def test_verify_and_info_on_an_int8_cache(tmp_path):
    write_cache(tmp_path / "c", "safetensors", n_train=3, dtype="int8")
    run = lambda *a: subprocess.run([sys.executable, "-m", "cache", *a], cwd=REPO, capture_output=True, text=True)  # noqa: E731
    info = run("info", str(tmp_path / "c"))
    assert info.returncode == 0 and "dtype      int8 (int8 codes" in info.stdout
    assert run("verify", str(tmp_path / "c")).returncode == 0
    shard = tmp_path / "c" / "train-000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0x01  # a code of the last layer
    shard.write_bytes(bytes(data))
    bad = run("verify", str(tmp_path / "c"))
    assert bad.returncode == 1 and "train-000000.safetensors: does not match its checksum" in bad.stdout


def test_a_non_finite_scale_is_named_by_verify_and_by_the_reader(tmp_path):
    """An 8-bit shard's codes are always finite; an inf scale (checksum re-signed, as a buggy writer would
    leave it) makes its decoded rows inf: verify and a verified read both name shard, split and layer."""
    folder = write_cache(tmp_path / "c", "safetensors", n_train=3, dtype="int8")
    layer = LAYERS[-1]
    name = damage.read_manifest(folder)["shards"]["train"][1]["name"]
    begin, _end = damage.tensor_span(folder / name, encoding.row_scale_key(layer))
    raw = bytearray((folder / name).read_bytes())
    raw[begin + 4:begin + 8] = struct.pack("<f", float("inf"))  # the second row's scale
    (folder / name).write_bytes(bytes(raw))
    damage.resign(folder, "train", 1)
    what = f"{name}: holds 1 non-finite values (NaN or inf) in split train, layer {layer}"
    bad = subprocess.run([sys.executable, "-m", "cache", "verify", str(folder)], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode == 1 and what in bad.stdout
    c = cache.open(folder)
    c.verify_reads = True  # as training and evaluation set it
    c.read("train", 0, layer)  # the other shards read as before
    with pytest.raises(cache.NonFiniteValuesError, match=f"non-finite values .* split train, layer {layer}"):
        c.read("train", 1, layer)
    packed = cache.open(folder)
    packed.verify_reads = True
    with pytest.raises(cache.NonFiniteValuesError, match=name):
        packed.read_encoded("train", 1, layer, 0, 4)


def test_non_finite_rows_are_refused_naming_the_shard(tmp_path):
    w = cache.CacheWriter(tmp_path / "c", layers=[0], d_model=4, dtype="int8", shard_rows=2, identity=IDENTITY,
                          metadata={})
    x = torch.ones(2, 4)
    x[1, 2] = float("nan")
    ids = torch.arange(2)
    with pytest.raises(ValueError, match="shard train-000000.safetensors: non-finite values"):
        w.append("train", chunk=0, offset=0, acts={0: x}, token_ids=ids, sequence=ids, position=ids, document=ids)
        w.flush()
    w.close()
    assert cache.open(tmp_path / "c", allow_incomplete=True).num_rows("train") == 0



@pytest.mark.parametrize("layers", [LAYERS, 2])
def test_packed_batches_decode_on_the_device_to_the_loaders_rows(tmp_path, backend, layers):
    """decode=False (a GPU training): packed rows cross to the device and are decoded there; run on the CPU
    here (the decoding is device-agnostic torch), they give the bits the loader's own decoding gives."""
    from train.data import rows_on

    write_cache(tmp_path / "c", backend, n_train=6, dtype="int8")
    c = cache.open(tmp_path / "c")
    for dtype in (torch.float32, torch.bfloat16):
        kw = dict(seed=5, block_rows=8, buffer_rows=64, dtype=dtype)
        with ActivationLoader(c, layers, 48, **kw) as plain, \
                ActivationLoader(c, layers, 48, decode=False, **kw) as packed:
            a, b = plain.batches(), packed.batches()
            tables: dict = {}
            for _ in range(plain.batches_per_epoch + 1):  # into the second epoch
                x, p = next(a), next(b)
                width = c.d_model + encoding.PACKED_EXTRA
                assert p.x.dtype == torch.uint8 and p.x.shape[-1] == width and (p.epoch, p.index) == (x.epoch, x.index)
                got = rows_on(p, torch.device("cpu"), tables=tables)
                assert got.dtype == dtype and torch.equal(got, x.x)


def test_rows_from_a_device_are_encoded_there_to_the_same_codes(tmp_path, backend, monkeypatch):
    """The writer's device path (rows assembled where they arrive, encoded and summed there, codes and scales
    staged to the host), run on the CPU as its device: the same shards as the host path, statistics from
    the device's sums of the decoded values."""
    from cache import buffer, staging

    write_cache(tmp_path / "host", backend, n_train=7, n_heldout=3, dtype="int8", async_write=True)
    staged = []
    real = staging.DeviceStager.stage

    def spy(self, *a, **k):
        staged.append(self.encoded)
        return real(self, *a, **k)

    monkeypatch.setattr(buffer, "assembles_on_device", lambda device: True)
    monkeypatch.setattr(staging.DeviceStager, "stage", spy)
    write_cache(tmp_path / "dev", backend, n_train=7, n_heldout=3, dtype="int8", async_write=True, workers=2)
    assert staged and all(staged), "the shards did not go through the device's encoding"
    a, b = cache.open(tmp_path / "host"), cache.open(tmp_path / "dev")
    # Codes and scales bit for bit; the sums are float64 on the device and float32 within blocks on the
    # host, each within 1e-6 of the mean norm of an exact sum (FORMAT.md 2).
    for split in ("train", "heldout"):
        for i in range(len(a.shards(split))):
            for L in LAYERS:
                for x, y in zip(a.read_encoded(split, i, L), b.read_encoded(split, i, L), strict=True):
                    assert torch.equal(x, y)
        for L in LAYERS:
            sa, sb = a.stats(split, L), b.stats(split, L)
            assert np.abs(sb.mean - sa.mean).max() <= 2e-6 * sa.mean_norm
            np.testing.assert_allclose(sb.mean_norm, sa.mean_norm, rtol=2e-6)
    assert cache.verify(tmp_path / "dev") == []


def test_a_non_finite_row_from_a_device_is_refused(tmp_path, monkeypatch):
    from cache import buffer

    monkeypatch.setattr(buffer, "assembles_on_device", lambda device: True)
    w = cache.CacheWriter(tmp_path / "c", layers=[0], d_model=4, dtype="int8", shard_rows=2, identity=IDENTITY,
                          metadata={})
    x = torch.ones(2, 4)
    x[0, 1] = float("inf")
    ids = torch.arange(2)
    with pytest.raises(ValueError, match="shard train-000000.safetensors: non-finite values"):
        w.append("train", chunk=0, offset=0, acts={0: x}, token_ids=ids, sequence=ids, position=ids, document=ids)
        w.flush()
    w.close()
