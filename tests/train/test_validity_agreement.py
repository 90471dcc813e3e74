"""`cache verify` and training agree on every damaged cache (issue 17): many seeded single-field edits
of manifest.json and single-bit flips of its bytes and of the shards' bytes; for each, either both
accept the cache or both refuse it naming the same file.

The cache has one layer, which the run trains on, and is small enough that the run maps every shard
(its shuffle buffer holds the whole train split; the held-out summary reads the whole held-out split),
so training reads every byte verify reads. An incomplete cache is a warning to verify (a harvest may be
running) and a refusal to readers: here that warning counts as verify's refusal of manifest.json.
"""

from __future__ import annotations

import copy
import json
import random
import re
import shutil
from pathlib import Path

import pytest

import cache
from cache.names import MANIFEST
from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import tiny_config
from train.run import train, user_errors

SEED = 17
N_EDITS, N_MANIFEST_FLIPS, N_SHARD_FLIPS = 24, 8, 16
_FILE = re.compile(r"(manifest\.json|(?:train|heldout)-\d{6}\.safetensors)")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("agree") / "c"
    write_cache(path, content="sparse", d_model=8, n_train=320, n_heldout=96, layers=(2,), shard_rows=100,
                seq_len=16, window_seqs=2)
    return path


def _leaves(obj: object, path: tuple = ()) -> list[tuple]:
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in _leaves(v, (*path, k))] + ([path] if path else [])
    if isinstance(obj, list):
        return [leaf for i, v in enumerate(obj) for leaf in _leaves(v, (*path, i))] + ([path] if path else [])
    return [path]


def _mutate(value: object, rng: random.Random) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice([value + 1, value - 1, 0, -1, value * 2 + 1])
    if isinstance(value, float):
        return rng.choice([value * 1.5, value + 1.0, -value, 0.0])
    if isinstance(value, str):
        return rng.choice([value + "x", value[:-1], "", "0" * len(value)])
    if value is None:
        return rng.choice([0, "x", []])
    if isinstance(value, list):
        return rng.choice([value[:-1], [*value, value[-1] if value else 0], {}])
    return rng.choice([[], None, "x"])  # an object replaced by something else


# Valid values of another kind: the manifest stays valid, the shards no longer match it.
FIXED_EDITS = [(("dtype",), "bfloat16"), (("dtype",), "float16"), (("shards", "train", 1, "bytes"), 10),
               (("shards", "heldout", 0, "xxh3"), "0" * 16)]


def _edit(m: dict, path: tuple, rng: random.Random, value: object = None) -> str:
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if value is not None:
        parent[key] = value
    elif isinstance(parent, dict) and rng.random() < 0.2:
        del parent[key]
        return f"delete {'.'.join(map(str, path))}"
    else:
        parent[key] = _mutate(parent[key], rng)
    return f"set {'.'.join(map(str, path))} = {parent[key]!r}"[:120]


def _cases(pristine: Path) -> list[tuple[str, object]]:
    """(description, how to damage a copy): edits, manifest flips, shard flips; all seeded."""
    rng = random.Random(SEED)
    manifest = json.loads((pristine / MANIFEST).read_bytes())
    leaves = _leaves(manifest)
    cases: list[tuple[str, object]] = [("edit", (path, 0.0, value)) for path, value in FIXED_EDITS]
    for _ in range(N_EDITS):  # a top-level key, then any field under it: every key gets its turn
        top = rng.choice(sorted(manifest))
        path = rng.choice([leaf for leaf in leaves if leaf[0] == top])
        cases.append(("edit", (path, rng.random(), None)))
    size = (pristine / MANIFEST).stat().st_size
    cases += [("flip", (MANIFEST, rng.randrange(size), rng.randrange(8))) for _ in range(N_MANIFEST_FLIPS)]
    shards = sorted(p.name for p in pristine.glob("*.safetensors"))
    for _ in range(N_SHARD_FLIPS):
        name = rng.choice(shards)
        at = rng.randrange(300) if rng.random() < 0.4 else rng.randrange((pristine / name).stat().st_size)
        cases.append(("flip", (name, at, rng.randrange(8))))  # 40% in the first 300 bytes: the header
    return cases


def _damage(folder: Path, kind: str, arg: object) -> str:
    if kind == "edit":
        path, r, value = arg  # type: ignore[misc]
        m = json.loads((folder / MANIFEST).read_bytes())
        what = _edit(m, path, random.Random(r), value)
        (folder / MANIFEST).write_text(json.dumps(m))
        return what
    name, at, bit = arg  # type: ignore[misc]
    raw = bytearray((folder / name).read_bytes())
    raw[at] ^= 1 << bit
    (folder / name).write_bytes(bytes(raw))
    return f"flip bit {bit} of byte {at} of {name}"


def _verify_verdict(folder: Path) -> set[str]:
    """The files verify refuses (empty: accepted)."""
    try:
        report = cache.verify_report(folder)
    except cache.NotACacheError:
        return {MANIFEST}
    named = {_FILE.search(p).group(1) if _FILE.search(p) else MANIFEST for p in report.problems}
    if any("incomplete" in w for w in report.warnings):
        named.add(MANIFEST)
    return named


def _train_verdict(folder: Path, out: Path) -> str | None:
    """The file training names when it refuses the cache (None: it trained and measured)."""
    cfg = tiny_config(folder, out, steps=2, batch_size=64, **{"model.latent_size": 16})
    try:
        train(cfg, say=lambda msg: None)
    except user_errors() as e:
        found = _FILE.search(str(e))
        return found.group(1) if found else f"(no file named: {e})"
    return None


def test_verify_and_training_agree_on_every_damaged_cache(pristine, tmp_path):
    assert _verify_verdict(pristine) == set() and _train_verdict(pristine, tmp_path / "ok") is None
    disagreements, refused = [], 0
    for i, (kind, arg) in enumerate(_cases(pristine)):
        folder = tmp_path / f"case-{i}"
        shutil.copytree(pristine, folder)
        what = _damage(folder, kind, copy.deepcopy(arg))
        by_verify, by_training = _verify_verdict(folder), _train_verdict(folder, tmp_path / f"runs-{i}")
        refused += by_training is not None
        agree = (not by_verify and by_training is None) or (by_training in by_verify)
        if not agree:
            disagreements.append(f"{what}: verify {sorted(by_verify) or 'ok'}, training {by_training or 'ok'}")
        shutil.rmtree(folder)
    assert not disagreements, "\n".join(disagreements)
    assert refused >= len(_cases(pristine)) // 2  # the cases do damage: most are refused
