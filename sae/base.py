"""The contract every SAE in the zoo keeps, and the machinery they share.

Units: an SAE is applied to *raw* activations. Training normalises each layer by one scalar
(`input_scale`, so that E||x * scale|| = sqrt(d) on the training split); the scale is a buffer
saved with the weights, so a saved SAE needs nothing else.
- `encode(x_raw)` scales internally; `decode(f)` returns raw units; `reconstruct(x_raw)` is raw in, raw out.
- `forward(x_raw)` returns its tensors in *normalised* units (`target`, `sae_out`), because
  losses, FVU and routing live there (a routed reconstruction mixes layers, so it has no single
  raw unit).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae.json"
FORMAT_VERSION = 1


@dataclass
class SAEConfig:
    """What defines an SAE's shape and math. Keys follow the original SAEs README."""

    type: str
    hidden_size: int  # d_in
    latent_size: int  # d_sae
    k: int = 32  # TopK family: active latents per token (BatchTopK: on average)
    threshold: float = 0.001  # JumpReLU: initial theta
    bandwidth: float = 0.001  # JumpReLU: STE rectangle width epsilon
    group_sizes: list[int] | None = None  # Matryoshka: nested group sizes, sum == latent_size
    base_sae_type: str = "topk"  # Route*: the shared SAE ("topk" or "matryoshka")
    routing: str = "hard"  # Route*: "hard" | "soft"
    aggre: str = "sum"  # Route*: "sum" | "mean" router input
    n_layers: int = 1  # Route*: number of routed layers; 1 for single-layer SAEs
    aux_k: int | None = None  # AuxK latents; None -> hidden_size // 2
    aux_k_coef: float = 1.0 / 32.0
    threshold_momentum: float = 0.99  # BatchTopK / Matryoshka: EMA of the inference threshold
    layers: list[int] = field(default_factory=list)  # cache blocks this SAE reads (provenance)

    def validate(self) -> None:
        if self.hidden_size <= 0 or self.latent_size <= 0:
            raise ValueError("hidden_size and latent_size must be positive")
        if not 0 < self.k <= self.latent_size:
            raise ValueError(f"k={self.k} must be in 1..latent_size={self.latent_size}")
        if self.group_sizes is not None and sum(self.group_sizes) != self.latent_size:
            raise ValueError(
                f"group_sizes {self.group_sizes} sum to {sum(self.group_sizes)}, "
                f"but latent_size is {self.latent_size}; make them add up"
            )
        if self.routing not in ("hard", "soft"):
            raise ValueError(f"routing must be 'hard' or 'soft', got {self.routing!r}")
        if self.aggre not in ("sum", "mean"):
            raise ValueError(f"aggre must be 'sum' or 'mean', got {self.aggre!r}")
        if self.n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        if self.layers and len(self.layers) != self.n_layers:
            raise ValueError(f"layers {self.layers} do not match n_layers={self.n_layers}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAE config keys {unknown}; known: {sorted(known)}")
        cfg = cls(**data)
        cfg.validate()
        return cfg


class BaseSAE(nn.Module, ABC):
    """Every architecture: one subclass in its own file, registered with `sae.registry.register`."""

    type_name: ClassVar[str] = "BaseSAE"

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # One scalar per routed layer (one for single-layer SAEs): x_normalised = x_raw * scale.
        self.register_buffer("input_scale", torch.ones(cfg.n_layers))

    @property
    def d_in(self) -> int:
        return self.cfg.hidden_size

    @property
    def d_sae(self) -> int:
        return self.cfg.latent_size

    # ---- the interface --------------------------------------------------------------------
    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Raw activations [..., d_in] (routed: [..., n_layers, d_in]) -> latents [..., d_sae]."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents [..., d_sae] -> reconstruction [..., d_in] in raw units."""

    @abstractmethod
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Raw x -> dict with at least `target`, `sae_out` (both normalised, [B, d_in]) and
        `feature_acts` ([B, d_sae])."""

    @abstractmethod
    def loss(
        self, out: dict[str, Tensor], *, l1_coefficient: float = 0.0, dead_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Named loss terms from `forward`'s output; always includes `mse` and `total`.
        `l1_coefficient` is the sparsity weight after warm-up; `dead_mask` [d_sae] bool marks
        latents that have not fired within the dead window (for AuxK)."""

    def reconstruct(self, x: Tensor) -> Tensor:
        """Raw in, raw out: what replaces the activation when the SAE is spliced into a model."""
        return self.decode(self.encode(x))

    # ---- hooks the trainer calls ----------------------------------------------------------
    def fired(self, out: dict[str, Tensor]) -> Tensor:
        """[d_sae] bool: latents that were non-zero for some token of this batch."""
        return (out["feature_acts"] != 0).any(dim=0)

    def update_after_step(self, out: dict[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Per-step state outside the optimiser (BatchTopK's inference threshold)."""

    @torch.no_grad()
    def set_input_scale(self, scale: Tensor | float) -> None:
        self.input_scale.copy_(torch.as_tensor(scale, dtype=self.input_scale.dtype).expand_as(self.input_scale))

    def normalise(self, x: Tensor) -> Tensor:
        """Raw -> normalised units. x: [..., d_in] or, routed, [..., n_layers, d_in]."""
        if self.cfg.n_layers == 1:
            return x * self.input_scale.to(x.dtype)
        return x * self.input_scale.to(x.dtype)[:, None]

    # Decoder-norm constraint. Subclasses with a decoder keep it as `W_dec` [d_sae, d_in].
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        w = self.W_dec
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Project out the gradient component along each unit decoder row, so that the step
        does not fight the renormalisation that follows it."""
        w, g = self.W_dec, self.W_dec.grad
        if g is None:
            return
        g.sub_((g * w).sum(dim=1, keepdim=True) * w)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Initialise from a sample of raw activations (default: b_dec = geometric median)."""
        if hasattr(self, "b_dec"):
            xn = self.normalise(x.float())
            if xn.dim() == 3:  # routed: the shared SAE sees routed vectors; sum/mean over layers
                xn = xn.mean(dim=1)
            self.b_dec.copy_(geometric_median(xn).to(self.b_dec.dtype))

    # ---- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write `sae.safetensors` + `sae.json` into folder `path` (created). `meta` is free
        JSON provenance (cache id, normalisation, training run)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        doc = {"format_version": FORMAT_VERSION, "config": asdict(self.cfg), "meta": meta or {}}
        _atomic_write(path / CONFIG_FILE, json.dumps(doc, indent=2).encode())
        tmp = path / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path / WEIGHTS_FILE)
        return path


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> tuple[BaseSAE, dict[str, Any]]:
    """Load a saved SAE folder -> (model, meta). Never unpickles; refuses unknown types, missing
    or unexpected tensors and wrong shapes, naming the offender."""
    from sae import registry

    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: an SAE folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        doc = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e})") from e
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: format_version {doc.get('format_version')!r}, expected {FORMAT_VERSION}")
    cfg = SAEConfig.from_dict(doc["config"])
    cls = registry.get(cfg.type)
    model = cls(cfg)
    state = load_file(str(path / WEIGHTS_FILE))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{path / WEIGHTS_FILE}: missing tensors {missing}, unexpected tensors {extra}")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise ValueError(
                f"{path / WEIGHTS_FILE}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"config {cfg.type} expects {tuple(ref.shape)}"
            )
    model.load_state_dict(state)
    return model.to(device), doc.get("meta", {})


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld's algorithm on rows of x [n, d] -> [d]."""
    x = x.double()
    m = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(dim=0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, m.norm().item()):
            m = new
            break
        m = new
    return m.float()


def default_aux_k(cfg: SAEConfig) -> int:
    return cfg.aux_k if cfg.aux_k is not None else max(1, cfg.hidden_size // 2)


def kaiming_unit_rows(d_sae: int, d_in: int, generator: torch.Generator | None = None) -> Tensor:
    """A [d_sae, d_in] decoder with random directions of unit norm."""
    w = torch.randn(d_sae, d_in, generator=generator) / math.sqrt(d_in)
    return w / w.norm(dim=1, keepdim=True)


def _atomic_write(target: Path, data: bytes) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
    tmp.replace(target)
