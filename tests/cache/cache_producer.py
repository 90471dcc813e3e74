"""A deterministic stand-in for the harvester, shared by the tests and the kill-test subprocess.

Chunk c of a split has chunk_rows(c) rows generated from a seed, so any row can be regenerated from
its (chunk, offset) cursor; each chunk is appended in two pieces to exercise multi-append chunks.
"""

from __future__ import annotations

import torch

from cache import CacheWriter

LAYERS = [0, 2, 5]
D = 12
SHARD_ROWS = 40
IDENTITY = {"model_id": "tiny-test", "revision": "0", "layers": LAYERS, "seq_len": 16}


def chunk_rows(split: str, chunk: int) -> int:
    return (11 if split == "heldout" else 17) + (chunk * 7) % 13


def make_chunk(split: str, chunk: int) -> dict:
    """All rows of one chunk: acts {layer: float32 [n, D]} and the four token fields [n]."""
    n = chunk_rows(split, chunk)
    g = torch.Generator().manual_seed(chunk * 2 + (split == "heldout"))
    # Layers get different scales and offsets so a mixed-up layer would show in the statistics.
    acts = {L: torch.randn(n, D, generator=g) * (1 + L) + L for L in LAYERS}
    return {
        "acts": acts,
        "token_ids": torch.randint(0, 30000, (n,), generator=g),
        "sequence": torch.full((n,), chunk, dtype=torch.int64),
        "position": torch.arange(n, dtype=torch.int64),
        "document": torch.full((n,), chunk // 2, dtype=torch.int64),
    }


def _piece(data: dict, a: int, b: int) -> dict:
    out = {k: v[a:b] for k, v in data.items() if k != "acts"}
    out["acts"] = {L: t[a:b] for L, t in data["acts"].items()}
    return out


def produce(writer, split: str, n_chunks: int, start: tuple[int, int] = (0, 0)) -> None:
    """Append chunks [start chunk, n_chunks) of `split`, skipping rows before the `start` cursor."""
    for chunk in range(start[0], n_chunks):
        data = make_chunk(split, chunk)
        n = chunk_rows(split, chunk)
        first = start[1] if chunk == start[0] else 0
        cut = max(first, n // 2)
        for a, b in ((first, cut), (cut, n)):
            if b > a:
                writer.append(split, chunk=chunk, offset=a, **_piece(data, a, b))


def all_rows(split: str, n_chunks: int) -> tuple[dict[int, torch.Tensor], list[tuple[int, int]]]:
    """Every row in write order (acts per layer, float32) and each row's (chunk, offset)."""
    chunks = [make_chunk(split, c) for c in range(n_chunks)]
    acts = {L: torch.cat([c["acts"][L] for c in chunks]) for L in LAYERS}
    ids = [(c, o) for c in range(n_chunks) for o in range(chunk_rows(split, c))]
    return acts, ids


def expected_ends(split: str, n_chunks: int, shard_rows: int) -> list[tuple[int, int]]:
    """End cursor of each shard of an uninterrupted write followed by finish()."""
    _, ids = all_rows(split, n_chunks)
    lasts = list(range(shard_rows - 1, len(ids), shard_rows))
    if len(ids) % shard_rows:
        lasts.append(len(ids) - 1)
    return [(ids[i][0], ids[i][1] + 1) for i in lasts]


def new_writer(path, backend: str, dtype: str = "float32", **kw) -> CacheWriter:
    args = dict(layers=LAYERS, d_model=D, dtype=dtype, shard_rows=SHARD_ROWS, identity=IDENTITY,
                metadata={"model": "tiny-test"}, backend=backend)
    args.update(kw)
    return CacheWriter(path, **args)


def write_cache(path, backend: str, n_train: int = 6, n_heldout: int = 2, finish: bool = True, **kw):
    w = new_writer(path, backend, **kw)
    produce(w, "train", n_train)
    produce(w, "heldout", n_heldout)
    if finish:
        w.finish()
    else:
        w.close()
    return path
