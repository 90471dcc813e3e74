"""What makes a cache valid: the one definition that `verify` reports against and that every reader
checks before it trusts a shard. cache/FORMAT.md section 5.1 lists the same checks in the same order.

1. the manifest follows the schema (`manifest.validate`: keys, types, names, row totals, statistics
   counts, finite numbers);
then for every listed shard, in manifest order (the first failure is the shard's problem):
2. it is present and has the manifest's size;
3. its bytes hash to the manifest's xxh3;
4. its header parses and every tensor's offsets fit its shape and the file (st_backend, zarr_backend);
5. every tensor of FORMAT.md section 2 is there with its dtype and shape: `layer.{L}` [rows, d_model] in
   the manifest's dtype, the token fields [rows], the float64 statistics [d_model], [], [];
6. its statistics are finite;
7. its stored activations are finite;
and for every split:
8. the manifest's statistics are the shards' sums re-added in shard order (to rounding).

`verify` runs all of them (reading a safetensors shard once for 3 and 7). A reader (`open_cache`)
runs 1, 2 and 4-6 on every shard and 8 when it opens a cache, so a damaged cache is refused before a
training creates anything; with `verify_reads` it adds 3 when it first maps a shard and 7 when it first
reads a layer of it (the training loader's thread), which costs one pass over the bytes read instead of
a pass over the whole cache at start.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xxhash

from . import encoding, shardio
from .checksum import hash_shard, shard_size
from .names import MANIFEST, SPLITS, STORED_DTYPES, TOKEN_FIELDS, layer_key, stat_keys
from .st_backend import ShardFormatError, StShard
from .stats import ShardSums, SplitStats

# Values checked for finiteness at a time (1 MB of scratch; also bounds a zarr read's copy).
_FINITE_BLOCK_ELEMENTS = 1 << 20
# Exponent bits all set = inf or NaN, for the 16-bit formats (numpy has no bfloat16, and its float16
# isfinite is three times slower than this mask).
_EXPONENT_MASK = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
# How far the manifest's statistics may be from the shards' sums re-added (FORMAT.md 2: any float64
# summation agrees to about 1e-12 relative): relative to the values, or to the mean norm for the mean.
_STATS_RTOL = 1e-9
_HASH_BLOCK = 8 << 20  # bytes read at a time by verify (as checksum's)
MISSING = "is missing"


class DamagedShardError(ValueError):
    """A shard that is not what the manifest says (checksum, structure, non-finite values); the
    message names the shard and `python -m cache verify`."""


class NonFiniteValuesError(DamagedShardError):
    """A shard holding NaN or inf activations; the message names the shard, its split and the layer."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cache: the file it is in (a shard's name, or manifest.json) and what."""

    file: str
    what: str

    def line(self) -> str:
        """verify's rendering: `shard train-000001.safetensors: ...` or `manifest.json: ...`."""
        return f"{MANIFEST}: {self.what}" if self.file == MANIFEST else f"shard {self.file}: {self.what}"


def fix_hint(folder: Path) -> str:
    return (f"the cache is damaged: run `python -m cache verify {folder}`, then rebuild it "
            "(make harvest OVERWRITE=1)")


def reader_error(folder: Path, problem: Problem) -> ValueError:
    """The one-line error a reader raises for `problem` (DamagedShardError for a shard)."""
    if problem.file == MANIFEST:
        return ValueError(f"{folder / MANIFEST}: {problem.what}; {fix_hint(folder)}")
    return DamagedShardError(f"shard {problem.file} of {folder} {problem.what}; {fix_hint(folder)}")


# ---- 2. presence and size ---------------------------------------------------------------------------
def size_problem(folder: Path, entry: dict) -> Problem | None:
    path = folder / entry["name"]
    if not path.exists():
        return Problem(entry["name"], MISSING)
    size = shard_size(path)
    if size != entry["bytes"]:
        return Problem(entry["name"], f"has {size} bytes, the manifest says {entry['bytes']} (truncated or altered)")
    return None


# ---- 3. checksum ------------------------------------------------------------------------------------
def checksum_problem(folder: Path, entry: dict) -> Problem | None:
    try:
        _size, digest = hash_shard(folder / entry["name"])
    except OSError as exc:
        return Problem(entry["name"], f"cannot be read ({exc})")
    return _mismatch(entry, digest)


def _mismatch(entry: dict, digest: str) -> Problem | None:
    if digest != entry["xxh3"]:
        return Problem(entry["name"], f"does not match its checksum in the manifest (xxh3 {digest}, expected "
                                      f"{entry['xxh3']}): corrupted")
    return None


# ---- 4-6. structure and statistics --------------------------------------------------------------------
def open_checked(folder: Path, entry: dict, m: dict) -> tuple[shardio.ShardReader | None, Problem | None]:
    """Open a shard and check it against the manifest (checks 4 and 5): (reader, None) or (None, problem)."""
    path = folder / entry["name"]
    try:
        reader = shardio.open_shard(path, m["backend"])
    except (ShardFormatError, ValueError, OSError) as exc:  # zarr raises ZarrFormatError, a ValueError
        return None, Problem(entry["name"], "is malformed: " + str(exc).removeprefix(f"{path}: "))
    problem = tensors_problem(entry, reader, m)
    return (None, problem) if problem else (reader, None)


def _expected(rows: int, m: dict) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    d = m["d_model"]
    encoded = encoding.is_encoded(m["dtype"])
    dtype = encoding.CODE_DTYPE if encoded else STORED_DTYPES[m["dtype"]]
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {layer_key(L): (dtype, (rows, d)) for L in m["layers"]}
    if encoded:  # FORMAT.md 2.1: each layer's codes come with a float32 scale per row and one per column
        for L in m["layers"]:
            out[encoding.row_scale_key(L)] = (encoding.SCALE_DTYPE, (rows,))
            out[encoding.col_scale_key(L)] = (encoding.SCALE_DTYPE, (d,))
    out.update({name: (dt, (rows,)) for name, dt in TOKEN_FIELDS.items()})
    for L in m["layers"]:
        k_sum, k_sq, k_norm = stat_keys(L)
        out.update({k_sum: (torch.float64, (d,)), k_sq: (torch.float64, ()), k_norm: (torch.float64, ())})
    return out


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensors_problem(entry: dict, reader: shardio.ShardReader, m: dict) -> Problem | None:
    """Check 5: every tensor the format names, with the manifest's dtype and shape (extra ones are
    ignored, as unknown manifest keys are)."""
    rows = entry["rows"]
    for name, (dtype, shape) in _expected(rows, m).items():
        got = reader.spec(name)
        if got is None:
            return Problem(entry["name"], f"has no tensor '{name}'")
        if got[0] != dtype:
            return Problem(entry["name"], f"has tensor '{name}' in {_name(got[0])}, where the manifest and the format "
                                          f"say {_name(dtype)}")
        if got[1] != shape:
            if len(got[1]) == len(shape) and shape and got[1][1:] == shape[1:]:
                return Problem(entry["name"], f"has tensor '{name}' of {got[1][0]} rows, where the manifest says "
                                              f"{rows} rows")
            return Problem(entry["name"], f"has tensor '{name}' of shape {list(got[1])}, where the manifest says "
                                          f"{list(shape)}")
    return None


def read_sums(entry: dict, reader: shardio.ShardReader, m: dict) -> tuple[dict[int, ShardSums], Problem | None]:
    """Check 6: the shard's float64 sums per layer (tensors already checked), and whether they are finite."""
    out: dict[int, ShardSums] = {}
    for L in m["layers"]:
        k_sum, k_sq, k_norm = stat_keys(L)
        sums = ShardSums(reader.get(k_sum).numpy().copy(), float(reader.get(k_sq)), float(reader.get(k_norm)))
        if not (np.isfinite(sums.sum).all() and np.isfinite(sums.sumsq) and np.isfinite(sums.sumnorm)):
            return out, Problem(entry["name"], f"has non-finite statistics for layer {L} (NaN or inf values)")
        out[L] = sums
    return out, None


# ---- 7. finite activations ------------------------------------------------------------------------------
def count_non_finite(t: torch.Tensor) -> int:
    """NaN and inf values in `t` (a CPU float tensor, typically a view of a mapped shard), with numpy in
    blocks into reused buffers: no torch thread pool on the caller's thread, no copy of a whole layer."""
    flat = t.reshape(-1)
    mask = _EXPONENT_MASK.get(t.dtype)
    return _count_array(flat.view(torch.int16).numpy().view(np.uint16) if mask is not None else flat.numpy(), mask)


def _count_array(arr: np.ndarray, mask: int | None) -> int:
    """arr: float32 values, or the raw bits (uint16) of 16-bit floats whose exponent bits are `mask`."""
    n = min(_FINITE_BLOCK_ELEMENTS, arr.size)
    ok, bits = np.empty(n, dtype=bool), np.empty(n if mask is not None else 0, dtype=np.uint16)
    bad = 0
    for a in range(0, arr.size, _FINITE_BLOCK_ELEMENTS):
        block = arr[a:a + _FINITE_BLOCK_ELEMENTS]
        fine = ok[:block.size]
        if mask is not None:
            np.bitwise_and(block, np.uint16(mask), out=bits[:block.size])
            np.not_equal(bits[:block.size], np.uint16(mask), out=fine)
        else:
            np.isfinite(block, out=fine)
        if not fine.all():
            bad += block.size - int(np.count_nonzero(fine))
    return bad


def _fill(f: io.FileIO, view: memoryview) -> int:
    """Read until `view` is full or the file ends (so every block but the last is whole)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _hash_and_count(path: Path, reader: StShard, layers: list[int]) -> tuple[str, dict[int, int]]:
    """One read of a safetensors shard: its xxh3 (the bytes checksum.hash_file hashes) and each layer's
    non-finite values, counted in the same blocks while they are in the CPU's cache. Mapping the file
    instead would cost a page fault per 4 KiB (half of verify's time, measured)."""
    spans = []
    for L in layers:
        dtype, _shape, begin, end = reader.entries[layer_key(L)]
        spans.append((L, _EXPONENT_MASK.get(dtype), begin, end))
    h, buf = xxhash.xxh3_64(), bytearray(_HASH_BLOCK)
    view, raw = memoryview(buf), np.frombuffer(buf, dtype=np.uint8)
    bad = dict.fromkeys(layers, 0)
    pos = 0
    with open(path, "rb", buffering=0) as f:
        while n := _fill(f, view):
            h.update(view[:n])
            for L, mask, begin, end in spans:  # blocks start at multiples of 8 MiB: element-aligned
                lo, hi = max(begin, pos), min(end, pos + n)
                if lo < hi:
                    chunk = raw[lo - pos:hi - pos]
                    bad[L] += _count_array(chunk.view(np.uint16) if mask is not None else chunk.view(np.float32), mask)
            pos += n
    return h.hexdigest(), bad


def layer_problem(name: str, split: str, layer: int, reader: shardio.ShardReader, start: int,
                  stop: int) -> Problem | None:
    """Check 7 for rows [start, stop) of one layer of shard `name` (tensors already checked), read in
    blocks of rows (views of the map for safetensors). An 8-bit layer's codes are integers, always finite:
    its decoded values are finite when its row scales [start, stop) and its column scales are."""
    spec = reader.spec(layer_key(layer))
    if spec is not None and spec[0] == encoding.CODE_DTYPE:
        bad = (count_non_finite(reader.get(encoding.row_scale_key(layer), start, stop))
               + count_non_finite(reader.get(encoding.col_scale_key(layer))))
        return non_finite_problem(name, split, layer, bad) if bad else None
    width = spec[1][-1] if spec is not None and spec[1] else 1
    block = max(1, _FINITE_BLOCK_ELEMENTS // max(1, width))
    bad = sum(count_non_finite(reader.get(layer_key(layer), a, min(stop, a + block)))
              for a in range(start, stop, block))
    return non_finite_problem(name, split, layer, bad) if bad else None


def non_finite_problem(name: str, split: str, layer: int, bad: int) -> Problem:
    return Problem(name, f"holds {bad} non-finite values (NaN or inf) in split {split}, layer {layer}: no SAE "
                         "can train or be measured on them")


# ---- 8. statistics of each split -------------------------------------------------------------------------
def stats_problems(m: dict, sums: dict[str, list[dict[int, ShardSums]]]) -> list[Problem]:
    """The manifest's statistics against its shards' sums (per split, in shard order)."""
    problems = []
    for split in SPLITS:
        entries = m["shards"][split]
        if not entries:
            continue
        totals = SplitStats(m["layers"], m["d_model"])
        for entry, per_layer in zip(entries, sums[split], strict=True):
            totals.add(entry["rows"], per_layer)
        for key, want in totals.to_manifest().items():
            got = m["stats"][split][key]
            scale = abs(want["mean_norm"])
            for field in ("mean", "mean_sq_norm", "mean_norm"):
                a, b = np.asarray(got[field], dtype=np.float64), np.asarray(want[field], dtype=np.float64)
                tol = _STATS_RTOL * (scale if field == "mean" else np.abs(b)) + 1e-300
                if not (np.abs(a - b) <= tol).all():
                    problems.append(Problem(MANIFEST, f"stats.{split}.{key}.{field} does not match the sums stored "
                                                      "in its shards (the manifest was edited or is of another cache)"))
                    break
    return problems


def shard_problem(folder: Path, entry: dict, split: str, m: dict, *, checksum: bool,
                  values: bool) -> tuple[dict[int, ShardSums] | None, Problem | None]:
    """Checks 2-7 of one shard (3 with `checksum`, 7 with `values`): (its sums, None) or (None, problem)."""
    problem = size_problem(folder, entry)
    if problem:
        return None, problem
    if checksum and values and m["backend"] == "safetensors":
        return _verify_safetensors(folder, entry, split, m)
    problem = checksum_problem(folder, entry) if checksum else None
    if problem:
        return None, problem
    return content_problem(folder, entry, split, m, values=values)


def _verify_safetensors(folder: Path, entry: dict, split: str,
                        m: dict) -> tuple[dict[int, ShardSums] | None, Problem | None]:
    """Checks 3-7 with one read of the file: the header first (it says where the layers are), then the
    bytes hashed and decoded together; problems are reported in the order of the list all the same."""
    reader, problem = open_checked(folder, entry, m)
    if reader is None:
        return None, checksum_problem(folder, entry) or problem
    assert isinstance(reader, StShard)
    # An 8-bit shard's scales are checked from the map after the hash (a few floats per row): its codes
    # need no decoding to be finite, and the scales' offsets need not be float-aligned in the file.
    encoded = encoding.is_encoded(m["dtype"])
    try:
        digest, bad = _hash_and_count(folder / entry["name"], reader, [] if encoded else m["layers"])
    except OSError as exc:
        return None, Problem(entry["name"], f"cannot be read ({exc})")
    problem = _mismatch(entry, digest)
    if problem:
        return None, problem
    sums, problem = read_sums(entry, reader, m)
    for L in m["layers"]:
        if problem:
            break
        if encoded:
            problem = layer_problem(entry["name"], split, L, reader, 0, entry["rows"])
        elif bad[L]:
            problem = non_finite_problem(entry["name"], split, L, bad[L])
    return (None, problem) if problem else (sums, None)


def content_problem(folder: Path, entry: dict, split: str, m: dict, *,
                    values: bool) -> tuple[dict[int, ShardSums] | None, Problem | None]:
    """Checks 4-7 of one shard (7 with `values`)."""
    reader, problem = open_checked(folder, entry, m)
    if reader is None:
        return None, problem
    sums, problem = read_sums(entry, reader, m)
    if problem is None and values:
        for L in m["layers"]:
            problem = layer_problem(entry["name"], split, L, reader, 0, entry["rows"])
            if problem:
                break
    return (None, problem) if problem else (sums, None)


def check_for_reading(folder: Path, m: dict) -> None:
    """What a reader checks when it opens a cache (1 was done by manifest.load; 2, 4-6 and 8); raises the
    first problem as a one-line error. A shard whose structure is wrong is hashed too, so that a flipped
    byte is reported as the damage it is (the answer `verify` gives) rather than as its symptom."""
    sums: dict[str, list[dict[int, ShardSums]]] = {}
    for split in SPLITS:
        sums[split] = []
        for entry in m["shards"][split]:
            problem = size_problem(folder, entry)
            if problem is not None:
                raise reader_error(folder, problem)
            got, problem = content_problem(folder, entry, split, m, values=False)
            if problem is not None:
                raise reader_error(folder, checksum_problem(folder, entry) or problem)
            assert got is not None
            sums[split].append(got)
    problems = stats_problems(m, sums)
    if problems:  # the manifest, or a shard whose sums were altered: only the checksums can tell
        for split in SPLITS:
            for entry in m["shards"][split]:
                damaged = checksum_problem(folder, entry)
                if damaged:
                    raise reader_error(folder, damaged)
        raise reader_error(folder, problems[0])
