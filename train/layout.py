"""Every file and folder name of a run folder `<output_dir>/<run_name>/`, in one place.

Training writes `config.yaml` (the resolved config), `metrics.jsonl`, `checkpoints/step-*/`, and at the
end `sae/` (the saved SAE: its own file names are sae.base's) and `train_summary.json`. Evaluation
(stage 3) reads those and adds `eval.json`, `plots/` and `dashboard.html`; it takes these names from
here. Constants only: importing this module loads nothing heavy.
"""

from __future__ import annotations

import re

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
SAE_DIR = "sae"
SUMMARY_FILE = "train_summary.json"
EVAL_FILE = "eval.json"
PLOTS_DIR = "plots"
DASHBOARD_FILE = "dashboard.html"
# A sweep's folder `<output_dir>/<sweep>/` holds one run folder per member and this summary.
SWEEP_SUMMARY_FILE = "sweep_summary.json"

# Inside checkpoints/: one folder per checkpoint, written under a temporary name first.
CHECKPOINT_STATE_FILE = "state.json"
CHECKPOINT_TMP_PREFIX = ".tmp-"
CHECKPOINT_RE = re.compile(r"^step-(\d{8,})$")

# What makes a folder a run folder (the only kind `--overwrite` may delete).
RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR, SAE_DIR, SUMMARY_FILE)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"
