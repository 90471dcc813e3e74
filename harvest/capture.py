"""Run a window's batches through the model and hand its shuffled rows to the cache writer.

Rows are selected on the model's device (index_select by precomputed flat indices, so no
host-device synchronisation is needed to learn how many rows a batch keeps), scattered straight
into a per-layer window buffer in the shuffled order, cast to the stored dtype there.

The window buffers go to `writer.append` as they are, on the model's device. On CUDA the cache writer
copies them into its shard buffers on that GPU, computes the shard statistics there, and moves each
full shard to pinned host memory on its own stream (cache/staging.py), so the main thread launches the
next window's forward while earlier shards are copied, hashed and written; it waits only when the
writer has as many shards in flight as it allows (the disk is the bottleneck). On CPU the writer keeps
the window buffers themselves and writes them from there (no copy).
"""

from __future__ import annotations

import torch

from cache import CacheWriter
from harvest.model import LoadedModel, forward_blocks
from harvest.windows import WindowPlan


def compute_window(lm: LoadedModel, layers: list[int], plan: WindowPlan,
                   store_dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Forward every batch of `plan`; returns {layer: [plan.rows, d_model]} in the shuffled row
    order, in `store_dtype`, on the device where that block ran."""
    bufs: dict[int, torch.Tensor] = {}
    non_blocking = lm.device.type == "cuda"
    n = plan.rows

    for batch in plan.batches:
        src = _to(batch.src, lm.device, non_blocking)
        dest = _to(batch.dest, lm.device, non_blocking)

        def on_output(layer: int, hidden: torch.Tensor, src: torch.Tensor = src, dest: torch.Tensor = dest) -> None:
            flat = hidden.reshape(-1, hidden.shape[-1])
            if layer not in bufs:
                bufs[layer] = torch.empty((n, flat.shape[-1]), dtype=store_dtype, device=flat.device)
            s, d = (src, dest) if flat.device == src.device else (src.to(flat.device), dest.to(flat.device))
            bufs[layer].index_copy_(0, d, flat.index_select(0, s).to(store_dtype))

        forward_blocks(lm, layers, on_output, _to(batch.input_ids, lm.device, non_blocking),
                       _to(batch.attention_mask, lm.device, non_blocking))
    if not plan.batches:
        return {layer: torch.empty((0, lm.d_model), dtype=store_dtype) for layer in layers}
    return bufs


def _to(t: torch.Tensor, device: torch.device, non_blocking: bool) -> torch.Tensor:
    if device.type == "cpu":
        return t
    if non_blocking:
        t = t.pin_memory()
    return t.to(device, non_blocking=non_blocking)


class WindowSink:
    """Delivers computed windows to `writer.append`; rows before `offset` (already committed before a
    resume) are dropped. The window buffers are handed over (`copy=False`): compute_window makes new ones
    for every window and never touches them again, so the writer may write host rows from where they
    are instead of copying them (it copies rows on a GPU into its own buffers there)."""

    def __init__(self, writer: CacheWriter, device: torch.device) -> None:
        self.writer = writer
        self.device = device

    def submit(self, plan: WindowPlan, acts: dict[int, torch.Tensor], offset: int) -> None:
        if offset >= plan.rows:
            return
        o = offset
        self.writer.append(plan.split, chunk=plan.chunk, offset=o, acts={layer: a[o:] for layer, a in acts.items()},
                           token_ids=plan.token_ids[o:], sequence=plan.sequence[o:], position=plan.position[o:],
                           document=plan.document[o:], copy=False)

    def close(self) -> None:
        """Nothing is held between windows; kept so that callers can close a sink whatever it buffers."""
