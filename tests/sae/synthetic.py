"""Synthetic activations from a known sparse dictionary, and the helpers that score an SAE on them.

Shared by every test in tests/sae, the TopK family and Vanilla/Gated/JumpReLU alike
(`from tests.sae.synthetic import make_sparse_data, fit, ...`):
- `make_sparse_data`: x = sum of a few true unit features with positive magnitudes.
- `make_multilayer_data`: the same for routed SAEs, one independent sparse code per layer over a
  shared dictionary, each layer with its own scale (so input_scale and routing have work to do).
- `feature_recovery`: share of true features whose best decoder row has cosine > threshold.
- `fit`: a small training loop (Adam, unit-norm decoder with parallel-gradient removal, dead-latent
  window for AuxK, the model's `update_after_step` and `estimate_threshold` hooks), and `heldout_fvu`; `single_thread()`
  around them keeps learning tests fast on a busy machine and deterministic across machines.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block. Small-model training is latency-bound: on a shared
    2-core machine two OpenMP threads wait on each other and a step can take 20x longer; one
    thread also makes the result independent of the machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_dictionary(n_features: int, d: int, generator: torch.Generator) -> Tensor:
    """[n_features, d] random unit rows."""
    w = torch.randn(n_features, d, generator=generator)
    return w / w.norm(dim=1, keepdim=True)


def sparse_codes(n: int, n_features: int, active: int, generator: torch.Generator) -> Tensor:
    """[n, n_features] codes with exactly `active` non-zeros per row, magnitudes in [0.5, 1.5)."""
    scores = torch.rand(n, n_features, generator=generator)
    idx = scores.topk(active, dim=1).indices  # `active` distinct features, uniformly chosen
    mags = 0.5 + torch.rand(n, active, generator=generator)
    return torch.zeros(n, n_features).scatter_(1, idx, mags)


def make_sparse_data(
    n: int, d: int = 64, n_features: int = 512, active: int = 4, noise: float = 0.0, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """-> (x [n, d], dictionary [n_features, d]); x = codes @ dictionary (+ Gaussian noise)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = random_dictionary(n_features, d, g)
    x = sparse_codes(n, n_features, active, g) @ dictionary
    if noise:
        x = x + noise * torch.randn(n, d, generator=g)
    return x, dictionary


def make_multilayer_data(
    n: int,
    n_layers: int = 3,
    d: int = 64,
    n_features: int = 512,
    active: int = 4,
    layer_scales: tuple[float, ...] | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """-> (x [n, n_layers, d], dictionary [n_features, d]). Every layer draws its own sparse code
    over the shared dictionary and is multiplied by its own scale (default 1, 2, 3, ...)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = random_dictionary(n_features, d, g)
    scales = layer_scales or tuple(float(i + 1) for i in range(n_layers))
    if len(scales) != n_layers:
        raise ValueError(f"layer_scales has {len(scales)} entries for {n_layers} layers")
    layers = [s * (sparse_codes(n, n_features, active, g) @ dictionary) for s in scales]
    return torch.stack(layers, dim=1), dictionary


def feature_recovery(decoder: Tensor, dictionary: Tensor, threshold: float = 0.9) -> float:
    """Share of true features (rows of `dictionary` [F, d]) whose maximum cosine similarity to some
    row of `decoder` [M, d] exceeds `threshold`."""
    dec = decoder.detach().float()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    true = dictionary / dictionary.norm(dim=1, keepdim=True)
    best = (true @ dec.T).max(dim=1).values
    return (best > threshold).float().mean().item()


def scale_for(x: Tensor) -> Tensor:
    """Per-layer scalar so that E||x * s|| = sqrt(d) (the project's normalisation).
    x: [n, d] -> [1]; x: [n, L, d] -> [L]."""
    d = x.shape[-1]
    norms = x.norm(dim=-1)  # [n] or [n, L]
    return (d**0.5 / norms.mean(dim=0)).reshape(-1)


def fit(
    model: torch.nn.Module,
    x: Tensor,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    l1_coefficient: float = 0.0,
    dead_window: int = 50,
    decay_fraction: float = 0.0,
    seed: int = 0,
) -> torch.nn.Module:
    """Train `model` on rows of x ([n, d] or [n, L, d], raw units) with Adam and a unit-norm
    decoder. With decay_fraction > 0 the learning rate decays linearly to 0 over that last share
    of the steps (a short run ends at a much lower loss that way). A latent that has not fired
    for `dead_window` steps counts as dead (for AuxK)."""
    g = torch.Generator().manual_seed(seed)
    model.set_input_scale(scale_for(x))
    model.init_from_data(x[:2048])
    model.normalize_decoder()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    decay_from = int((1.0 - decay_fraction) * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 1.0 if i < decay_from else max(0.0, (steps - i) / max(1, steps - decay_from))
    )
    since_fired = torch.zeros(model.d_sae, dtype=torch.long)
    model.train()
    for _ in range(steps):
        batch = x[torch.randint(0, x.shape[0], (batch_size,), generator=g)]
        out = model(batch)
        terms = model.loss(out, l1_coefficient=l1_coefficient, dead_mask=since_fired >= dead_window)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        model.remove_parallel_grads()
        opt.step()
        sched.step()
        model.normalize_decoder()
        model.update_after_step(out)
        model.estimate_threshold(out)
        fired = model.fired(out)
        since_fired = torch.where(fired, torch.zeros_like(since_fired), since_fired + 1)
    model.eval()
    return model


@torch.no_grad()
def heldout_fvu(model: torch.nn.Module, x: Tensor) -> float:
    """FVU = sum ||target - sae_out||^2 / sum ||target - mean(target)||^2 in eval mode."""
    was_training = model.training
    model.eval()
    out = model(x)
    target, recon = out["target"].double(), out["sae_out"].double()
    fvu = ((target - recon) ** 2).sum() / ((target - target.mean(dim=0)) ** 2).sum()
    model.train(was_training)
    return fvu.item()
