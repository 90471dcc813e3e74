"""harvest.store_dtype: int8 (issue 14), in one process and as the merge of a distributed harvest's ranks.

The column scales are per shard, so an 8-bit cache's decoded values depend on which rows share a shard:
a 2-process harvest holds the same tokens as a 1-process one but not bit-identical values (each within the
encoding's error of the float32 rows); its merge moves the rank shards unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cache
from cache.merge import merge_ranks
from harvest.distributed import _merged_metadata, window_owner
from harvest.run import harvest
from settings import load_config
from tests.harvest.tiny_models import SENTENCES, save_tiny

LAYERS = [0, 1, 2]
SPLITS = ("train", "heldout")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    model = save_tiny("gpt2", root / "gpt2")
    corpus = root / "docs.jsonl"
    with corpus.open("w") as f:
        for i in range(40):
            body = " ".join(SENTENCES[(i * k) % len(SENTENCES)] for k in (1, 3, 7)[: 1 + i % 3])
            f.write(json.dumps({"id": i, "text": f"Document {i}. {body}"}) + "\n")

    def args(out: Path, *extra: str) -> list[str]:
        return [f"model.language_model_path={model}", f"data.train_path={corpus}", f"harvest.output={out}",
                "data.max_length=32", "data.heldout_fraction=0.2", "harvest.batch_size=2", "harvest.shuffle_window=4",
                "harvest.shard_rows=50", "harvest.max_tokens=600", "harvest.device=cpu", "harvest.dtype=float32",
                *extra]

    harvest(load_config(None, args(root / "f32")), progress=False)
    harvest(load_config(None, args(root / "i8", "harvest.store_dtype=int8")), progress=False)
    return root, args


def _rows(path: Path) -> dict[tuple, tuple[int, torch.Tensor]]:
    out = {}
    with cache.open(path) as c:
        for split in SPLITS:
            for i in range(len(c.shards(split))):
                tok, acts = c.read_tokens(split, i), c.read(split, i, LAYERS)
                for r in range(acts.shape[0]):
                    out[(split, int(tok["sequence"][r]), int(tok["position"][r]))] = (int(tok["token_ids"][r]),
                                                                                         acts[r].clone())
    return out


def _close(a: dict, b: dict, rel: float) -> None:
    """Same tokens; activations within `rel` relative (Frobenius) error per layer."""
    assert a.keys() == b.keys()
    x = torch.stack([a[k][1] for k in sorted(a)]).to(torch.float64)
    y = torch.stack([b[k][1] for k in sorted(a)]).to(torch.float64)
    assert all(a[k][0] == b[k][0] for k in a)
    for j in range(len(LAYERS)):
        err = float(torch.linalg.norm(x[:, j] - y[:, j]) / torch.linalg.norm(y[:, j]))
        assert err < rel, (LAYERS[j], err)


def test_an_int8_harvest_holds_the_float32_rows_within_the_encodings_error(setup):
    root, _ = setup
    m = json.loads((root / "i8" / "manifest.json").read_text())
    assert m["dtype"] == "int8" and m["format_version"] == 2 and m["identity"]["store_dtype"] == "int8"
    assert m["identity"]["compute_dtype"] == "float32"
    _close(_rows(root / "i8"), _rows(root / "f32"), rel=0.012)


def test_rerunning_an_int8_harvest_is_up_to_date(setup):
    root, args = setup
    before = (root / "i8" / "manifest.json").read_bytes()
    s = harvest(load_config(None, args(root / "i8", "harvest.store_dtype=int8")), progress=False)
    assert s.status == "up to date" and (root / "i8" / "manifest.json").read_bytes() == before


def test_the_merge_of_int8_rank_caches(setup):
    root, args = setup
    out = root / "two"
    for r in range(2):
        harvest(load_config(None, args(out / f"rank-{r}", "harvest.store_dtype=int8")), progress=False,
                owns=window_owner(r, 2, 4), extra_metadata={"distributed": {"rank": r, "world_size": 2}})
    ranks = {}
    for r in range(2):
        ranks.update(_rows(out / f"rank-{r}"))
    merge_ranks(out, 2, _merged_metadata(out, 2))
    merged = _rows(out)
    # The merge moves shards: every row bit for bit as its rank wrote it.
    assert merged.keys() == ranks.keys() and all(torch.equal(merged[k][1], ranks[k][1]) for k in merged)
    _close(merged, _rows(root / "f32"), rel=0.012)
    assert cache.verify(out) == []
    with cache.open(out) as c:
        assert c.manifest["dtype"] == "int8" and c.manifest["format_version"] == 2
        for split in SPLITS:  # statistics re-added from the shards' sums: those of the decoded rows
            rows = torch.cat([c.read(split, i, 1) for i in range(len(c.shards(split)))]).to(torch.float64).numpy()
            st = c.stats(split, 1)
            mean_norm = np.linalg.norm(rows, axis=1).mean()  # FORMAT.md 2: within 1e-6 of it
            assert np.abs(st.mean - rows.mean(0)).max() <= 1e-6 * mean_norm
            np.testing.assert_allclose(st.mean_norm, mean_norm, rtol=1e-6)
