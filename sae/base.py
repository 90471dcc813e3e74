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

import errno
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import xxhash
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import durable
from sae.collective import LOCAL, Collective, GlobalBatch, global_batch
from sae.config import SAEConfig, SAESettings

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae.json"
FORMAT_VERSION = 1


class BaseSAE(nn.Module, ABC):
    """Every architecture: one subclass in its own file, registered with `sae.registry.register`."""

    type_name: ClassVar[str] = "BaseSAE"
    input_scale: Tensor  # buffer [n_layers]
    W_dec: Tensor  # [d_sae, d_in]: every architecture here has a decoder (normalize_decoder, export)
    # Routed SAEs take [B, n_layers, d_in] and splice through `reconstruct_routed`.
    routed: ClassVar[bool] = False
    # True where `forward(x, dense_acts=False)` skips the dense [B, d_sae] `feature_acts` (the
    # TopK family's training fast path; `fired` then reads the kept indices).
    sparse_acts: ClassVar[bool] = False
    # Loss terms that are not means over tokens (AuxK's ratio). Under data parallelism
    # `global_losses` turns each into this rank's share: the sum of the shares / W is the global value.
    ratio_terms: ClassVar[tuple[str, ...]] = ()
    # Whether `training.dtype: auto` may train this architecture with bf16 matmuls (float32 master
    # weights) where bf16 is native: only after its held-out FVU in bf16 stayed within 0.002 of
    # float32 after the same steps on the default cache (bench/RESULTS.md, "bf16 quality check").
    bf16_auto: ClassVar[bool] = False

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

    @classmethod
    def check_settings(cls, settings: SAESettings) -> None:  # noqa: B027 - optional hook
        """This architecture's own rules on its settings, checked when a config is loaded and when the
        SAE is built (raise ValueError naming the key and the fix). None by default."""

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
        # Two passes over [d_sae, d_in] and no temporary of that size: a row-wise dot, then an in-place axpy.
        g.addcmul_(torch.linalg.vecdot(g, w, dim=1).unsqueeze(1), w, value=-1.0)

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Initialise from a sample of raw activations (default: b_dec = geometric median)."""
        b_dec = getattr(self, "b_dec", None)
        if isinstance(b_dec, Tensor):
            xn = self.normalise(x.float())
            if xn.dim() == 3:  # routed: the shared SAE sees routed vectors; sum/mean over layers
                xn = xn.mean(dim=1)
            b_dec.copy_(geometric_median(xn).to(b_dec.dtype))

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
        try:
            save_file(tensors, str(tmp_w))
            doc["files"] = {WEIGHTS_FILE: file_digest(tmp_w)}  # checked by load_sae: a flipped byte is refused
            text = json.dumps(doc, indent=2).encode()
            durable.write_synced(tmp_c, text)
            durable.publish(tmp_w, path / WEIGHTS_FILE)
            durable.publish(tmp_c, path / CONFIG_FILE)
        except BaseException as e:
            tmp_w.unlink(missing_ok=True)
            tmp_c.unlink(missing_ok=True)
            if durable.is_disk_full(e) and not isinstance(e, OSError):  # safetensors' SafetensorError
                raise OSError(errno.ENOSPC, f"disk full while writing {path / WEIGHTS_FILE} ({e})") from e
            raise
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
    recorded = doc.get("files", {}).get(WEIGHTS_FILE) if isinstance(doc.get("files"), dict) else None
    if recorded is not None and file_digest(weights_file) != recorded:  # SAEs saved before checksums: none
        raise ValueError(f"{weights_file} does not match its checksum in {cfg_file} (the SAE is damaged, or its "
                         f"two files come from different saves); restore it or train it again")
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


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes", "xxh3"} of a file: what sae.json and checkpoints record of the files beside them."""
    data = Path(path).read_bytes()
    return {"bytes": len(data), "xxh3": xxhash.xxh3_64_hexdigest(data)}


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
