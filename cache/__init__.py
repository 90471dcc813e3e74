"""The activation cache: sharded, per-layer, memory-mappable; see cache/FORMAT.md.

Owners: `names` (every file, tensor and metadata name of the format), `folder` (every decision about a
cache folder: create, continue, replace, refuse, remove; harvest only asks it), `writer` and `reader`,
`merge` (a distributed harvest's rank caches into one), `validity` (what makes a cache valid: the
checks `verify` reports and every reader makes), `verify`; durable writes go through the
`durable` package.

    import cache
    c = cache.open("cache/minilm")           # refuses incomplete caches
    x = c.read("train", 0, 3)                # [n, d_model] view of layer 3, shard 0
"""

from .names import FORMAT_VERSION
from .reader import Cache, ShardInfo, open_cache
from .stats import LayerStats
from .validity import DamagedShardError, NonFiniteValuesError
from .verify import NotACacheError, VerifyReport, verify, verify_report
from .writer import CacheWriter

open = open_cache  # noqa: A001 - `cache.open(path)` is the documented entry point

__all__ = [
    "FORMAT_VERSION",
    "Cache",
    "CacheWriter",
    "DamagedShardError",
    "LayerStats",
    "NonFiniteValuesError",
    "NotACacheError",
    "ShardInfo",
    "VerifyReport",
    "open",
    "open_cache",
    "verify",
    "verify_report",
]
