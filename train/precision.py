"""The precision a training step computes in: `training.dtype` -> what the matmuls actually use.

- `float32`: everything in float32.
- `bfloat16`: the matmuls (the encoder GEMM, most of a TopK step) run in bf16 under autocast, while
  the master weights, their gradients and Adam's state stay float32 (autocast never touches
  parameters). Only where bf16 is native: on CUDA, and on CPUs whose oneDNN has bf16 GEMM kernels
  (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than float32, so the step stays float32
  and the run says so.
- `auto` (the default): `bfloat16` where it is native *and* the architecture passed the quality check
  (`BaseSAE.bf16_auto`: held-out FVU after the same steps within 0.002 of float32 on the default
  cache, bench/RESULTS.md "bf16 quality check"), float32 otherwise.
- `float64`: exactness checks in tests (the model is cast; no autocast).

The run summary records the setting and what was used (`precision_record`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

TRAINING_DTYPES = ("auto", "float32", "bfloat16", "float64")  # float64: exactness checks (tests)


def bf16_autocast_available(device: torch.device) -> bool:
    """bf16 autocast pays on CUDA and on CPUs with native bf16 GEMMs (oneDNN: AVX512-BF16 or AMX), where
    the encoder's GEMM runs 3-5x faster than in float32; elsewhere it would be emulated and slower."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private: absent means no
    return bool(torch.backends.mkldnn.is_available() and probe is not None and probe())


def compute_dtype(setting: str, device: torch.device, bf16_auto: bool) -> str:
    """`training.dtype` -> the dtype the step's matmuls run in ("float32", "bfloat16" or "float64").
    `bf16_auto`: the architecture's `BaseSAE.bf16_auto` (whether `auto` may pick bf16 for it)."""
    if setting not in TRAINING_DTYPES:
        raise ValueError(f"training.dtype={setting!r} is not one of {TRAINING_DTYPES}")
    if setting == "auto":
        return "bfloat16" if bf16_auto and bf16_autocast_available(device) else "float32"
    if setting == "bfloat16" and not bf16_autocast_available(device):
        return "float32"
    return setting


def autocast_for(dtype: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context the forward and loss run in for a resolved `compute_dtype`."""
    if dtype == "bfloat16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def dtype_notes(setting: str, device: torch.device, bf16_auto: bool, sae_type: str) -> list[str]:
    """What the log should say when the dtype used is not the one a reader would assume."""
    used = compute_dtype(setting, device, bf16_auto)
    if setting == "bfloat16" and used != "bfloat16":
        return ["training.dtype=bfloat16 applies on CUDA and on CPUs with native bf16 (autocast); "
                "on this device training runs in float32"]
    if setting == "auto":
        why = ("native bf16 matmuls, float32 master weights and Adam state" if used == "bfloat16"
               else f"no native bf16 on {device.type}" if bf16_autocast_available(device) is False
               else f"{sae_type} keeps float32 (not quality-checked in bf16)")
        return [f"training.dtype=auto: {used} ({why})"]
    return []


def precision_record(setting: str, used: str) -> dict[str, str]:
    """The run summary's `precision` entry."""
    master = "float64" if used == "float64" else "float32"
    return {"setting": setting, "matmuls": used, "master_weights": master, "optimizer_state": master}
