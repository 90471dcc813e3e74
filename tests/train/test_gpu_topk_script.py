"""bench/bench_gpu_topk.py, the one-call GPU check of the TopK step, rehearsed on the CPU on tiny shapes:
it must run end to end and report every figure the lead pastes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_topk_script_runs_on_cpu_and_reports_every_figure(tmp_path):
    out = tmp_path / "gpu_topk.json"
    cmd = [sys.executable, "bench/bench_gpu_topk.py", "--device", "cpu", "--d", "32", "--latents", "256", "--k", "4",
           "--batch", "128", "--small-d", "16", "--small-latents", "64", "--small-k", "4", "--small-batch", "64",
           "--steps", "2", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == []
    large = r["large"]
    assert large["ours"]["tokens_per_s"] > 0 and 0 < large["ours"]["sae_mfu_best_gemm"]
    assert large["best_gemm"] in large["gemm_flops"]
    assert large["ours"]["dtype_used"] == ("bfloat16" if r["bf16_native"] else "float32")
    assert "tokens_per_s" in large["sparsify"] or large["sparsify"]["skipped"].startswith("sparsify: not installed")
    assert r["small"]["eager"]["tokens_per_s"] > 0
    assert r["small"]["cuda_graph"] == {"skipped": "n/a on cpu (CUDA graphs)"}
    for size in ("large", "small"):
        sel = r["selection"][size]
        assert sel["topk_ms"] > 0
        strided = {k: v for k, v in sel.items() if k.startswith("strided")}
        assert strided and all(v["exact"] and v["ms"] > 0 for v in strided.values())
