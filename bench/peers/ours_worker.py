"""Peer-benchmark worker (runs in .venv): the project's own trainer on one architecture.

Training goes through the project's Python API exactly as `python -m train --model <arch>` would
(the CLI's own config resolution: the preset in configs/sae/, then configs/default.yaml, then
the overrides below for the common setting), reading the cache with its own loader. The
row order it sees is the one bench_peers.py wrote to the stream file from the same loader settings.
Evaluation: the saved SAE, reloaded from disk, in inference mode on the held-out rows.

    .venv/bin/python bench/peers/ours_worker.py --arch topk --work bench/_work/peers --out result.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(1, str(ROOT))

import torch  # noqa: E402
from heldout_eval import evaluate  # noqa: E402
from runmeter import COMMON_LR, Gate, StepClock, peak_rss_bytes, set_threads, worker_parser, write_result  # noqa: E402
from streamfile import heldout_chunks, load_meta  # noqa: E402

GROUP_SIZES = [192, 384, 768, 1728]  # Matryoshka groups of the common setting
ARCHES = ("topk", "batchtopk", "matryoshka")


def common_overrides(arch: str, cache: str, layer: int, batch_size: int, runs_dir: Path,
                     steps: int | None = None, lr: float = COMMON_LR, dtype: str = "float32") -> list[str]:
    """The common setting (ANCHORS.md) on top of the trainer's defaults; everything else is its own.
    One pass (`num_epochs=1`), or the first `steps` batches of it for a quick run."""
    out = [
        f"training.cache={cache}", f"model.layer={layer}", "model.latent_size=3072", "model.k=32",
        f"training.batch_size={batch_size}", f"training.lr={lr!r}", "training.lr_schedule=constant",
        "training.num_warmup_steps=0", "training.num_epochs=1", "training.tokens=null",
        f"training.steps={'null' if steps is None else steps}",
        f"training.dtype={dtype}", "training.device=cpu", "training.seed=0", "wandb.use_wandb=false",
        f"training.output_dir={runs_dir}", f"training.run_name=ours-{arch}-{dtype}",
    ]
    if arch == "matryoshka":
        out.append(f"model.group_sizes=[{','.join(map(str, GROUP_SIZES))}]")
    return out


def build_config(arch: str, cache: str, layer: int, batch_size: int, runs_dir: Path, steps: int | None = None,
                 lr: float = COMMON_LR, dtype: str = "float32"):
    """The resolved Config, through the training CLI's own argument and config handling."""
    from train.__main__ import build_config as cli_build_config
    from train.__main__ import parse_args

    overrides = common_overrides(arch, cache, layer, batch_size, runs_dir, steps, lr, dtype)
    args = parse_args(["--model", arch, "--overwrite", *overrides])
    return cli_build_config(args)


def main(argv: list[str] | None = None) -> int:
    p = worker_parser(__doc__.splitlines()[0], ARCHES)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="training.dtype (bfloat16: autocast, float32 master weights; not the common setting)")
    a = p.parse_args(argv)
    set_threads(a.threads)
    meta = load_meta(a.work)
    from sae import load_sae
    from train.run import train

    steps = meta.n_batches if meta.n_batches < meta.epoch_batches else None  # a cut-short stream
    cfg = build_config(a.arch, meta.cache, meta.layer, meta.batch_size, a.work / "runs", steps, a.lr, a.dtype)
    clock = StepClock(meta.n_batches, Gate.from_arg(a.gate))
    result = train(cfg, after_step=[lambda state: clock.step_end()], say=lambda msg: print(msg, file=sys.stderr))
    if result.state.tokens != meta.train_rows:
        raise SystemExit(f"our trainer consumed {result.state.tokens} tokens, the stream holds {meta.train_rows}")
    rates = clock.rates(meta.batch_rows())

    model, _ = load_sae(result.run_dir / "sae")
    model.eval()

    def infer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = model(x)  # eval mode: BatchTopK / Matryoshka select with their threshold
        return out["target"], out["sae_out"], out["feature_acts"]

    metrics = evaluate(infer, heldout_chunks(a.work, meta), model.d_sae)
    summary = json.loads((result.run_dir / "train_summary.json").read_text())
    doc = {
        "impl": "ours" if a.dtype == "float32" else f"ours ({a.dtype} autocast)", "arch": a.arch,
        "threads": torch.get_num_threads(), **rates, **metrics,
        "peak_rss_bytes": peak_rss_bytes(),
        "threshold": float(model.threshold) if hasattr(model, "threshold") else None,
        "own_report": {"tokens_per_s": summary.get("tokens_per_s"), "heldout": summary.get("heldout")},
        "settings": {k: getattr(cfg.training, k) for k in ("lr", "betas", "gradient_clip_norm", "batch_size",
                                                          "checkpoint_every", "log_every", "dead_feature_threshold",
                                                          "threshold_start_step")}
        | {"aux_k_coef": cfg.model.aux_k_coef, "group_sizes": cfg.model.group_sizes},
    }
    write_result(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
