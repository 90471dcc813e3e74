"""Stage 2: train SAEs on a cached activation set.

Reading order: `plan` (the run's length and schedule defaults) and `schedule` (lr and sparsity
warm-ups as pure functions of the step); `build` (config + cache -> SAE); `loop` (the step and the
loop); `checkpoint`, `snapshot`, `resume` (crash-safe checkpoints, nothing pickled); `metrics`
(metrics.jsonl, tqdm, wandb); `heldout` (the quick held-out summary); `rundir` and `run` (one
training run end to end); `__main__` (the CLI). `data` is the cache loader, `tensor_loader` the
same interface over a tensor in memory.

    from train.run import train; train(settings.load_config([...]))
"""
