"""Sweeps under torchrun (gloo, 2 CPU processes) against the same sweep in one process.

The rule (train/sweep/run.py): with at least as many members as ranks, the members are spread over the
ranks (member i on rank i mod 2), each a 1-process run: every member ends bitwise equal to the
1-process sweep's. With fewer members than ranks, each member trains data-parallel over both ranks:
equal to the 1-process sweep up to float rounding (float64, 1e-4 as tests/train/test_ddp.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.cache_fixtures import write_cache
from tests.train.run_fixtures import TINY
from train.sweep.run import SUMMARY_FILE, run_sweep
from train.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sparse_cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache") / "c", content="sparse", **TINY).path


def _sweep_file(tmp_path: Path, cache: Path, out: Path, members: str, dtype: str = "float32") -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(f"training:\n  cache: {cache}\n  batch_size: 128\n  steps: 30\n  log_every: 5\n"
                    f"  checkpoint_every: 10\n  output_dir: {out}\n  shuffle_buffer_rows: 512\n  lr: 1.0e-3\n"
                    f"  device: cpu\n  dtype: {dtype}\n")
    path = tmp_path / "s.yaml"
    path.write_text(f"base:\n  preset: topk\n  config: {base}\n"
                    "  overrides: {model.latent_size: 64, model.k: 4, model.aux_k: null, model.layer: 1}\n"
                    f"members:\n{members}")
    return path


def _torchrun(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", "-m", "train.sweep", str(path)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sae" / "sae.safetensors"))


def test_members_spread_over_two_ranks_equal_the_one_process_sweep_bitwise(tmp_path, sparse_cache):
    members = ("  - {name: topk}\n  - {name: gated, model.type: gated, model.layer: 2}\n"
               "  - {name: topk8, model.k: 8}\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = load_sweep(_sweep_file(tmp_path / "a", sparse_cache, tmp_path / "one", members))
    run_sweep(one, say=lambda m: None)
    done = _torchrun(_sweep_file(tmp_path / "b", sparse_cache, tmp_path / "two", members))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "s" / SUMMARY_FILE).read_text())
    assert summary["mode"] == "members over ranks" and summary["processes"] == 2
    assert [r["member"] for r in summary["members"]] == ["topk", "gated", "topk8"] and summary["stopped"] == []
    assert summary["batches_read"] == 2 * 30  # each rank read each batch once, for its own members
    for m in one.members:
        a, b = _weights(one.output_dir / m.name), _weights(tmp_path / "two" / "s" / m.name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (m.name, key)


@pytest.mark.slow
def test_fewer_members_than_ranks_train_data_parallel(tmp_path, sparse_cache):
    members = "  - {name: only}\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = load_sweep(_sweep_file(tmp_path / "a", sparse_cache, tmp_path / "one", members, "float64"))
    run_sweep(one, say=lambda m: None)
    done = _torchrun(_sweep_file(tmp_path / "b", sparse_cache, tmp_path / "two", members, "float64"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "s" / SUMMARY_FILE).read_text())
    assert summary["mode"] == "data-parallel" and summary["members"][0]["status"] == "done"
    a, b = _weights(one.output_dir / "only"), _weights(tmp_path / "two" / "s" / "only")
    assert a["W_dec"].dtype == torch.float64
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=0, msg=key)
    ckpt = json.loads(next((tmp_path / "two" / "s" / "only" / "checkpoints").glob("step-*/state.json")).read_text())
    assert ckpt["world_size"] == 2
