"""Data-parallel training under torchrun (gloo, 2 CPU processes) against 1-process training.

The 2-process runs are launched with `python -m torch.distributed.run --nproc-per-node 2` on this
file itself: run as a script, it trains one run from a JSON list of config overrides (and can inject
a failure on one rank after a given step, as a crash would).

Every registered architecture is checked (the registry is listed, not named here): what an SAE
computes over the global batch (BatchTopK's selection and threshold, AuxK's normaliser) is its own
business through its Collective, and this test holds each to the rule. The reference is computed
independently: the same config trained by one process with the global batch. The global batch
(129 rows) splits unevenly (64 + 65 rows; the last batch of an epoch, 65
rows, as 32 + 33), so the token weighting of the losses is exercised, and a small dead window makes
AuxK active, so its global normaliser is exercised.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a torchrun script
    sys.path.insert(0, str(ROOT))

from settings import load_config  # noqa: E402
from train.checkpoint import list_checkpoints, read_checkpoint  # noqa: E402
from train.metrics import read_metrics  # noqa: E402

STEPS = 100
ATOL = 1e-4
TOKENS = 6 * 2000 + 4 * 129  # 16 batches an epoch (15 of 129 rows, one of 65): 6 epochs and 4 batches


def overrides(cache: Path, out: Path, run_name: str, model: str, **extra: object) -> list[str]:
    from tests.train.run_fixtures import overrides_for

    base: dict[str, object] = {
        "training.cache": cache, "training.output_dir": out, "training.run_name": run_name,
        "model.type": model, "model.latent_size": 64, "model.k": 4, "training.batch_size": 129,
        "training.steps": STEPS, "training.log_every": 10, "training.checkpoint_every": 25, "training.lr": 3e-3,
        "training.shuffle_buffer_rows": 512, "training.dtype": "float64", "training.device": "cpu",
        "training.dead_feature_threshold": 260, "training.threshold_start_step": 5, "evaluate.max_tokens": 256,
    }
    for key, value in overrides_for(model, latent=64).items():  # e.g. Matryoshka's group sizes
        listed = f"[{','.join(map(str, value))}]" if isinstance(value, list) else value
        base[key] = "null" if value is None else listed
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def torchrun(over: list[str], *, fail_rank: int | None = None, fail_step: int | None = None,
             resume: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = {"overrides": over + (["training.resume=true"] if resume else []),
            "fail_rank": fail_rank, "fail_step": fail_step}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", __file__, json.dumps(args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sae" / "sae.safetensors"))


@pytest.fixture(scope="module")
def ddp_cache(tmp_path_factory) -> Path:
    from tests.train.cache_fixtures import write_cache

    path = tmp_path_factory.mktemp("ddp") / "cache"
    write_cache(path, content="sparse", n_train=2000, n_heldout=256, layers=(0, 1, 2), d_model=16, shard_rows=500,
                n_features=48, active=3, noise=0.05)  # routed SAEs read all three; the others the middle one
    return path


def one_process(cache: Path, out: Path, name: str, model: str, **extra: object) -> Path:
    from train.run import train

    for key in ("WORLD_SIZE", "RANK"):
        assert key not in os.environ, "the reference must run as one process"
    torch.set_num_threads(1)
    return train(load_config([], overrides(cache, out, name, model, **extra)), say=lambda m: None).run_dir


def _registered() -> list[str]:
    from tests.train.run_fixtures import canonical_types

    return canonical_types()


@pytest.mark.slow
@pytest.mark.parametrize("model", _registered())
def test_two_processes_match_one_with_the_global_batch(ddp_cache, tmp_path, model):
    ref = one_process(ddp_cache, tmp_path, "one", model)
    done = torchrun(overrides(ddp_cache, tmp_path, "two", model))
    assert done.returncode == 0, done.stderr[-3000:]
    two = tmp_path / "two"
    w1, w2 = weights(ref), weights(two)
    assert w1.keys() == w2.keys()
    assert w1["W_dec"].dtype == torch.float64
    moved = (w1["W_dec"] - load_file(str(list_checkpoints(ref)[0] / "model.safetensors"))["W_dec"]).abs().max()
    assert moved > 1e-2  # the runs did learn something, so agreement is not trivial
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=ATOL, rtol=0, msg=name)
    if "threshold" in w1 and w1["threshold"].dim() == 0:  # a batch-level inference threshold (global min, EMA)
        assert float(w1["threshold"]) > 0
    c1, c2 = read_checkpoint(list_checkpoints(ref)[-1]), read_checkpoint(list_checkpoints(two)[-1])
    assert c2.meta["world_size"] == 2 and c2.meta["state"]["tokens"] == c1.meta["state"]["tokens"] == TOKENS
    dead1, dead2 = c1.tensors["state"]["tokens_since_fired"], c2.tensors["state"]["tokens_since_fired"]
    assert torch.equal(dead1, dead2)
    m1, m2 = read_metrics(ref), read_metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(10, STEPS + 1, 10))
    if "auxk" in m1[0]:
        assert any(r["auxk"] > 0 for r in m1), "AuxK never ran: the test would not check its normaliser"
    for r1, r2 in zip(m1, m2, strict=True):
        assert r1.keys() == r2.keys()
        for key in sorted(set(r1) - {"step", "tokens", "lr", "tokens_per_s"}):
            assert math.isclose(r1[key], r2[key], rel_tol=1e-5, abs_tol=1e-6), (r1["step"], key, r1[key], r2[key])


def test_failing_rank_stops_the_run_and_resume_continues_it(ddp_cache, tmp_path):
    ref = one_process(ddp_cache, tmp_path, "one", "TopKSAE")
    over = overrides(ddp_cache, tmp_path, "two", "TopKSAE")
    failed = torchrun(over, fail_rank=1, fail_step=60)
    assert failed.returncode != 0
    assert "injected failure" in failed.stderr and "rank 1 of 2" in failed.stderr, failed.stderr[-3000:]
    two = tmp_path / "two"
    kept = list_checkpoints(two)
    assert [read_checkpoint(p).step for p in kept] == [25, 50]
    for p in kept:  # every visible checkpoint is whole
        read_checkpoint(p)
    assert not (two / "sae").exists()
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == sorted(p.name for p in kept)
    # Resuming with one process is refused, naming both world sizes.
    from train.run import TrainError, train

    with pytest.raises(TrainError, match=r"written by 2 process.*this run has 1"):
        train(load_config([], over + ["training.resume=true"]), say=lambda m: None)
    resumed = torchrun(over, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    w1, w2 = weights(ref), weights(two)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=ATOL, rtol=0, msg=name)
    assert [r["step"] for r in read_metrics(two)] == list(range(10, STEPS + 1, 10))


def _worker(args: dict) -> None:
    from train.run import train

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])

    def fail(state) -> None:
        if rank == args["fail_rank"] and state.step == args["fail_step"]:
            raise RuntimeError(f"injected failure after step {state.step}")

    train(load_config([], args["overrides"]), after_step=[fail] if args["fail_rank"] is not None else [])


if __name__ == "__main__":
    from durable.launcher import exit_process

    _worker(json.loads(sys.argv[1]))
    exit_process(0)  # as `python -m train` ends a torchrun worker: no interpreter teardown to race gloo's threads
