"""Export a saved SAE in SAELens' on-disk format (`cfg.json` + `sae_weights.safetensors`, plus
`sparsity.safetensors` when the run has been evaluated), loadable by `sae_lens.SAE.load_from_disk`.

SAELens applies an SAE to raw activations with no normaliser ("normalize_activations": "none"),
computing (x - b_dec) @ W_enc + b_enc with W_enc [d_in, d_sae] and f @ W_dec + b_dec. Ours scales
the input by s (`input_scale`) first and divides the output by s, so the scale is folded in:
W_enc' = s W_enc, W_dec' = W_dec / s, b_dec' = b_dec / s (pre-activations, hence thresholds, are
unchanged). Each SAE class says how its weights map (`BaseSAE.to_saelens`); one without a SAELens
counterpart (routed SAEs, any new architecture that does not say) is refused with its name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

import durable
from sae import load_sae
from train.layout import EVAL_FILE

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
def export_saelens(sae_dir: str | Path, out: str | Path, density: list[float] | None = None) -> Path:
    """Write `out/` (created) from the SAE folder `sae_dir`. `density` [d_sae] (firing share on the
    held-out split) becomes SAELens' log10 `sparsity` file; by default it is read from the run's
    eval.json next to `sae_dir` when there is one."""
    sae, meta = load_sae(sae_dir)
    arch, tensors, extra = sae.to_saelens()
    layers = list(sae.cfg.layers) or list(meta.get("layers", []))
    cfg = {
        "architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {
            "model_name": _model_name(meta),
            # our "layer L" is the output of block L: TransformerLens' resid_post of block L
            "hook_name": f"blocks.{layers[0]}.hook_resid_post" if layers else None,
            "exported_from": str(sae_dir), "source_type": type(sae).type_name, "input_scale_folded": True,
        },
    }
    cfg.update(extra)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in tensors.items()}
    durable.write_via(out / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp)))
    durable.atomic_write_text(out / CFG_FILE, json.dumps(cfg, indent=2))
    if density is None:
        density = _density_from_eval(Path(sae_dir).parent / EVAL_FILE)
    if density is not None:
        logd = torch.tensor([math.log10(d) if d > 0 else -10.0 for d in density], dtype=torch.float32)
        durable.write_via(out / SPARSITY_FILE, lambda tmp: save_file({"sparsity": logd}, str(tmp)))
    return out


def _model_name(meta: dict) -> str | None:
    lm = meta.get("language_model")
    if isinstance(lm, dict):
        return lm.get("requested") or lm.get("resolved")
    return lm if isinstance(lm, str) else None


def _density_from_eval(path: Path) -> list[float] | None:
    if not path.is_file():
        return None
    try:
        density = json.loads(path.read_text()).get("feature_density")
    except json.JSONDecodeError:
        return None
    return density if isinstance(density, list) else None
