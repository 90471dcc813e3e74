"""The one device resolver: a config's `device` value -> a torch.device, for every stage.

`auto` is the first CUDA device when one is visible, else the CPU; an explicit CUDA device must exist.
torch is imported only when a device is resolved, so loading a config stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from settings.load import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str, key: str = "device") -> torch.device:
    """`name` (auto | cpu | cuda | cuda:N | any torch device string) -> torch.device. `key` names the
    config key in the error (e.g. training.device)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"{key}={name!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but no CUDA device is visible; use {key}=cpu (or auto)")
    return device
