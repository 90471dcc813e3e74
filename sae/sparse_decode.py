"""Encoder values and decoder sums for the kept entries only, with backward passes that stay sparse.

A TopK-family step needs one dense GEMM, the encoder's forward (every pre-activation is a candidate).
Everything after the selection touches N = (kept entries) rows of the weights:
- `gather_preacts`: the kept pre-activations z[rows, cols] as a differentiable function of the
  encoder input, W_enc and b_enc. Its backward is
      d x_c[b]   = sum_{n in row b}     g[n] * W_enc[cols[n]]     (an embedding_bag)
      d W_enc[m] = sum_{n: cols[n] = m} g[n] * x_c[rows[n]]       (an embedding_bag over the
                                                                   entries sorted by latent)
      d b_enc[m] = sum_{n: cols[n] = m} g[n]                      (index_add)
  instead of two dense [B, M] x [M, d] GEMMs. When the input is data (x_c = x - b_dec, x without
  gradient), d x_c is only ever summed over the batch into b_dec's gradient, which is
      d b_dec    = -(d b_enc) @ W_enc                             (one [M] x [M, d] product)
  so that [B, d] embedding_bag is skipped (`centre=`).
- `decode_selected`: x_hat[b] = sum_{n in row b} vals[n] * W_dec[cols[n]] via `embedding_bag`
  (mode "sum", per_sample_weights); d vals are gather-dots (embedding_bag's own backward) and
      d W_dec[m] = sum_{n: cols[n] = m} vals[n] * g[rows[n]]       (`scatter_rows` again)
  touches only the selected rows. On the CPU, where the C kernels of `sae.native` build, d vals comes
  from `native.gather_dot` instead (`_NativeDecode`). `impl="dense"` scatters into [B, M] and uses a GEMM instead;
  both give the same values and gradients (tests/sae/test_sparse_decode.py).
Both weight gradients group the entries by latent with one sort per selection (`Selection.by_latent`).
Bias terms (b_dec) are added by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from sae import native
from sae.selection import Selection

IMPLS = ("sparse", "dense")


def scatter_rows(sel: Selection, weights: Tensor, source: Tensor) -> Tensor:
    """out[m] = sum over entries n with cols[n] = m of weights[n] * source[rows[n]].

    sel: N entries; weights [N]; source [B, d] -> [M, d]. Sorting the entries by latent turns this
    into an embedding_bag with one bag per latent (empty bags give zero rows), which on CPU is
    several times faster than index_add over materialised [N, d] products. The sort is the
    selection's (`Selection.by_latent`), shared by every gradient of the step that needs it."""
    order, starts = sel.by_latent
    w = weights[order].to(source.dtype)
    return F.embedding_bag(sel.rows[order], source, starts, mode="sum", per_sample_weights=w)


class _GatherPreacts(torch.autograd.Function):
    """z[rows, cols] with a sparse backward to (x_c, W_enc, b_enc); z itself gets no gradient."""

    @staticmethod
    def forward(ctx, z, x_c, w_enc, b_enc, centre, sel):  # noqa: D401
        ctx.save_for_backward(x_c, w_enc)
        ctx.sel = sel  # not saved_tensors: its tensors carry no gradient, and it caches its sort
        kept = sel.values if z is None else sel.values_for(z)
        return z[sel.rows, sel.cols] if kept is None else kept.clone()

    @staticmethod
    @once_differentiable  # a second derivative through these sums is not implemented: refuse, not guess
    def backward(ctx, grad):
        x_c, w_enc = ctx.saved_tensors
        sel = ctx.sel
        cols, offsets = sel.cols, sel.offsets
        g_x = g_w = g_b = g_centre = None
        if ctx.needs_input_grad[1]:
            g_x = F.embedding_bag(cols, w_enc, offsets, mode="sum", per_sample_weights=grad.to(w_enc.dtype))
        if ctx.needs_input_grad[2]:
            g_w = scatter_rows(sel, grad, x_c).to(w_enc.dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # Summed in float32 at least (~B*k/M terms a latent; a bf16 sum of them lost a third of b_dec's
            # gradient in a model cast wholly to bf16); autograd casts to each parameter's dtype.
            acc = torch.promote_types(w_enc.dtype, torch.float32)
            per_latent = torch.zeros(sel.n_latents, dtype=acc, device=grad.device)
            per_latent.index_add_(0, cols, grad.to(acc))
            g_b = per_latent if ctx.needs_input_grad[3] else None
            if ctx.needs_input_grad[4]:
                g_centre = -(per_latent @ w_enc.to(acc))
        return None, g_x, g_w, g_b, g_centre, None


def gather_preacts(z: Tensor | None, sel: Selection, x_c: Tensor, w_enc: Tensor, b_enc: Tensor,
                   centre: Tensor | None = None) -> Tensor:
    """The kept pre-activations [N] of z = x_c @ w_enc.T + b_enc (`sel.values` where the selection
    kept them from this very z, or where z is None: a selection that computed them without z,
    `sae.selection.encode_topk`; else read from z).

    z [B, M]: if it carries gradient (the dense path), this is plain indexing and autograd runs the
    dense backward; if not (the sparse path), gradient reaches x_c [B, d], w_enc [M, d] and b_enc [M]
    through the sparse backward above. centre [d]: x_c was computed as x - centre from an x without
    gradient (x_c itself carries none); centre then gets its gradient without the [B, d] one of x_c."""
    if z is None and sel.values is None:
        raise ValueError("gather_preacts: without z the selection must carry the kept values (sel.values)")
    if z is not None and z.requires_grad:
        return z[sel.rows, sel.cols]
    if centre is not None and x_c.requires_grad:
        raise ValueError("gather_preacts: pass centre only with an x_c that carries no gradient (x - centre, "
                         "x data); an x_c with gradient already carries centre's")
    return _GatherPreacts.apply(z, x_c, w_enc, b_enc, centre, sel)


class _DecoderGrad(torch.autograd.Function):
    """The identity on the decoded rows [B, d], whose backward also gives W_dec its gradient,
    d W_dec[m] = sum_{n: cols[n] = m} vals[n] * grad[rows[n]], by `scatter_rows` (an embedding_bag over
    the selection's sort, shared with the encoder's gradient). embedding_bag's own weight gradient
    (a per-index accumulation that sorts the indices again) cost 3-4x as much on the CPU; its gradient
    to the per-sample weights (the kept values) is still the one autograd computes. The output is a
    copy, not a view, so that callers may modify it in place as they could embedding_bag's."""

    @staticmethod
    def forward(ctx, out, w_dec, vals, sel):  # noqa: D401
        ctx.save_for_backward(vals)
        ctx.sel, ctx.w_dtype = sel, w_dec.dtype
        return out.clone()

    @staticmethod
    @once_differentiable  # W_dec's gradient depends on vals: a second derivative would need that term
    def backward(ctx, grad):
        (vals,) = ctx.saved_tensors
        g_w = scatter_rows(ctx.sel, vals, grad).to(ctx.w_dtype) if ctx.needs_input_grad[1] else None
        return grad, g_w, None, None


def densify(sel: Selection, vals: Tensor) -> Tensor:
    """Kept values [N] -> dense latents [B, M] (differentiable in vals)."""
    out = vals.new_zeros(sel.n_rows, sel.n_latents)
    return out.index_put((sel.rows, sel.cols), vals)


class _NativeDecode(torch.autograd.Function):
    """The sparse decode with its whole backward written here: d vals by `sae.native.gather_dot` (a
    dot product per kept entry, 2.2x embedding_bag's per-sample-weights backward on the CPU) and
    d W_dec by `scatter_rows`. Used on the CPU where the C kernels build, in float32."""

    @staticmethod
    def forward(ctx, vals, w_dec, sel):  # noqa: D401
        ctx.save_for_backward(vals, w_dec)
        ctx.sel = sel
        return F.embedding_bag(sel.cols, w_dec, sel.offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    @once_differentiable  # W_dec's gradient depends on vals and vals' on W_dec: no second derivative here
    def backward(ctx, grad):
        vals, w_dec = ctx.saved_tensors
        sel = ctx.sel
        g_vals = g_w = None
        if ctx.needs_input_grad[0]:
            g_vals = native.gather_dot(grad, w_dec, sel.cols, sel.offsets)
            if g_vals is None:  # a gradient of another dtype: the definition, one [N, d] product
                g_vals = (grad[sel.rows] * w_dec[sel.cols]).sum(dim=1)
        if ctx.needs_input_grad[1]:
            g_w = scatter_rows(sel, vals, grad).to(w_dec.dtype)
        return g_vals, g_w, None


def _native_decode_applies(vals: Tensor, w_dec: Tensor) -> bool:
    return (w_dec.device.type == "cpu" and w_dec.dtype == torch.float32 and vals.device.type == "cpu"
            and native.library() is not None)


def decode_selected(sel: Selection, vals: Tensor, w_dec: Tensor, impl: str = "sparse") -> Tensor:
    """sum_n vals[n] * w_dec[cols[n]] per row, without bias: vals [N], w_dec [M, d] -> [B, d]."""
    if impl == "sparse" and torch.is_grad_enabled() and _native_decode_applies(vals, w_dec):
        return _NativeDecode.apply(vals.to(w_dec.dtype), w_dec, sel)
    if impl == "sparse":
        out = F.embedding_bag(sel.cols, w_dec.detach(), sel.offsets, mode="sum",
                              per_sample_weights=vals.to(w_dec.dtype))
        if w_dec.requires_grad and torch.is_grad_enabled():
            out = _DecoderGrad.apply(out, w_dec, vals.detach(), sel)
        return out
    if impl == "dense":
        return densify(sel, vals).to(w_dec.dtype) @ w_dec
    raise ValueError(f"decode impl must be one of {IMPLS}, got {impl!r}")
