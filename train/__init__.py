"""Stage 2: train SAEs on a cached activation set.

Reading order: `layout` (every file name of a run folder, which evaluation reads too); `plan` (the
run's length and schedule defaults) and `schedule` (lr and sparsity warm-ups as pure functions of the
step); `build` (config + cache -> SAE); `loop` (the step and the loop); `distributed` (torchrun: the
Collective an SAE computes its global-batch quantities through, gradient all-reduce, rank rows);
`checkpoint`, `snapshot`, `resume` (crash-safe checkpoints, nothing pickled); `metrics`
(metrics.jsonl, tqdm, wandb); `calibrate` (which training rows an SAE calibrates on); `rundir` and
`run` (one training run end to end, its held-out summary from sae.measure); `__main__` (the CLI).
`data` is the cache loader, `tensor_loader` the same interface over a tensor in memory.

Nothing here names an architecture: what differs by architecture (threshold estimation, cross-rank
selection, routing, what `fired` means, calibration) is a hook of the SAE class (sae/base.py).

    from train.run import train; train(settings.load_config([...]))
"""
