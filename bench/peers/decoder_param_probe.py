"""Why does SAELens's TopK reach a lower FVU than ours at the same lr? A probe of its parametrisation.

SAELens starts W_dec's rows (and W_enc = W_dec^T) at norm 0.1 and lets the decoder norm float (no
unit-norm projection), selecting on pre-activations rescaled by the decoder norms. This trains our
TopK in the peer benchmark's setting (bench/peers/ours_worker.py: same cache, rows, lr, one pass) with
that parametrisation patched in after our own initialisation:
- `--init-norm s` scales W_enc and W_dec by s after init (ours: 1, unit rows);
- `--free-norm` turns off our unit-norm projection (`training.normalize_decoder=false`);
- `--rescale` selects the top k of z * ||W_dec row|| (SAELens's `rescale_acts_by_decoder_norm`).
A probe, not a trainer option: results in bench/RESULTS.md ("Against the public trainers").

    .venv/bin/python bench/peers/decoder_param_probe.py --init-norm 0.1 --free-norm --lr 4e-4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(1, str(HERE.parents[1]))

import torch  # noqa: E402
from ours_worker import build_config  # noqa: E402
from runmeter import COMMON_LR  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init-norm", type=float, default=1.0)
    p.add_argument("--free-norm", action="store_true")
    p.add_argument("--rescale", action="store_true")
    p.add_argument("--lr", type=float, default=COMMON_LR)
    p.add_argument("--cache", default="cache/minilm-default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=HERE.parents[1] / "bench" / "_work" / "probe")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import train.run as run_mod
    from sae.selection import select_topk
    from sae.topk import TopKSAE

    own_init = run_mod.init_from_sample

    def init_then_scale(model, x, max_rows=4096):
        own_init(model, x, max_rows)
        with torch.no_grad():
            model.W_dec.mul_(a.init_norm)
            model.W_enc.mul_(a.init_norm)

    run_mod.init_from_sample = init_then_scale
    if a.rescale:
        TopKSAE.select = lambda self, z: select_topk(z * self.W_dec.detach().norm(dim=1), self.cfg.k)

    cfg = build_config("topk", a.cache, 2, 4096, a.runs, None, a.lr)
    cfg.training.normalize_decoder = not a.free_norm
    cfg.training.run_name = f"probe-{a.init_norm:g}-{'free' if a.free_norm else 'unit'}-{a.lr:g}"
    result = run_mod.train(cfg, say=lambda msg: None)
    heldout = json.loads((result.run_dir / "train_summary.json").read_text())["heldout"]
    print(json.dumps({"init_norm": a.init_norm, "free_norm": a.free_norm, "rescale": a.rescale, "lr": a.lr,
                      "fvu": heldout["fvu"], "l0": heldout["l0"], "dead_fraction": heldout["dead_fraction"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
