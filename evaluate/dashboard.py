"""A static HTML feature browser for one run (one self-contained file; opens offline).

For a sample of latents (grouped by Matryoshka group where there are groups): the top-activating
contexts over the whole held-out split, with the token highlighted, the latent's firing density,
and, for causal LMs, the output tokens its decoder direction promotes most (direct logit
attribution through the unembedding, final norm ignored).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

import durable
from cache import Cache
from evaluate.downstream import heldout_tokens
from evaluate.heldout import iter_batches
from sae import BaseSAE
from settings import Config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

WINDOW = 8  # tokens of context each side


def choose_features(density: Tensor, n: int, seed: int = 0) -> list[int]:
    """A seeded sample of `n` latents that fire on the split (all of them if fewer), sorted."""
    alive = torch.nonzero(density > 0).flatten()
    if len(alive) <= n:
        return alive.tolist()
    g = torch.Generator().manual_seed(seed)
    return sorted(alive[torch.randperm(len(alive), generator=g)[:n]].tolist())


@torch.no_grad()
def top_activations(sae: BaseSAE, cache: Cache, features: list[int], k: int,
                    batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Over the whole held-out split: (values [F, k], global row index [F, k]) of each feature's
    k largest activations (rows in split order: shard by shard)."""
    idx = torch.tensor(features, dtype=torch.long)
    best_v = torch.full((len(features), k), -torch.inf)
    best_i = torch.full((len(features), k), -1, dtype=torch.long)
    offset = 0
    dtype = next(sae.parameters()).dtype
    for x in iter_batches(cache, list(sae.cfg.layers), batch_size):
        acts = sae.encode(x.to(dtype))[:, idx].T.float().cpu()  # [F, B]
        rows = torch.arange(offset, offset + acts.shape[1]).expand_as(acts)
        v = torch.cat([best_v, acts], dim=1)
        i = torch.cat([best_i, rows], dim=1)
        top = v.topk(min(k, v.shape[1]), dim=1)
        best_v, best_i = top.values, i.gather(1, top.indices)
        offset += acts.shape[1]
    return best_v, best_i


def promoted_tokens(sae: BaseSAE, unembed: Tensor, features: list[int], n: int = 6) -> Tensor:
    """[F, n] token ids whose logits each feature's decoder row raises most. unembed: [V, d]."""
    w = sae.W_dec[features].detach().float()  # [F, d]
    return (w @ unembed.float().T).topk(n, dim=1).indices


def write_dashboard(path: str | Path, sae: BaseSAE, cache: Cache, result: dict, cfg: Config,
                    tokenizer: PreTrainedTokenizerBase | None = None, unembed: Tensor | None = None) -> Path:
    """Write the HTML page for `sae` on `cache` (result: the run's eval dict); returns its path."""
    ev = cfg.evaluate
    density = torch.tensor(result["feature_density"], dtype=torch.float64)
    features = choose_features(density, ev.dashboard_features)
    vals, rows = top_activations(sae, cache, features, ev.dashboard_contexts, ev.batch_size)
    toks = heldout_tokens(cache)
    promoted = promoted_tokens(sae, unembed, features) if unembed is not None else None
    groups = _groups(sae.cfg.group_sizes, sae.cfg.latent_size)
    parts = [_HEAD.format(title=html.escape(f"{result['run']}: feature dashboard"))]
    parts.append(f"<h1>{html.escape(result['run'])}</h1><p>{html.escape(result['sae']['type'])}, block(s) "
                 f"{result['sae']['layers']}, {len(features)} features shown of {len(density)}; contexts are the "
                 f"top activations over {int(result['metrics']['tokens']):,} held-out tokens.</p>")
    for g_lo, g_hi in groups:
        members = [i for i, f in enumerate(features) if g_lo <= f < g_hi]
        if len(groups) > 1:
            parts.append(f"<h2>group latents {g_lo}..{g_hi - 1}</h2>")
        for i in members:
            parts.append(_feature_html(features[i], float(density[features[i]]), vals[i], rows[i], toks, tokenizer,
                                       None if promoted is None else promoted[i]))
    parts.append(_TAIL)
    path = Path(path)
    durable.atomic_write_text(path, "".join(parts))
    return path


def _groups(group_sizes: list[int] | None, m: int) -> list[tuple[int, int]]:
    if not group_sizes:
        return [(0, m)]
    out, lo = [], 0
    for s in group_sizes:
        out.append((lo, lo + s))
        lo += s
    return out


def _token_text(tid: int, tokenizer: PreTrainedTokenizerBase | None) -> str:
    if tokenizer is None:
        return f"[{tid}]"
    piece = tokenizer.convert_ids_to_tokens(int(tid))
    return str(piece).replace("Ġ", " ").replace("▁", " ")


def _context(row: int, toks: dict[str, Tensor], tokenizer: PreTrainedTokenizerBase | None) -> str:
    seq, pos = int(toks["sequence"][row]), int(toks["position"][row])
    sel = (toks["sequence"] == seq) & ((toks["position"] - pos).abs() <= WINDOW)
    order = toks["position"][sel].argsort()
    out = []
    for p, t in zip(toks["position"][sel][order].tolist(), toks["token_ids"][sel][order].tolist(), strict=True):
        text = html.escape(_token_text(t, tokenizer))
        out.append(f'<span class="hit">{text}</span>' if p == pos else f"<span>{text}</span>")
    return "".join(out)


def _feature_html(feature: int, density: float, vals: Tensor, rows: Tensor, toks: dict[str, Tensor],
                  tokenizer: PreTrainedTokenizerBase | None, promoted: Tensor | None) -> str:
    lines = [f'<section class="feature" data-feature="{feature}"><h3>latent {feature}</h3>'
             f'<p class="density">fires on {density:.3%} of held-out tokens</p>']
    if promoted is not None:
        words = ", ".join(html.escape(repr(_token_text(t, tokenizer))) for t in promoted.tolist())
        lines.append(f'<p class="promoted">promotes: {words}</p>')
    lines.append("<table>")
    for v, r in zip(vals.tolist(), rows.tolist(), strict=True):
        if r < 0 or v <= 0:
            continue
        lines.append(f'<tr><td class="act">{v:.3f}</td><td class="ctx">{_context(r, toks, tokenizer)}</td></tr>')
    lines.append("</table></section>")
    return "".join(lines)


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 70em; }}
section.feature {{ border: 1px solid #ccc; border-radius: 6px; padding: 0.5em 1em; margin: 0.8em 0; }}
td.act {{ font-family: monospace; padding-right: 1em; color: #555; }}
td.ctx {{ font-family: monospace; white-space: pre-wrap; }}
span.hit {{ background: #fd8; font-weight: bold; }}
#filter {{ margin-bottom: 1em; }}
</style></head><body>
<input id="filter" placeholder="latent number" aria-label="filter by latent number">
"""

_TAIL = """
<script>
document.getElementById("filter").addEventListener("input", function (e) {
  var q = e.target.value.trim();
  document.querySelectorAll("section.feature").forEach(function (s) {
    s.style.display = (!q || s.dataset.feature === q) ? "" : "none";
  });
});
document.body.dataset.features = document.querySelectorAll("section.feature").length;
</script>
</body></html>
"""
