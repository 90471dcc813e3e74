"""MatryoshkaSAE (Bussmann, Nabeshima, Karvonen, Nanda 2025; SAE_REFERENCE.md §6).

Latents come in nested groups of sizes s_1..s_G (`group_sizes`, summing to latent_size); prefix i
holds the first m_i = s_1 + ... + s_i latents. The activation is BatchTopK (threshold at inference,
as in BatchTopKSAE). Every prefix must reconstruct on its own:

    x_hat_i = b_dec + sum_{j < m_i} f_j W_dec[j]
    loss    = sum_i mean_t ||x - x_hat_i||^2 + aux_k_coef * AuxK(x - x_hat_G)

(the paper's unweighted sum; no stop-gradient between levels). `loss` also returns each term as
`mse_prefix_<i>`; `mse` is the full reconstruction's. `encode(x, active_groups=g)` keeps only the
first g groups (prefix inference).

Sparse decoding computes every prefix at once: the kept entries, sorted by (token, latent), fall
into (token, group) bags in order, so one embedding_bag gives each group's contribution
[B, G, d] and a cumulative sum over groups gives the G prefix reconstructions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae.base import SAEConfig, SAESettings
from sae.batchtopk import BatchTopKSAE
from sae.registry import register
from sae.selection import Selection
from sae.sparse_decode import decode_selected, densify


@register("MatryoshkaSAE", "matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    bf16_auto = False  # not quality-checked in bf16 yet (its nested losses): `auto` keeps float32
    group_ends: Tensor  # buffer [G]: m_1..m_G
    @classmethod
    def check_settings(cls, settings: SAESettings) -> None:
        super().check_settings(settings)
        if settings.group_sizes is None:
            n = settings.latent_size
            raise ValueError(f"{settings.type} needs model.group_sizes (nested group sizes summing to latent_size="
                             f"{n}), e.g. [{n // 4}, {n - n // 4}]")

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        ends = torch.tensor(cfg.group_sizes).cumsum(0)
        self.register_buffer("group_ends", ends, persistent=False)  # m_1..m_G

    @property
    def n_groups(self) -> int:
        return len(self.group_sizes)

    @property
    def group_sizes(self) -> list[int]:
        return list(self.cfg.group_sizes or ())  # check_settings guarantees it is set

    def _decode_out(self, sel: Selection, vals: Tensor) -> dict[str, Tensor]:
        """-> `sae_out` [B, d_in] (all groups) and `prefix_out` [B, G, d_in] (prefix i in [:, i])."""
        g = self.n_groups
        if self.impl == "sparse":
            group = torch.bucketize(sel.cols, self.group_ends, right=True)  # group of each entry
            bag = sel.rows * g + group
            order = None
            if bag.numel() > 1 and not bool((bag[1:] >= bag[:-1]).all()):
                order = bag.argsort(stable=True)  # per-token TopK order; BatchTopK is already sorted
                bag = bag[order]
            counts = torch.bincount(bag, minlength=sel.n_rows * g)
            by_group = Selection(bag, sel.cols if order is None else sel.cols[order],
                                 torch.cumsum(counts, 0) - counts, self.d_sae)
            v = vals if order is None else vals[order]
            parts = decode_selected(by_group, v, self.W_dec, "sparse").view(sel.n_rows, g, self.d_in)
        else:
            f = densify(sel, vals)
            starts = [0, *self.group_sizes[:-1]]
            bounds = torch.tensor(starts).cumsum(0).tolist()
            parts = torch.stack(
                [f[:, s : s + n] @ self.W_dec[s : s + n] for s, n in zip(bounds, self.group_sizes, strict=True)],
                dim=1,
            )
        prefix = parts.cumsum(dim=1) + self.b_dec
        return {"sae_out": prefix[:, -1], "prefix_out": prefix}

    def loss(
        self, out: dict[str, Tensor], *, l1_coefficient: float = 0.0, dead_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """-> {`mse`, `mse_prefix_0`..`mse_prefix_{G-1}`, `auxk`, `total`, `fvu`} (routed: the
        optimised terms are `nmse`, `nmse_prefix_<i>`; plain `mse`, `mse_prefix_<i>` are logged)."""
        target, prefix = out["target"], out["prefix_out"]
        name = self.recon_name
        terms: dict[str, Tensor] = {}
        for i in range(self.n_groups):
            terms[f"{name}_prefix_{i}"] = self._recon_error(target, prefix[:, i])
            if name != "mse":
                terms[f"mse_prefix_{i}"] = (target - prefix[:, i]).detach().pow(2).sum(-1).mean()
        recon = sum(terms[f"{name}_prefix_{i}"] for i in range(self.n_groups))
        terms[name] = terms[f"{name}_prefix_{self.n_groups - 1}"]
        # The last prefix is the whole reconstruction: its MSE is the one FVU needs.
        terms.update(self._log_terms(out, terms[name] if name == "mse" else None))
        aux = self._auxk(out, dead_mask)
        terms.update(auxk=aux, total=recon + self.cfg.aux_k_coef * aux)
        return terms

    def encode(self, x: Tensor, active_groups: int | None = None) -> Tensor:
        """Raw x [..., d_in] -> latents [..., d_sae]; with active_groups=g, latents beyond the
        first g groups are zeroed."""
        latents = super().encode(x)
        return latents if active_groups is None else self._keep_groups(latents, active_groups)

    def _keep_groups(self, latents: Tensor, active_groups: int) -> Tensor:
        if not 1 <= active_groups <= self.n_groups:
            raise ValueError(f"active_groups must be in 1..{self.n_groups}, got {active_groups}")
        latents[..., int(self.group_ends[active_groups - 1]) :] = 0
        return latents
