"""Where training metrics go: `metrics.jsonl` always, a tqdm bar, and wandb when asked for.

wandb is imported only when `wandb.use_wandb` is on; if it is missing or fails to start (no
network, no login) the run warns once and continues with the other two.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from tqdm import tqdm

import durable
from train.layout import METRICS_FILE

METRIC_REASON = "this step's batch gave no usable value (a zero denominator or non-finite values)"


class MetricsLog:
    """One record per logged step. On resume, records after the checkpoint's step are dropped so
    that the file reads as one uninterrupted run."""

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int = 0,
        wandb_cfg: Any = None,
        run_name: str = "",
        config: dict[str, Any] | None = None,
    ):
        self.path = Path(run_dir) / METRICS_FILE
        _truncate_after(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._wandb = _start_wandb(wandb_cfg, run_name, Path(run_dir), config) if wandb_cfg is not None else None

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` (must contain `step`) to metrics.jsonl, the bar's postfix and wandb."""
        clean = durable.null_non_finite({k: _jsonable(v) for k, v in record.items()}, METRIC_REASON)
        self._file.write(durable.json_text(clean) + "\n")
        self._file.flush()
        self._bar.set_postfix(
            {k: f"{clean[k]:.4g}" for k in ("loss", "l0", "fvu") if isinstance(clean.get(k), float)}, refresh=False
        )
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in clean.items() if k != "step"}, step=clean["step"])
            except Exception as e:  # noqa: BLE001 - a logging backend must never stop training
                warnings.warn(f"wandb.log failed ({e}); continuing without wandb", stacklevel=2)
                self._wandb = None

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def note(self, message: str) -> None:
        """A human-readable line that does not break the progress bar."""
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"wandb.finish failed ({e})", stacklevel=2)
            self._wandb = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write
    durable.atomic_write_text(path, "".join(line + "\n" for line in kept))


def _start_wandb(wandb_cfg: Any, run_name: str, run_dir: Path, config: dict[str, Any] | None) -> Any:
    if not getattr(wandb_cfg, "use_wandb", False):
        return None
    try:
        import wandb

        # A stable id from the run folder lets a resumed run continue the same wandb run.
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        wandb.init(
            project=wandb_cfg.project, entity=wandb_cfg.entity, name=run_name, id=run_id, resume="allow",
            dir=str(run_dir), config=config,
        )
        return wandb
    except Exception as e:  # noqa: BLE001 - wandb raises many kinds; none of them should stop training
        warnings.warn(f"wandb could not start ({type(e).__name__}: {e}); continuing without it", stacklevel=2)
        return None


def _jsonable(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
