"""The training rows an SAE calibrates its inference state on after training (`BaseSAE.calibrate`).

What calibration does is the SAE's own business (BatchTopK and Matryoshka set their threshold from
the final weights); this module only chooses the rows: `n_batches` batches of `batch_size` rows, each
read contiguously from an evenly spaced train shard (harvest has already shuffled rows across many
sequences). Held-out rows are never used. Under torchrun rank 0 calibrates alone, on the rows a single
process would read, so the result equals a 1-process run's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from cache import Cache
from cache.names import TRAIN


def calibration_batches(cache: Cache, layers: int | list[int], *, batch_size: int,
                        device: torch.device | str = "cpu", n_batches: int = 8) -> Iterator[Tensor]:
    """Raw float32 batches [b, d] (routed: [b, L, d]) on `device`, read lazily: an SAE with nothing
    to calibrate reads none."""
    shards = cache.shards(TRAIN)
    picks = sorted({round(i * (len(shards) - 1) / max(1, n_batches - 1)) for i in range(n_batches)})
    for i in picks:
        x = cache.read(TRAIN, i, layers, 0, min(batch_size, shards[i].rows))
        yield x.to(device=device, dtype=torch.float32)
