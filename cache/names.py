"""Every file name, tensor name and enumerated value of the cache format, in one place.

FORMAT.md is the normative description; this module is its executable twin.
"""

from __future__ import annotations

import re

import torch

import durable

FORMAT_VERSION = 2  # the newest version this package reads and writes (FORMAT.md)
# Version 2 adds the 8-bit dtypes (cache/encoding.py). A cache of a version-1 dtype is still written as
# version 1, so that readers of version 1 go on reading every cache they could read before.
FLOAT_FORMAT_VERSION = 1
READABLE_FORMAT_VERSIONS: tuple[int, ...] = (1, 2)
MANIFEST = "manifest.json"
TMP_PREFIX = durable.TMP_PREFIX  # temporaries of the durable writes
TRAIN, HELDOUT = "train", "heldout"
MERGE_PLAN = "merge-plan.json"  # a distributed harvest's merge in progress (cache/merge.py)
DISTRIBUTED_KEY = "distributed"  # manifest metadata of a distributed harvest's caches (rank, world size)
RANK_RE = re.compile(r"^rank-(\d+)$")  # `rank-<r>/`: rank r's own cache during a distributed harvest
SPLITS: tuple[str, ...] = (TRAIN, HELDOUT)
BACKENDS: tuple[str, ...] = ("safetensors", "zarr")
SHARD_SUFFIX = {"safetensors": ".safetensors", "zarr": ".zarr"}

ZARR_COMPRESSIONS: tuple[str, ...] = ("zstd", "blosc", "gzip")

STORED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}



def format_version_for(dtype: str) -> int:
    """format_version a new cache of stored dtype `dtype` is written with."""
    return FLOAT_FORMAT_VERSION if dtype in STORED_DTYPES else FORMAT_VERSION


# Row-metadata tensors stored beside the activations: name -> dtype.
TOKEN_FIELDS: dict[str, torch.dtype] = {
    "token_ids": torch.int32,
    "sequence": torch.int64,
    "position": torch.int32,
    "document": torch.int64,
}

_SHARD_RE = re.compile(r"^(train|heldout)-(\d{6})\.(safetensors|zarr)$")


def shard_name(split: str, index: int, backend: str) -> str:
    """File (safetensors) or folder (zarr) name of shard `index` of `split`."""
    return f"{split}-{index:06d}{SHARD_SUFFIX[backend]}"


def parse_shard_name(name: str) -> tuple[str, int, str] | None:
    """(split, index, backend) for a shard name, None for any other name."""
    m = _SHARD_RE.match(name)
    if m is None:
        return None
    backend = "safetensors" if m.group(3) == "safetensors" else "zarr"
    return m.group(1), int(m.group(2)), backend


def tmp_name(name: str) -> str:
    """Temporary name under which `name` is written before its atomic rename."""
    return TMP_PREFIX + name


def is_cache_file(name: str) -> bool:
    """True for names a cache owns (manifest, shards, temporaries); only these are ever deleted."""
    return name == MANIFEST or name.startswith(TMP_PREFIX) or parse_shard_name(name) is not None


def rank_folder_name(rank: int) -> str:
    return f"rank-{rank}"


def layer_key(layer: int) -> str:
    return f"layer.{layer}"


def stat_keys(layer: int) -> tuple[str, str, str]:
    """Names of the per-shard float64 sums: sum over rows [d], sum of squared norms [], sum of norms []."""
    return f"stats.{layer}.sum", f"stats.{layer}.sumsq", f"stats.{layer}.sumnorm"


def check_compression(name: str | None) -> None:
    if name is not None and name not in ZARR_COMPRESSIONS:
        raise ValueError(f"zarr_compression must be None or one of {ZARR_COMPRESSIONS}, got {name!r}")
