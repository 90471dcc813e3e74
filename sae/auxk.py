"""AuxK (Gao et al. 2024, §2.4; SAE_REFERENCE.md §3): dead latents learn to explain the residual.

1. D = dead latents (the trainer's dead window); k_aux = min(aux_k, |D|).
2. z_aux = ReLU(top-k_aux of the pre-activations restricted to D), per token.
3. e_hat = W_dec z_aux, without b_dec; e = stop_grad(target - sae_out).
4. L_aux = sum ||e - e_hat||^2 / sum ||e - mean_batch(e)||^2; NaN, or a denominator that is zero
   up to rounding (below 1e-6 of sum ||e||^2), -> 0.
The caller multiplies by `aux_k_coef` (1/32). Gradient reaches only dead rows of W_dec (and the
encoder through the dead latents' pre-activations).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.collective import GlobalBatch
from sae.selection import select_dead_topk, select_dead_topk_encoded, select_dead_topk_masked
from sae.sparse_decode import decode_selected, gather_preacts


def auxk_loss(
    out: dict[str, Tensor],
    w_enc: Tensor,
    b_enc: Tensor,
    w_dec: Tensor,
    dead_mask: Tensor | None,
    aux_k: int,
    impl: str = "sparse",
    sync_free: bool | None = None,
) -> Tensor:
    """Scalar AuxK loss from a TopK-family forward output.

    out needs `sae_in` [B, d] (the centred encoder input; with `sae_in_centre` where the forward
    centred it without the centre's graph), `target` and `sae_out` [B, d], and `pre_acts` [B, M] (with
    gradient on the dense path, without on the sparse one) where the forward kept them: the fused CPU
    encoder does not (`TopKSAE._fused_encode`), and the dead latents' pre-activations are then
    computed here, a GEMM over the dead rows of w_enc only (a few percent of the encoder's GEMM in a
    healthy run; up to all of it when every latent is dead). dead_mask [M] bool.
    sync_free: select with fixed shapes (`select_dead_topk_masked`); None = on every device but the CPU."""
    z = out.get("pre_acts")
    x_c = out["sae_in"]
    if dead_mask is None:
        return (x_c if z is None else z).new_zeros(())
    dead_mask = dead_mask.to(device=x_c.device, dtype=torch.bool)
    if dead_mask.shape != (w_enc.shape[0],):
        raise ValueError(f"dead_mask must have shape ({w_enc.shape[0]},), got {tuple(dead_mask.shape)}")
    if sync_free is None:
        sync_free = x_c.device.type != "cpu"
    if z is not None and sync_free:
        # Fixed shapes only: a GPU step never waits on the host for the number of dead latents.
        sel, keep = select_dead_topk_masked(z.detach(), dead_mask, aux_k)
        vals = torch.relu(gather_preacts(z, sel, x_c, w_enc, b_enc, out.get("sae_in_centre"))) * keep
        any_dead = dead_mask.any()
    else:
        # On a CPU a "sync" is free and the top-k over the dead columns only is much cheaper than a
        # full-width masked one when few latents are dead. Without z (the fused encoder) those columns'
        # pre-activations are computed here, the selection carrying them for gather_preacts.
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return (x_c if z is None else z).new_zeros(())
        k_aux = min(aux_k, n_dead)
        sel = (select_dead_topk_encoded(x_c, w_enc, b_enc, dead_mask, k_aux) if z is None
               else select_dead_topk(z.detach(), dead_mask, k_aux))
        vals = torch.relu(gather_preacts(z, sel, x_c, w_enc, b_enc, out.get("sae_in_centre")))
        any_dead = torch.ones((), dtype=torch.bool, device=x_c.device)
    e_hat = decode_selected(sel, vals, w_dec, impl)
    e = (out["target"] - out["sae_out"]).detach()
    num = (e - e_hat).pow(2).sum()
    den = (e - e.mean(dim=0)).pow(2).sum()
    # A residual that is (to rounding) the same for every token has no variance to explain: 0, not
    # num / rounding noise. torch.where rather than a Python branch: no host sync on GPU.
    degenerate = den <= 1e-6 * e.pow(2).sum()
    ratio = num / den.clamp_min(torch.finfo(den.dtype).tiny)
    return torch.where(any_dead & ~degenerate & torch.isfinite(ratio), ratio, torch.zeros_like(ratio))


def auxk_global_share(out: dict[str, Tensor], aux_local: Tensor, g: GlobalBatch) -> Tensor:
    """Data parallelism: this rank's AuxK `num_r / den_local` -> W * num_r / den_global, so that the
    shares summed over ranks and divided by W give the global batch's AuxK (its normaliser is the
    global residual variance). Zero where the global residual has no variance, as in `auxk_loss`."""
    e = (out["target"].detach() - out["sae_out"].detach()).reshape(out["target"].shape[0], -1).double()
    den_local = (e - e.mean(0)).pow(2).sum().to(aux_local.dtype)
    share = g.world * aux_local * den_local / g.err_var.to(aux_local.dtype).clamp_min(1e-300)
    return torch.where(g.err_var <= 1e-6 * g.err_sq, torch.zeros_like(share), share)
