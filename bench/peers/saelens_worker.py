"""Peer-benchmark worker (runs in .venv-peers): SAELens's own trainer on one architecture.

Its public classes only: `TopKTrainingSAE` / `BatchTopKTrainingSAE` / `MatryoshkaBatchTopKTrainingSAE`
with their configs, trained by `SAETrainer.fit()` on a data provider that yields the stream file's
batches in order, scaled by the common fixed scalar (SAELens's own normaliser off). Everything not in
the common setting keeps SAELens's defaults (decoder init norm 0.1, decoder-norm rescaling, AuxK
coefficient 1 after a 1,000-step dead window, gradient clipping at 1). Evaluation uses SAELens's
inference model, saved and reloaded with its own `save_inference_model` / `SAE.load_from_disk`:
TopK stays TopK; BatchTopK and Matryoshka become JumpReLU with the learned global threshold.

    .venv-peers/bin/python bench/peers/saelens_worker.py --arch batchtopk --work bench/_work/peers --out r.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from heldout_eval import evaluate
from runmeter import COMMON_LR, Gate, StepClock, peak_rss_bytes, set_threads, worker_parser, write_result
from streamfile import StreamMeta, heldout_chunks, load_meta, train_batches

D_SAE, K = 3072, 32
GROUP_SIZES = [192, 384, 768, 1728]
ARCHES = ("topk", "batchtopk", "matryoshka")


def make_sae(arch: str, d_in: int):
    import sae_lens

    common = {"d_in": d_in, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "normalize_activations": "none"}
    if arch == "topk":
        return sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(k=K, **common))
    if arch == "batchtopk":
        return sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(k=float(K), **common))
    widths = [sum(GROUP_SIZES[:i + 1]) for i in range(len(GROUP_SIZES))]  # SAELens takes cumulative widths
    cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(k=float(K), matryoshka_widths=widths, **common)
    return sae_lens.MatryoshkaBatchTopKTrainingSAE(cfg)


def fit(sae, meta: StreamMeta, work: Path, clock: StepClock, lr: float = COMMON_LR):
    from sae_lens import LoggingConfig, SAETrainer
    from sae_lens.config import SAETrainerConfig

    cfg = SAETrainerConfig(
        total_training_samples=meta.train_rows, train_batch_size_samples=meta.batch_size, lr=lr, lr_end=lr,
        lr_scheduler_name="constant", lr_warm_up_steps=0, device="cpu", autocast=False,
        logger=LoggingConfig(log_to_wandb=False),
    )
    first = [True]

    def requested() -> None:  # a batch request after the first marks the end of the previous step
        if first[0]:
            first[0] = False
        else:
            clock.step_end()

    trainer = SAETrainer(cfg, sae, train_batches(work, meta, requested, scale=meta.scale))
    trained = trainer.fit()
    clock.step_end()
    return trained


def inference_model(trained, folder: Path):
    from sae_lens import SAE

    trained.save_inference_model(folder)
    return SAE.load_from_disk(folder)


def main(argv: list[str] | None = None) -> int:
    p = worker_parser(__doc__.splitlines()[0], ARCHES)
    a = p.parse_args(argv)
    set_threads(a.threads)
    meta = load_meta(a.work)
    torch.manual_seed(0)
    sae = make_sae(a.arch, meta.d)
    clock = StepClock(meta.n_batches, Gate.from_arg(a.gate))
    trained = fit(sae, meta, a.work, clock, a.lr)
    rates = clock.rates(meta.batch_rows())
    threshold = float(trained.topk_threshold) if hasattr(trained, "topk_threshold") else None
    with tempfile.TemporaryDirectory() as tmp:
        model = inference_model(trained, Path(tmp))
    model.eval()

    def infer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs = x * meta.scale
        latents = model.encode(xs)
        return xs, model.decode(latents), latents

    metrics = evaluate(infer, heldout_chunks(a.work, meta), D_SAE)
    import sae_lens

    doc = {"impl": f"SAELens {sae_lens.__version__}", "arch": a.arch, "threads": torch.get_num_threads(), **rates,
           **metrics, "peak_rss_bytes": peak_rss_bytes(), "threshold": threshold,
           "inference_class": type(model).__name__}
    write_result(a.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
