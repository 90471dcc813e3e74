"""Setting a batch-level SAE's inference threshold from its final weights.

BatchTopK and Matryoshka (routed or not) keep k * B activations per training batch but infer with
one threshold theta. The running estimate (an EMA of each batch's smallest kept activation) lags:
pre-activations keep shrinking as the SAE trains, so a short run ends with theta well above the
current cut-off (seen on the default cache: theta 1.45 against a cut-off of 1.19, inference L0
15.6 instead of k = 32). After training (on rank 0 under torchrun), theta is therefore set to
the mean cut-off of the final model's own batch-level selection over a few training batches, so
inference keeps about k latents per token on the training distribution. Held-out rows are never used.
"""

from __future__ import annotations

from typing import Any

import torch

from sae import BaseSAE
from train.loop import estimates_threshold, sparse_forward_kwargs


@torch.no_grad()
def calibrate_threshold(model: BaseSAE, cache: Any, layers: int | list[int], *, batch_size: int,
                        device: torch.device | str = "cpu", n_batches: int = 8) -> dict[str, float] | None:
    """Set `model.threshold` to the mean smallest kept activation of `n_batches` training batches
    of `batch_size` rows (each read contiguously from an evenly spaced train shard; harvest has
    already shuffled rows across many sequences). Returns {before, after, batches}, or None for an
    SAE without a batch-level threshold."""
    if not estimates_threshold(model) or not hasattr(model, "threshold"):
        return None
    shards = cache.shards("train")
    picks = sorted({round(i * (len(shards) - 1) / max(1, n_batches - 1)) for i in range(n_batches)})
    was_training = model.training
    model.train()  # the batch-level selection whose cut-off inference should reproduce
    # Under torchrun the training selection is an instance override that gathers across ranks
    # (train/distributed.py); calibration runs on rank 0 alone over the same rows a single process
    # would read, so it uses the class's own, local selection and gives the same theta.
    collective = model.__dict__.pop("select", None)
    cuts = []
    try:
        for i in picks:
            x = cache.read("train", i, layers, 0, min(batch_size, shards[i].rows))
            out = model(x.to(device=device, dtype=torch.float32), **sparse_forward_kwargs(model))
            vals = out["sel_val"].float()
            vals = vals[vals > 0]
            if vals.numel():
                cuts.append(vals.min())
    finally:
        model.train(was_training)
        if collective is not None:
            model.select = collective
    if not cuts:
        return None
    before = float(model.threshold)
    model.threshold.fill_(torch.stack(cuts).mean())
    return {"before": before, "after": float(model.threshold), "batches": len(cuts)}
