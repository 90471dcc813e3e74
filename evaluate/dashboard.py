"""A static HTML feature browser for one run (one self-contained file; opens offline).

For a sample of latents (grouped by Matryoshka group where there are groups): the top-activating
contexts over the whole held-out split, with the token highlighted, the latent's firing density,
and, for causal LMs, the output tokens its decoder direction promotes and suppresses most: its
decoder row through the unembedding, with the final norm's gain folded in (direct logit
attribution as Neuronpedia shows it, through TransformerLens's `fold_ln`; the normalisation's
division by the norm of the whole residual is a positive factor and does not change the order).
Contexts are shown as the tokenizer decodes them: each token's piece is what it adds to the
decoded text (so WordPiece's `##` joins words, byte-level BPE's spaces and multi-byte characters
come out right).
"""

from __future__ import annotations

import html
import os
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


# Attribute paths of the norm applied before the LM head, in the families harvest knows.
FINAL_NORM_PATHS = ("model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                    "model.decoder.final_layer_norm", "model.final_layernorm")


def output_directions(model: torch.nn.Module) -> Tensor | None:
    """The unembedding [V, d] with the final norm's per-dimension gain folded in (Gemma's norms scale
    by 1 + weight), or None when the model has no output embedding (an encoder)."""
    get_head = getattr(model, "get_output_embeddings", None)  # transformers models; absent on plain modules
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    w_u = head.weight.detach().float()
    for path in FINAL_NORM_PATHS:
        try:
            norm = model.get_submodule(path)
        except AttributeError:
            continue
        gain = getattr(norm, "weight", None)
        if isinstance(gain, Tensor) and gain.shape == (w_u.shape[1],):
            gain = gain.detach().float() + (1.0 if type(norm).__name__.startswith("Gemma") else 0.0)
            return w_u * gain
    return w_u


def logit_effects(sae: BaseSAE, unembed: Tensor, features: list[int], n: int = 8) -> tuple[Tensor, Tensor]:
    """([F, n] token ids each feature's decoder row raises most, [F, n] ids it lowers most: lowest
    first). unembed: [V, d], e.g. `output_directions(model)`."""
    w = sae.W_dec[features].detach().float()  # [F, d]
    logits = w @ unembed.float().T  # [F, V]
    return logits.topk(n, dim=1).indices, logits.topk(n, dim=1, largest=False).indices


def token_pieces(ids: list[int], tokenizer: PreTrainedTokenizerBase | None) -> list[str]:
    """What each token adds to `tokenizer.decode(ids)`, in order; the pieces join to the decoded
    text. A token whose bytes complete a character that earlier tokens began (byte-level BPE) takes
    the whole character, and those earlier tokens show nothing. Without a tokenizer: "[id]"."""
    if tokenizer is None:
        return [f"[{int(t)}]" for t in ids]
    pieces: list[str] = []
    for i in range(len(ids)):
        now = str(tokenizer.decode(ids[: i + 1]))
        done = "".join(pieces)
        if not now.startswith(done):  # an earlier piece changed (a completed character): cut back to the agreement
            pieces = _trim(pieces, len(os.path.commonprefix([done, now])))
            done = "".join(pieces)
        pieces.append(now[len(done):])
    return pieces


def _trim(pieces: list[str], n: int) -> list[str]:
    """`pieces` cut so that they join to their first `n` characters."""
    out, used = [], 0
    for p in pieces:
        take = max(min(len(p), n - used), 0)
        out.append(p[:take])
        used += take
    return out


def write_dashboard(path: str | Path, sae: BaseSAE, cache: Cache, result: dict, cfg: Config,
                    tokenizer: PreTrainedTokenizerBase | None = None, unembed: Tensor | None = None) -> Path:
    """Write the HTML page for `sae` on `cache` (result: the run's eval dict); returns its path."""
    ev = cfg.evaluate
    density = torch.tensor(result["feature_density"], dtype=torch.float64)
    features = choose_features(density, ev.dashboard_features)
    vals, rows = top_activations(sae, cache, features, ev.dashboard_contexts, ev.batch_size)
    toks = heldout_tokens(cache)
    effects = logit_effects(sae, unembed, features) if unembed is not None else None
    groups = _groups(sae.cfg.group_sizes, sae.cfg.latent_size)
    parts = [_HEAD.format(title=html.escape(f"{result['run']}: feature dashboard"))]
    # contexts come from the whole held-out split; densities from the tokens measured (evaluate.max_tokens)
    split_rows, measured = cache.num_rows("heldout"), int(result["metrics"]["tokens"])
    densities = "" if measured >= split_rows else f"; firing densities over the first {measured:,} of them"
    parts.append(f"<h1>{html.escape(result['run'])}</h1><p>{html.escape(result['sae']['type'])}, block(s) "
                 f"{result['sae']['layers']}, {len(features)} features shown of {len(density)}; contexts are the "
                 f"top activations over {split_rows:,} held-out tokens{densities}.</p>")
    if effects is not None:
        parts.append("<p>Promoted / suppressed: the output tokens whose logits the latent's decoder direction raises / "
                     "lowers most (through the unembedding, the final norm's gain folded in).</p>")
    for g_lo, g_hi in groups:
        members = [i for i, f in enumerate(features) if g_lo <= f < g_hi]
        if len(groups) > 1:
            parts.append(f"<h2>group latents {g_lo}..{g_hi - 1}</h2>")
        for i in members:
            parts.append(_feature_html(features[i], float(density[features[i]]), vals[i], rows[i], toks, tokenizer,
                                       None if effects is None else (effects[0][i], effects[1][i])))
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
    """One output token as the tokenizer decodes it alone (repr: leading spaces show)."""
    return repr(tokenizer.decode([int(tid)])) if tokenizer is not None else f"[{int(tid)}]"


def _context(row: int, toks: dict[str, Tensor], tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The stored tokens within WINDOW positions of `row` in its sequence, decoded, the row's own
    token highlighted."""
    seq, pos = int(toks["sequence"][row]), int(toks["position"][row])
    sel = (toks["sequence"] == seq) & ((toks["position"] - pos).abs() <= WINDOW)
    order = toks["position"][sel].argsort()
    positions = toks["position"][sel][order].tolist()
    pieces = token_pieces(toks["token_ids"][sel][order].tolist(), tokenizer)
    out = []
    for p, piece in zip(positions, pieces, strict=True):
        text = html.escape(piece)
        out.append(f'<span class="hit">{text}</span>' if p == pos else f"<span>{text}</span>")
    return "".join(out)


def _feature_html(feature: int, density: float, vals: Tensor, rows: Tensor, toks: dict[str, Tensor],
                  tokenizer: PreTrainedTokenizerBase | None, effects: tuple[Tensor, Tensor] | None) -> str:
    lines = [f'<section class="feature" data-feature="{feature}"><h3>latent {feature}</h3>'
             f'<p class="density">fires on {density:.3%} of held-out tokens</p>']
    if effects is not None:
        for cls, label, ids in (("promoted", "promotes", effects[0]), ("suppressed", "suppresses", effects[1])):
            words = "".join(f"<code>{html.escape(_token_text(t, tokenizer))}</code> " for t in ids.tolist())
            lines.append(f'<p class="{cls}">{label}: {words}</p>')
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
p.promoted code {{ background: #def; margin-right: 0.3em; }}
p.suppressed code {{ background: #fdd; margin-right: 0.3em; }}
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
