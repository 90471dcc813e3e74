"""open_cache / Cache: validated manifest, memory-mapped shard reads, statistics."""

from __future__ import annotations

import math
import operator
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import encoding, shardio, validity
from . import manifest as manifest_mod
from .names import MANIFEST, SPLITS, STORED_DTYPES, TOKEN_FIELDS, layer_key
from .st_backend import StShard
from .stats import LayerStats, from_manifest
from .validity import DamagedShardError, NonFiniteValuesError


def _index(value: Any) -> int | None:
    """value as an int if it is an integer (Python or numpy), else None; bools are not indices."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


# Open shard maps kept at once: each mapping holds a file descriptor, and a cache can have
# thousands of shards. A shard evicted here stays mapped while a tensor still views it.
MAX_OPEN_SHARDS = 64


@dataclass(frozen=True)
class ShardInfo:
    name: str
    rows: int
    bytes: int
    xxh3: str
    index: int
    split: str
    end: tuple[int, int]


class Cache:
    """A validated, read-only cache folder. Use open_cache() to get one.

    `verify_reads`: hash each shard (xxh3, its manifest checksum) the first time this object maps it,
    and check each layer's values for NaN and inf the first time it is read, in the thread that reads
    it (the training loader's background thread); raise DamagedShardError (NonFiniteValuesError) naming
    the shard. Off by default; training and evaluation turn it on (`training.verify_reads`). The rest
    of what makes a cache valid (cache/validity.py) is checked by open_cache, whatever this flag."""

    def __init__(self, path: Path, manifest: dict, manifest_bytes: bytes | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self._manifest_bytes = manifest_bytes  # as read at open: `changed()` compares against it
        self.identity: dict = manifest["identity"]
        self.metadata: dict = manifest["metadata"]
        self.layers: list[int] = list(manifest["layers"])
        self.d_model: int = manifest["d_model"]
        # An 8-bit cache stores codes and scales (cache/encoding.py); `dtype` is what read() returns.
        self.encoded: bool = encoding.is_encoded(manifest["dtype"])
        self.dtype: torch.dtype = encoding.DECODED_DTYPE if self.encoded else STORED_DTYPES[manifest["dtype"]]
        self.backend: str = manifest["backend"]
        self.splits: list[str] = list(SPLITS)
        self.complete: bool = manifest["complete"]
        self.shard_rows: int = manifest["shard_rows"]
        self._shards = {s: [ShardInfo(e["name"], e["rows"], e["bytes"], e["xxh3"], i, s, tuple(e["end"]))
                            for i, e in enumerate(manifest["shards"][s])] for s in SPLITS}
        self._open: OrderedDict[tuple[str, int], shardio.ShardReader] = OrderedDict()
        self._lock = threading.Lock()
        self.verify_reads = False
        self._verified: set[tuple[str, int]] = set()  # shards hashed once: an evicted map reopens unhashed
        self._finite: set[tuple[str, int, int]] = set()  # (split, shard, layer) whose values were checked

    def __repr__(self) -> str:
        rows = ", ".join(f"{s}={self.num_rows(s)}" for s in SPLITS)
        return f"Cache({str(self.path)!r}, layers={self.layers}, d_model={self.d_model}, {rows})"

    # ---- structure ----------------------------------------------------------------------------
    def _split(self, split: str) -> str:
        if split not in self._shards:
            raise ValueError(f"split must be one of {self.splits}, got {split!r}")
        return split

    def num_rows(self, split: str) -> int:
        return self.manifest["rows"][self._split(split)]

    def shards(self, split: str) -> list[ShardInfo]:
        return list(self._shards[self._split(split)])

    def size_on_disk(self) -> int:
        """Bytes of the manifest plus every listed shard."""
        shard_bytes = sum(info.bytes for s in SPLITS for info in self._shards[s])
        return (self.path / MANIFEST).stat().st_size + shard_bytes

    # ---- reading ------------------------------------------------------------------------------
    def _shard(self, split: str, shard: int) -> tuple[ShardInfo, shardio.ShardReader]:
        infos = self._shards[self._split(split)]
        index = _index(shard)
        if index is None or not 0 <= index < len(infos):
            raise ValueError(f"shard must be an int in [0, {len(infos)}) for split {split!r}, got {shard!r}")
        shard = index
        info = infos[shard]
        with self._lock:
            reader = self._open.pop((split, shard), None)
            if reader is None:
                if self.verify_reads and (split, shard) not in self._verified:
                    self._verify(info)
                    self._verified.add((split, shard))
                reader = shardio.open_shard(self.path / info.name, self.backend)
                self._check_shard(info, reader)
            self._open[(split, shard)] = reader
            while len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        return info, reader

    def _entry(self, info: ShardInfo) -> dict:
        return self.manifest["shards"][info.split][info.index]

    def _verify(self, info: ShardInfo) -> None:
        problem = validity.size_problem(self.path, self._entry(info)) or \
            validity.checksum_problem(self.path, self._entry(info))
        if problem is not None:
            raise DamagedShardError(f"shard {info.name} of {self.path} {problem.what}; {validity.fix_hint(self.path)}"
                                    ", or set training.verify_reads=false to read it anyway")

    def _check_shard(self, info: ShardInfo, reader: shardio.ShardReader) -> None:
        """The shard's tensors against the manifest, again: open_cache checked them, but a map is
        reopened after an eviction and the file must still be the one checked."""
        problem = validity.tensors_problem(self._entry(info), reader, self.manifest)
        if problem is not None:
            raise validity.reader_error(self.path, problem)

    def _check_finite(self, info: ShardInfo, reader: shardio.ShardReader, layer: int, start: int, stop: int) -> None:
        """verify_reads: NaN or inf in the rows read stop the reader, naming shard, split and layer. A mapped
        layer is checked whole, once (a view: no read beyond the page cache); other backends copy what they
        read, so their rows are checked as read."""
        key = (info.split, info.index, layer)
        if key in self._finite:
            return
        if isinstance(reader, StShard):
            start, stop = 0, info.rows
        problem = validity.layer_problem(info.name, info.split, layer, reader, start, stop)
        if problem is not None:
            raise NonFiniteValuesError(f"shard {info.name} of {self.path} {problem.what}; "
                                       f"{validity.fix_hint(self.path)}")
        if (start, stop) == (0, info.rows):
            self._finite.add(key)

    def _rows(self, info: ShardInfo, start: int, stop: int | None) -> tuple[int, int]:
        a, b = _index(start), _index(info.rows if stop is None else stop)
        if a is None or b is None or not 0 <= a <= b <= info.rows:
            raise ValueError(f"rows [{start}, {stop}) out of range for shard {info.name} with {info.rows} rows")
        return a, b

    def _layer(self, layer: object) -> int:
        value = _index(layer)
        if value is None or value not in self.layers:
            raise ValueError(f"layer {layer!r} is not in this cache; its layers are {self.layers}")
        return value

    def read(self, split: str, shard: int, layers: int | list[int], start: int = 0,
             stop: int | None = None) -> torch.Tensor:
        """Activations of rows [start, stop) of one shard.

        One layer -> [n, d_model] (safetensors: a zero-copy view of the memory map; READ-ONLY, writing
        to it crashes the process). A list of layers -> [n, len(layers), d_model], a copy, in list order.
        An 8-bit cache gives the decoded float32 values (a copy; cache/encoding.py).
        """
        single = not isinstance(layers, list | tuple)
        wanted = [self._layer(x) for x in layers] if isinstance(layers, list | tuple) else [self._layer(layers)]
        if not wanted:
            raise ValueError("layers must name at least one layer")
        info, reader = self._shard(split, shard)
        start, stop = self._rows(info, start, stop)
        if self.verify_reads:
            for L in wanted:
                self._check_finite(info, reader, L, start, stop)
        if self.encoded:
            got = [encoding.decode(*self._codes(reader, L, start, stop)) for L in wanted]
            return got[0] if single else torch.stack(got, dim=1)
        if single:
            return reader.get(layer_key(wanted[0]), start, stop)
        return torch.stack([reader.get(layer_key(L), start, stop) for L in wanted], dim=1)

    @staticmethod
    def _codes(reader: shardio.ShardReader, layer: int, start: int | None,
               stop: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (reader.get(layer_key(layer), start, stop), reader.get(encoding.row_scale_key(layer), start, stop),
                reader.get(encoding.col_scale_key(layer)))

    def read_encoded(self, split: str, shard: int, layer: int, start: int = 0,
                     stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An 8-bit cache's stored form of rows [start, stop) of one layer: codes int8 [n, d_model], row
        scales float32 [n], the shard's column scales float32 [d_model] (safetensors: zero-copy, READ-ONLY
        views). encoding.decode(*read_encoded(...)) is read(...)."""
        if not self.encoded:
            raise ValueError(f"cache {self.path} stores {self.manifest['dtype']}, not an 8-bit dtype; use read()")
        info, reader = self._shard(split, shard)
        start, stop = self._rows(info, start, stop)
        layer = self._layer(layer)
        if self.verify_reads:
            self._check_finite(info, reader, layer, start, stop)
        return self._codes(reader, layer, start, stop)

    def iter_rows(self, split: str, layers: int | list[int], batch_size: int,
                  max_rows: int | None = None) -> Iterator[torch.Tensor]:
        """The first `max_rows` rows of `split` (all by default) in stored order, `batch_size` at a time
        (batches do not cross shards): [b, d_model] for one layer, [b, len(layers), d_model] for a list."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        left = self.num_rows(split) if max_rows is None else min(max_rows, self.num_rows(split))
        for info in self.shards(split):
            for start in range(0, info.rows, batch_size):
                if left <= 0:
                    return
                stop = min(info.rows, start + batch_size, start + left)
                left -= stop - start
                yield self.read(split, info.index, layers, start, stop)

    def read_tokens(self, split: str, shard: int, start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor]:
        """token_ids int32 [n], sequence int64 [n], position int32 [n], document int64 [n] (read-only)."""
        info, reader = self._shard(split, shard)
        start, stop = self._rows(info, start, stop)
        return {name: reader.get(name, start, stop) for name in TOKEN_FIELDS}

    # ---- statistics ---------------------------------------------------------------------------
    def stats(self, split: str, layer: int) -> LayerStats:
        """count, mean (np.float64 [d_model]), mean_sq_norm, mean_norm of the stored values."""
        entry = self.manifest["stats"][self._split(split)][str(self._layer(layer))]
        try:
            return from_manifest(entry)
        except ValueError as exc:
            raise ValueError(f"split {split!r} of {self.path}: {exc}") from None

    def norm_scale(self, layer: int) -> float:
        """sqrt(d_model) / mean norm on the train split: scales activations to mean norm sqrt(d)."""
        mean_norm = self.stats("train", layer).mean_norm
        if mean_norm <= 0:
            raise ValueError(f"layer {layer} has mean norm {mean_norm} on train; cannot normalise")
        return math.sqrt(self.d_model) / mean_norm

    def changed(self) -> str | None:
        """Why the cache on disk is no longer the one opened (its manifest rewritten or gone), or None.
        A reader holding the cache's shared lock never sees this; a writer on another host of a
        filesystem without shared locks, or one that ignored the lock, can cause it."""
        if self._manifest_bytes is None:
            return None
        try:
            now = (self.path / MANIFEST).read_bytes()
        except OSError:
            return f"its {MANIFEST} is gone"
        if now != self._manifest_bytes:
            return f"its {MANIFEST} was rewritten (overwritten, extended or resumed by a harvest)"
        return None

    def non_finite(self, split: str, layers: int | list[int]) -> NonFiniteValuesError | None:
        """The error for the first NaN or inf among `layers` of `split` (every shard read), or None: what
        a run that trusted the bytes (verify_reads off) asks when its loss went non-finite."""
        wanted = [self._layer(x) for x in (layers if isinstance(layers, list | tuple) else [layers])]
        for info in self.shards(split):
            _info, reader = self._shard(split, info.index)
            for L in wanted:
                problem = validity.layer_problem(info.name, split, L, reader, 0, info.rows)
                if problem is not None:
                    return NonFiniteValuesError(f"shard {info.name} of {self.path} {problem.what}; "
                                                f"{validity.fix_hint(self.path)}")
        return None

    def close(self) -> None:
        """Drop the open shard maps (tensors already returned keep their own map alive)."""
        with self._lock:
            self._open.clear()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_cache(path: str | Path, allow_incomplete: bool = False) -> Cache:
    """Open and validate a cache folder: the manifest, then every shard's presence, size, tensors and
    statistics, then the manifest's statistics against the shards' (cache/validity.py; no hashing)."""
    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a cache: no {MANIFEST}; run make harvest to create it")
    before = (folder / MANIFEST).read_bytes()
    m = manifest_mod.load(folder)
    n_shards = sum(len(m["shards"][s]) for s in SPLITS)
    if not m["complete"] and not allow_incomplete:
        raise ValueError(f"cache at {folder} is incomplete: {n_shards} shards ({MANIFEST} says complete: false, as "
                         "while a harvest runs or after it stopped); rerun make harvest to finish it")
    validity.check_for_reading(folder, m)
    return Cache(folder, m, before)


