"""TopKSAE (Gao et al. 2024; SAE_REFERENCE.md §3), and the machinery its family shares.

    x_c = x - b_dec;  z = W_enc x_c + b_enc;  f = ReLU on the k largest z per token, 0 elsewhere
    x_hat = b_dec + f @ W_dec;   loss = mean_t ||x - x_hat||^2 + aux_k_coef * AuxK

Exactly k latents are selected per token and at most k are non-zero (ReLU is applied to the kept
values, as in OpenAI's code and SAELens). BatchTopK, Matryoshka and the routed SAEs subclass this
and change only the selection (`select`), the decoding (`_decode_out`), the reconstruction error
(`_recon_error`) or the input (routing).

Loss normalisation: `mse` is the reference's plain ||x - x_hat||^2 summed over d_in, averaged over
tokens, in normalised units (E||x|| = sqrt(d_in)); `fvu` (batch mean, detached) is logged beside it.

Speed: one dense GEMM (the encoder's forward) plus work proportional to the kept entries: on the
sparse path the pre-activations are computed without autograd and the kept ones re-enter the graph
through `gather_preacts`, whose backward is sparse, and decoding is an embedding_bag
(sae/sparse_decode.py). `decode_impl="dense"` keeps the textbook GEMM path; both agree in value and
gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.auxk import auxk_global_share, auxk_loss
from sae.base import BaseSAE, SAEConfig, default_aux_k, kaiming_unit_rows
from sae.collective import GlobalBatch
from sae.registry import register
from sae.selection import Selection, cpu_matmul_dtype, encode_topk, select_topk
from sae.sparse_decode import decode_selected, densify, gather_preacts
from sae.squared_error import centred_sum_of_squares, squared_error_sum

# decode_impl="auto": the sparse path from this many latents up, per device type. CPU: measured with
# bench/bench_sae_decode.py (bench/RESULTS.md), sparse wins at every size tried, from 1024 latents
# and 256 tokens to 12288 latents and 4096 tokens. CUDA: not measured yet (`--device cuda` does it);
# sparse until a measurement says otherwise.
AUTO_SPARSE_MIN_LATENTS = {"cpu": 0, "cuda": 0}

# The CPU encoder without a [B, M] matrix (`encode_topk`) where the GEMM runs in these dtypes: in bf16
# the whole-matrix GEMM spent much of its time writing z to memory, and the blocks win (a TopK step 1.11x
# at 3072 and 12,288 latents); in float32 the GEMM is compute-bound and the blocks or the bias in the
# top-k won nothing (1-3% slower: bench/RESULTS.md "The encoder GEMM and the top-k in blocks of rows").
FUSED_ENCODE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16,)


@register("TopKSAE", "topk")
class TopKSAE(BaseSAE):
    sparse_acts = True
    ratio_terms = ("auxk",)
    bf16_auto = True  # quality-checked (bench/RESULTS.md "bf16 quality check"); the family inherits it
    recon_name = "mse"  # name of the optimised reconstruction term in `loss`

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        w = kaiming_unit_rows(self.d_sae, self.d_in)
        self.W_enc = nn.Parameter(w.clone())  # [d_sae, d_in], tied to the decoder at init
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(w)  # [d_sae, d_in], unit rows
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        self.decode_impl = cfg.decode_impl  # may be changed at any time: speed only

    @property
    def impl(self) -> str:
        """The decode path in use: "sparse" or "dense" ("auto": by device type and dictionary size)."""
        if self.decode_impl == "auto":
            threshold = AUTO_SPARSE_MIN_LATENTS.get(self.W_dec.device.type, 0)
            return "sparse" if self.d_sae >= threshold else "dense"
        return self.decode_impl

    # ---- the steps a subclass may change ---------------------------------------------------
    def select(self, z: Tensor) -> Selection:
        """Which entries of the pre-activations z [B, d_sae] are kept (no gradient)."""
        return select_topk(z, self.cfg.k)

    def _decode_out(self, sel: Selection, vals: Tensor) -> dict[str, Tensor]:
        """Kept values -> {"sae_out": [B, d_in]} in normalised units."""
        return {"sae_out": decode_selected(sel, vals, self.W_dec, self.impl) + self.b_dec}

    def _recon_error(self, target: Tensor, recon: Tensor) -> Tensor:
        """The optimised reconstruction term: mean over tokens of ||target - recon||^2."""
        return squared_error_sum(target, recon) / target.shape[0]

    # ---- encode / forward ----------------------------------------------------------------
    def encode_selection(self, xn: Tensor, keep_preacts: bool = True,
                         ) -> tuple[Selection, Tensor, Tensor | None, Tensor, Tensor | None]:
        """Normalised x [B, d_in] -> (selection, kept values [N] after ReLU, pre-activations z
        [B, d_sae] or None, centred input x_c [B, d_in], centre). centre is b_dec where x_c = xn - b_dec
        was computed without b_dec's graph (the sparse path on data, see `gather_preacts`), for
        every later `gather_preacts` of this x_c to pass on; else None (x_c carries it).
        keep_preacts=False: the caller needs no z, and where the fused encoder applies (`_fused_encode`)
        none is made (z is None)."""
        centre = None
        sparse_grad = self.impl == "sparse" and torch.is_grad_enabled()
        if sparse_grad and not xn.requires_grad and self.b_dec.requires_grad:
            centre, x_c = self.b_dec, xn - self.b_dec.detach()
        else:
            x_c = xn - self.b_dec
        fused = self._fused_select(x_c) if not keep_preacts and self._fused_encode(xn) else None
        if fused is not None:
            vals = torch.relu(gather_preacts(None, fused, x_c, self.W_enc, self.b_enc, centre))
            return fused, vals, None, x_c, centre
        if sparse_grad:
            with torch.no_grad():  # the kept entries re-enter autograd through gather_preacts
                z = F.linear(x_c, self.W_enc, self.b_enc)
        else:
            z = F.linear(x_c, self.W_enc, self.b_enc)
        sel = self.select(z.detach())
        vals = torch.relu(gather_preacts(z, sel, x_c, self.W_enc, self.b_enc, centre))
        return sel, vals, z, x_c, centre

    def _fused_encode(self, xn: Tensor) -> bool:
        """Whether the fused encoder (the GEMM and the selection in blocks of rows, no [B, d_sae] matrix:
        `_fused_select`) may serve this forward: the sparse path, on the CPU, where the GEMM runs in a
        dtype of FUSED_ENCODE_DTYPES."""
        return self.impl == "sparse" and xn.device.type == "cpu" and cpu_matmul_dtype(xn) in FUSED_ENCODE_DTYPES

    def _fused_select(self, x_c: Tensor) -> Selection | None:
        """`select` computed from x_c [B, d_in] without the pre-activations z, or None where this SAE's
        selection needs z. A subclass that changes `select` changes this too (or keeps None)."""
        if type(self).select is not TopKSAE.select:
            return None
        return encode_topk(x_c, self.W_enc, self.b_enc, self.cfg.k)

    def _forward_normalised(self, xn: Tensor, dense_acts: bool = True) -> dict[str, Tensor]:
        sel, vals, z, x_c, centre = self.encode_selection(xn, keep_preacts=dense_acts)
        out = {"target": xn, **self._decode_out(sel, vals)}
        out.update(sae_in=x_c, sel_idx=sel.cols, sel_val=vals, sel_rows=sel.rows, sel_offsets=sel.offsets)
        if z is not None:
            out["pre_acts"] = z
        if centre is not None:
            out["sae_in_centre"] = centre
        if dense_acts:
            out["feature_acts"] = densify(sel, vals)
        if type(self).select is TopKSAE.select:
            k = self.cfg.k  # per-token TopK: exactly k per row, so [B, k] views exist
            out["top_idx"], out["top_val"] = sel.cols.view(-1, k), vals.view(-1, k)
        return out

    def _prepare(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.normalise(x.to(self.W_dec.dtype))

    def forward(self, x: Tensor, dense_acts: bool = True) -> dict[str, Tensor]:
        """Raw x [B, d_in] -> dict (normalised units): `target`, `sae_out` [B, d_in];
        `feature_acts` [B, d_sae] unless dense_acts=False; the kept entries as a flat row-major
        list `sel_idx`, `sel_val`, `sel_rows` [N] with `sel_offsets` [B] (per-token TopK also
        `top_idx`, `top_val` [B, k]); `sae_in` [B, d_in] and `pre_acts` [B, d_sae] for AuxK, the
        latter unless dense_acts=False let the fused CPU encoder skip it (`_fused_encode`: AuxK then
        computes the dead latents' own)."""
        if x.dim() != 2:
            raise ValueError(f"forward takes a batch of tokens [B, {self.d_in}], got shape {tuple(x.shape)}")
        return self._forward_normalised(self._prepare(x), dense_acts)

    def encode(self, x: Tensor) -> Tensor:
        """Raw x [..., d_in] -> latents [..., d_sae]."""
        xn = self._prepare(x)
        lead = xn.shape[:-1]
        sel, vals, *_ = self.encode_selection(xn.reshape(-1, self.d_in), keep_preacts=False)
        return densify(sel, vals).reshape(*lead, self.d_sae)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [..., d_sae] -> reconstruction [..., d_in] in raw units."""
        return (latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec) / self.input_scale[0]

    def reconstruct(self, x: Tensor) -> Tensor:
        """Raw x [..., d_in] -> raw reconstruction [..., d_in], decoding only the kept latents."""
        xn = self._prepare(x)
        out = self._forward_normalised(xn.reshape(-1, self.d_in), dense_acts=False)
        return (out["sae_out"] / self.input_scale[0]).reshape(xn.shape)

    # ---- training hooks --------------------------------------------------------------------
    def loss(
        self, out: dict[str, Tensor], *, l1_coefficient: float = 0.0, dead_mask: Tensor | None = None
    ) -> dict[str, Tensor]:
        """-> {`mse` (or `nmse` for routed SAEs), `auxk`, `total`, `fvu` (detached)}.
        l1_coefficient is ignored: sparsity is structural."""
        recon = self._recon_error(out["target"], out["sae_out"])
        terms = {self.recon_name: recon, **self._log_terms(out, recon if self.recon_name == "mse" else None)}
        aux = self._auxk(out, dead_mask)
        terms.update(auxk=aux, total=recon + self.cfg.aux_k_coef * aux)
        return terms

    def _auxk(self, out: dict[str, Tensor], dead_mask: Tensor | None) -> Tensor:
        return auxk_loss(out, self.W_enc, self.b_enc, self.W_dec, dead_mask, default_aux_k(self.cfg), self.impl)

    @torch.no_grad()
    def _log_terms(self, out: dict[str, Tensor], mse: Tensor | None = None) -> dict[str, Tensor]:
        """FVU (and the MSE where the optimised term is another); mse: the batch's mean over tokens of
        ||target - sae_out||^2 where the loss computed it already (times the tokens, FVU's numerator)."""
        target, recon = out["target"].detach(), out["sae_out"].detach()
        err = squared_error_sum(target, recon) if mse is None else mse.detach() * target.shape[0]
        terms = {"fvu": err / centred_sum_of_squares(target).clamp_min(1e-12)}
        if self.recon_name != "mse":
            terms["mse"] = err / target.shape[0]
        return terms

    def fired(self, out: dict[str, Tensor]) -> Tensor:
        """[d_sae] bool: latents non-zero for some token of the batch (read from the kept entries)."""
        if "sel_idx" not in out:
            return super().fired(out)
        # A scatter of the kept values rather than a boolean mask of the kept columns: a mask's output
        # size depends on the data, which costs a host-device sync on a GPU. Kept values are >= 0 (ReLU).
        vals = out["sel_val"].detach()
        return torch.zeros(self.d_sae, dtype=vals.dtype, device=vals.device).index_add_(0, out["sel_idx"], vals) > 0

    def global_ratio_terms(self, out: dict[str, Tensor], losses: dict[str, Tensor], terms: dict[str, Tensor],
                           g: GlobalBatch) -> dict[str, Tensor]:
        """AuxK's normaliser is the global batch's: swap the token-weighted local term for this rank's share."""
        if "auxk" not in losses:
            return terms
        share = auxk_global_share(out, losses["auxk"], g)
        total = terms["total"] + self.cfg.aux_k_coef * (share - g.token_weight * losses["auxk"])
        return {**terms, "auxk": share, "total": total}

    def to_saelens(self) -> tuple[str, dict[str, Tensor], dict[str, Any]]:
        """SAELens "topk" (its encoder as [d_in, d_sae]: ours keeps nn.Linear's [d_sae, d_in])."""
        p = self._saelens_folded(transpose=True)
        return "topk", {k: p[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, \
            {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
