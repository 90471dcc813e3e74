"""The golden cache in tests/data/golden-cache (written once by tests/data/make_golden.py and committed)
must keep opening, verifying and reading back the same values as the code changes."""

from __future__ import annotations

import torch

import cache
from tests.data.make_golden import CACHE, LAYERS, ROWS, SHARD_ROWS, golden_tokens, golden_value


def test_the_golden_cache_still_opens_verifies_and_reads_the_same_values():
    assert cache.verify(CACHE) == []
    with cache.open(CACHE) as c:
        assert c.layers == LAYERS and c.d_model == 8 and c.dtype == torch.float32
        for split, n in ROWS.items():
            assert c.num_rows(split) == n
            assert [s.rows for s in c.shards(split)] == [min(SHARD_ROWS, n - i) for i in range(0, n, SHARD_ROWS)]
            for layer in LAYERS:
                got = torch.cat([c.read(split, s.index, layer) for s in c.shards(split)])
                assert torch.equal(got, golden_value(split, torch.arange(n), layer)), (split, layer)
            tokens = [c.read_tokens(split, s.index) for s in c.shards(split)]
            for name, want in golden_tokens(torch.arange(n)).items():
                assert torch.equal(torch.cat([t[name] for t in tokens]).long(), want.long()), name
        # statistics are the train split's, re-added from the shards' float64 sums: the formula's own
        x = golden_value("train", torch.arange(ROWS["train"]), 2).double()
        stats = c.stats("train", 2)
        assert torch.allclose(torch.as_tensor(stats.mean, dtype=torch.float64), x.mean(0), atol=1e-9)
        assert abs(stats.mean_norm - float(x.norm(dim=1).mean())) < 1e-9
