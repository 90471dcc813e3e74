"""How much memory a sweep needs, estimated before it starts, and the refusal when it does not fit.

Every member keeps its weights, gradients and Adam's two moments for the whole pass (4 copies of its
parameters, built on the meta device to count them exactly), plus its own [B, d] copy of its batch;
only one member steps at a time, so the step's working memory (about three [B, d_sae] tensors: the
pre-activations, the latents and their gradient) counts once, for the largest member. The shared
reader holds two buffers of `shuffle_buffer_rows` rows of every layer read (stored dtype) and its
prefetched batches (float32). The device's free memory (CUDA: free memory of the device; CPU:
MemAvailable) must hold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import sae as zoo
from train.build import LayerChoice, sae_config

STEP_WORKING_COPIES = 3  # [B, d_sae] tensors alive at once in a step
PREFETCH_BATCHES = 2  # ActivationLoader's default prefetch


@dataclass(frozen=True)
class Estimate:
    members: int  # bytes: every member's state
    step: int  # bytes: the largest member's step
    reader: int  # bytes: the shared reader's buffers and prefetched batches
    available: int | None  # bytes free on the device (None: unknown)

    @property
    def total(self) -> int:
        return self.members + self.step + self.reader

    def describe(self) -> str:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        free = "unknown" if self.available is None else gib(self.available)
        return (f"estimated {gib(self.total)} (members' weights, gradients and Adam state {gib(self.members)}, "
                f"one step {gib(self.step)}, shared reader {gib(self.reader)}); free on the device: {free}")


def parameter_count(model_cfg: Any, d_in: int, choice: LayerChoice) -> int:
    cfg = sae_config(model_cfg, d_in, choice)
    with torch.device("meta"):
        model = zoo.get(cfg.type)(cfg)
    return sum(p.numel() for p in model.parameters())


def estimate(configs: list[Any], choices: list[LayerChoice], d_model: int, reader_layers: int,
             stored_itemsize: int, device: torch.device) -> Estimate:
    members = step = 0
    for cfg, choice in zip(configs, choices, strict=True):
        t = cfg.training
        width = 8 if t.dtype == "float64" else 4
        members += 4 * width * parameter_count(cfg.model, d_model, choice)
        members += 4 * t.batch_size * len(choice.layers) * d_model
        step = max(step, STEP_WORKING_COPIES * width * t.batch_size * int(cfg.model.latent_size))
    t = configs[0].training
    reader = (2 * t.shuffle_buffer_rows * stored_itemsize + PREFETCH_BATCHES * t.batch_size * 4) \
        * reader_layers * d_model
    return Estimate(members, step, reader, available_bytes(device))


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
