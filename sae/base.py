"""The contract every SAE in the zoo keeps, and the machinery they share.

The SAE owns its training behaviour: every hook the trainer calls has its default here, and an
architecture overrides what it does differently (train/ names no architecture):
- `forward`/`loss` (and `sparse_acts`: whether the training forward may skip the dense latents);
- `fired` (which latents count as alive for the dead-latent counters and AuxK);
- `update_after_step` (every step, e.g. JumpReLU's theta >= 0) and `estimate_threshold` (from
  `training.threshold_start_step` on: BatchTopK's running inference threshold);
- `calibrate` (after training, from a few training batches: BatchTopK's final threshold);
- `routed` (reads [B, n_layers, d_in] from several cache layers) and `resolve_settings` (defaults
  implied by the type, checks of its own settings at config load);
- `use_collective` / `global_losses` (data parallelism: cross-rank selection, global normalisers);
- `to_saelens` (the SAELens layout of its weights, for export).

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
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import durable
from sae.collective import LOCAL, Collective, GlobalBatch, global_batch

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae.json"
FORMAT_VERSION = 1


_INT_KEYS = ("hidden_size", "latent_size", "k", "n_layers")
_FLOAT_KEYS = ("threshold", "bandwidth", "aux_k_coef", "threshold_momentum")
_STR_KEYS = ("type", "base_sae_type", "routing", "aggre", "decode_impl")


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
    # TopK family: "sparse" (embedding_bag decode, sparse backward), "dense" (GEMMs), or "auto"
    # (sparse where bench/bench_sae_decode.py measured it faster). Speed only: the math is the same.
    decode_impl: str = "auto"

    def validate(self) -> None:
        self._check_types()
        if self.hidden_size <= 0 or self.latent_size <= 0:
            raise ValueError("hidden_size and latent_size must be positive")
        if not 0 < self.k <= self.latent_size:
            raise ValueError(f"k={self.k} must be in 1..latent_size={self.latent_size}")
        if self.group_sizes is not None:
            if not self.group_sizes or any(g <= 0 for g in self.group_sizes):
                raise ValueError(f"group_sizes {self.group_sizes} must be a non-empty list of positive sizes")
            if sum(self.group_sizes) != self.latent_size:
                raise ValueError(
                    f"group_sizes {self.group_sizes} sum to {sum(self.group_sizes)}, "
                    f"but latent_size is {self.latent_size}; make them add up"
                )
        if self.routing not in ("hard", "soft"):
            raise ValueError(f"routing must be 'hard' or 'soft', got {self.routing!r}")
        if self.aggre not in ("sum", "mean"):
            raise ValueError(f"aggre must be 'sum' or 'mean', got {self.aggre!r}")
        if self.base_sae_type not in ("topk", "matryoshka"):
            raise ValueError(f"base_sae_type must be 'topk' or 'matryoshka', got {self.base_sae_type!r}")
        if self.decode_impl not in ("auto", "sparse", "dense"):
            raise ValueError(f"decode_impl must be 'auto', 'sparse' or 'dense', got {self.decode_impl!r}")
        if self.n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        if self.layers and len(self.layers) != self.n_layers:
            raise ValueError(f"layers {self.layers} do not match n_layers={self.n_layers}")
        if self.aux_k is not None and self.aux_k <= 0:
            raise ValueError(f"aux_k={self.aux_k} must be positive (or null for hidden_size // 2)")
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum={self.threshold_momentum} must be in [0, 1)")

    def _check_types(self) -> None:
        # Configs also arrive from sae.json files on disk: wrong types must fail here, by name.
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_int_list(v: Any) -> bool:
            return isinstance(v, list) and all(is_int(i) for i in v)

        for key in _INT_KEYS:
            if not is_int(getattr(self, key)):
                raise TypeError(f"SAE config key {key!r} must be an integer, got {getattr(self, key)!r}")
        for key in _FLOAT_KEYS:
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise TypeError(f"SAE config key {key!r} must be a finite number, got {v!r}")
        for key in _STR_KEYS:
            if not isinstance(getattr(self, key), str):
                raise TypeError(f"SAE config key {key!r} must be a string, got {getattr(self, key)!r}")
        if self.aux_k is not None and not is_int(self.aux_k):
            raise TypeError(f"SAE config key 'aux_k' must be an integer or null, got {self.aux_k!r}")
        if self.group_sizes is not None and not is_int_list(self.group_sizes):
            raise TypeError(f"SAE config key 'group_sizes' must be a list of integers, got {self.group_sizes!r}")
        if not is_int_list(self.layers):
            raise TypeError(f"SAE config key 'layers' must be a list of integers, got {self.layers!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        if not isinstance(data, dict):
            raise TypeError(f"an SAE config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAE config keys {unknown}; known: {sorted(known)}")
        missing = sorted(k for k in ("type", "hidden_size", "latent_size") if k not in data)
        if missing:
            raise ValueError(f"SAE config lacks required keys {missing}")
        cfg = cls(**data)
        cfg.validate()
        return cfg


class BaseSAE(nn.Module, ABC):
    """Every architecture: one subclass in its own file, registered with `sae.registry.register`."""

    type_name: ClassVar[str] = "BaseSAE"
    # Routed SAEs take [B, n_layers, d_in] and splice through `reconstruct_routed`.
    routed: ClassVar[bool] = False
    # True where `forward(x, dense_acts=False)` skips the dense [B, d_sae] `feature_acts` (the
    # TopK family's training fast path; `fired` then reads the kept indices).
    sparse_acts: ClassVar[bool] = False
    # Loss terms that are not means over tokens (AuxK's ratio). Under data parallelism
    # `global_losses` turns each into this rank's share: the sum of the shares / W is the global value.
    ratio_terms: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        if type(self).type_name != "BaseSAE":
            from sae import registry

            if registry.canonical(cfg.type) != type(self).type_name:
                raise ValueError(
                    f"config type {cfg.type!r} is {registry.canonical(cfg.type)}, "
                    f"but it was given to {type(self).type_name}"
                )
            # Saved configs name the class, not the alias it was built from.
            cfg = replace(cfg, type=type(self).type_name)
        self.cfg = cfg
        # One scalar per routed layer (one for single-layer SAEs): x_normalised = x_raw * scale.
        self.register_buffer("input_scale", torch.ones(cfg.n_layers))
        self.collective: Collective = LOCAL

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

    def check_input(self, x: Tensor) -> None:
        """Refuse activations whose trailing shape does not fit, naming what was expected."""
        want = (self.cfg.n_layers, self.d_in) if self.routed else (self.d_in,)
        if tuple(x.shape[-len(want):]) != want or x.dim() < len(want) + 1:
            what = "[..., n_layers, d_in]" if self.routed else "[..., d_in]"
            raise ValueError(
                f"{type(self).type_name} expects activations {what} = [..., {', '.join(map(str, want))}], "
                f"got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{type(self).type_name} expects floating-point activations, got {x.dtype}")

    def reconstruct(self, x: Tensor) -> Tensor:
        """Raw in, raw out: what replaces the activation when the SAE is spliced into a model."""
        return self.decode(self.encode(x))

    # ---- hooks the trainer calls ----------------------------------------------------------
    def fired(self, out: dict[str, Tensor]) -> Tensor:
        """[d_sae] bool: latents that were non-zero for some token of this batch."""
        return (out["feature_acts"] != 0).any(dim=0)

    def update_after_step(self, out: dict[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Per-step state outside the optimiser, after every optimiser step (JumpReLU: theta >= 0)."""

    def estimate_threshold(self, out: dict[str, Tensor]) -> None:  # noqa: B027 - optional hook
        """Update a running estimate of an inference threshold from a training step's output. The
        trainer calls it after each step from `training.threshold_start_step` on (BatchTopK family)."""

    def calibrate(self, batches: Iterable[Tensor]) -> dict[str, float] | None:
        """After training: set inference state from raw training batches (iterated lazily: an SAE
        with nothing to calibrate reads none). Returns what changed, for the SAE's meta, or None."""
        return None

    def use_collective(self, collective: Collective) -> None:
        """Train as one rank of a data-parallel run whose reductions `collective` performs."""
        self.collective = collective

    def global_losses(self, out: dict[str, Tensor], losses: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
        """This rank's loss terms -> (terms whose `total`, once gradients are averaged over ranks,
        back-propagates as the global batch's loss; the global batch size). Every term is a mean over
        tokens unless named in `ratio_terms`; `fvu` becomes the global batch's."""
        g = global_batch(out, self.collective)
        terms = dict(losses)
        terms["total"] = g.token_weight * losses["total"]
        terms["fvu"] = g.fvu().to(losses["total"].dtype)
        return self.global_ratio_terms(out, losses, terms, g), g.n

    def global_ratio_terms(self, out: dict[str, Tensor], losses: dict[str, Tensor], terms: dict[str, Tensor],
                           g: GlobalBatch) -> dict[str, Tensor]:
        """Correct `terms` (already token-weighted) for the terms in `ratio_terms`; none by default."""
        return terms

    def to_saelens(self) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
        """(SAELens architecture, its float32 weights with `input_scale` folded in, extra cfg.json keys).
        Refused by default: only architectures with a SAELens counterpart override it."""
        raise ValueError(f"{type(self).type_name} has no SAELens counterpart; it cannot be exported")

    def _saelens_folded(self, enc: str = "W_enc", transpose: bool = False) -> dict[str, Tensor]:
        """W_enc' = s W_enc (as [d_in, d_sae]), W_dec' = W_dec / s, b_dec' = b_dec / s; pre-activations,
        hence thresholds, are unchanged. `transpose` for encoders kept as [d_sae, d_in]."""
        s = float(self.input_scale[0])
        p = {k: v.detach().float().cpu() for k, v in self.state_dict().items()}
        w_enc = p[enc].T if transpose else p[enc]
        return {**p, "W_enc": (w_enc * s).contiguous(), "W_dec": p["W_dec"] / s, "b_dec": p["b_dec"] / s}

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
        text = json.dumps(doc, indent=2).encode()  # fails (non-JSON meta) before anything is written
        # Both files are complete on disk under temporary names before either replaces an old one.
        tmp_w, tmp_c = path / (WEIGHTS_FILE + ".tmp"), path / (CONFIG_FILE + ".tmp")
        save_file(tensors, str(tmp_w))
        durable.write_synced(tmp_c, text)
        durable.publish(tmp_w, path / WEIGHTS_FILE)
        durable.publish(tmp_c, path / CONFIG_FILE)
        return path


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> tuple[BaseSAE, dict[str, Any]]:
    """Load a saved SAE folder -> (model, meta). Never unpickles; refuses unknown types, missing
    or unexpected tensors, wrong shapes and non-float tensors, naming the offender."""
    from sae import registry

    path = Path(path)
    cfg_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: an SAE folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        doc = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise ValueError(f"{cfg_file}: expected an object with a 'config' object")
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: format_version {doc.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        cfg = SAEConfig.from_dict(doc["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: bad SAE config: {e}") from e
    cls = registry.get(cfg.type)
    model = cls(cfg)
    try:
        state = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{weights_file} is not a readable safetensors file ({e})") from e
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{weights_file}: missing tensors {missing}, unexpected tensors {extra}")
    for name, ref in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise ValueError(
                f"{weights_file}: tensor {name!r} has shape {tuple(got.shape)}, "
                f"config {cfg.type} expects {tuple(ref.shape)}"
            )
        if ref.is_floating_point() != got.is_floating_point():
            raise ValueError(f"{weights_file}: tensor {name!r} has dtype {got.dtype}, expected {ref.dtype}")
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
