"""bench/bench_harvest_gpu.py, the one-call GPU check of stage 1, rehearsed on the CPU with a tiny Qwen3 of the
same depth: it must run end to end, pass its own checks and report every figure the lead pastes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_script_runs_on_cpu_and_reports_every_figure(tmp_path):
    out = tmp_path / "harvest_gpu.json"
    cmd = [sys.executable, "bench/bench_harvest_gpu.py", "--device", "cpu", "--shape", "tiny", "--tokens", "1024",
           "--repeats", "1", "--check-width", "64", "--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["ok"] and not r["errors"]
    assert set(r["runs"]) == {"6", "6:21"}
    for spec, n_layers in (("6", 1), ("6:21", 15)):
        run = r["runs"][spec]
        assert run["n_layers"] == n_layers and run["activation_bytes_per_token"] == n_layers * 64 * 4
        for key in ("forward_tokens_per_s", "harvest_tokens_per_s", "disk_GB_per_s", "ratio_vs_min_forward_disk",
                    "ratio_vs_forward", "ratio_vs_disk"):
            assert run[key] > 0, key
        expected = min(run["forward_tokens_per_s"], run["disk_tokens_per_s"])
        assert abs(run["ratio_vs_min_forward_disk"] - run["harvest_tokens_per_s"] / expected) < 1e-9
        assert run["rows_check"]["bit_exact"] and run["rows_check"]["rows_checked"] > 0
        assert run["stats_check"]["within_1e-6"]
    assert r["resume_check"]["identical"] and r["resume_check"]["shards"] > 3
    assert not (tmp_path / "work").exists()  # the script cleans up after itself
