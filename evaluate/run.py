"""Evaluate one training run folder: held-out metrics, downstream fidelity, eval.json, plots,
dashboard, and the short table printed at the end.

Reads `runs/<run>/sae/` (sae.safetensors + sae.json), `config.yaml` and `metrics.jsonl` as the
trainer writes them; writes `eval.json`, `plots/*.png` and `dashboard.html` beside them.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import cache
import durable
from cache import Cache
from durable import lock as durable_lock
from evaluate.heldout import heldout_metrics
from evaluate.labels import SETTINGS_KEY, dense_label, tokens_label
from sae import BaseSAE, load_sae
from sae.base import CONFIG_FILE as SAE_CONFIG_FILE
from sae.measure import PREFIXES_KEY, ROUTING_KEY
from sae.metrics import UNDEFINED_REASONS as METRIC_REASONS
from settings import Config, load_config
from train.layout import CONFIG_FILE, DASHBOARD_FILE, EVAL_FILE, SAE_DIR

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from harvest.model import LoadedModel


def find_run(run: str | None, output_dir: str = "runs") -> Path:
    """`run` if given (it must hold sae/sae.json), else the most recently trained run under `output_dir`."""
    if run:
        path = Path(run)
        if not (path / SAE_DIR / SAE_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a finished training run (no {SAE_DIR}/{SAE_CONFIG_FILE}); "
                                    f"pass RUN=runs/<run> of a run that `make train` completed")
        return path
    runs = sorted(Path(output_dir).glob(f"*/{SAE_DIR}/{SAE_CONFIG_FILE}"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no finished run under {output_dir}/; run `make train` first, or pass RUN=runs/<run>")
    return runs[-1].parent.parent


def run_config(run_dir: Path, overrides: list[str] | None = None, extra: list[str] | None = None) -> Config:
    """The run's resolved config (if saved), then extra config files, then dotted overrides."""
    paths = [run_dir / CONFIG_FILE] if (run_dir / CONFIG_FILE).is_file() else []
    return load_config(paths + list(extra or []), overrides)


def open_run_cache(meta: dict, cfg: Config) -> Cache:
    """The cache the SAE was trained on; refuses one whose identity differs from the recorded one."""
    path = meta.get("cache") or cfg.training.cache
    c = cache.open(path)
    c.verify_reads = cfg.training.verify_reads
    recorded = meta.get("cache_identity")
    if recorded is not None and recorded != c.identity:
        differing = sorted(k for k in set(recorded) | set(c.identity) if recorded.get(k) != c.identity.get(k))
        raise ValueError(f"the cache at {path} is not the one this SAE was trained on (identity differs in "
                         f"{differing}); point training.cache at the original cache")
    return c


class FolderBusy(ValueError):
    """The run folder or its cache is held by another process (durable.lock); the message names it."""


def evaluate_run(run_dir: str | Path, cfg: Config, *, downstream: bool = True, plots: bool = True,
                 dashboard: bool = True, device: str = "cpu") -> dict:
    """Evaluate `run_dir` and write eval.json (and plots, dashboard). Returns the eval.json content.
    Holds the run folder (it writes there) and, for reading, the cache while it runs."""
    run_dir = Path(run_dir)
    try:
        with durable_lock.exclusive(run_dir, "run folder"):
            return _evaluate_held(run_dir, cfg, downstream, plots, dashboard, device)
    except durable_lock.LockHeld as e:
        raise FolderBusy(str(e)) from None


def _evaluate_held(run_dir: Path, cfg: Config, downstream: bool, plots: bool, dashboard: bool,
                   device: str) -> dict:
    sae, meta = load_sae(run_dir / SAE_DIR, device=device)
    sae.eval()  # every metric, the splice and the dashboard use the SAE's inference mode
    if not sae.cfg.layers and meta.get("layers"):
        sae.cfg.layers = list(meta["layers"])
    c = open_run_cache(meta, cfg)
    with durable_lock.shared(c.path, "cache"):
        return _evaluate_on(run_dir, cfg, sae, meta, c, downstream, plots, dashboard, device)


def _evaluate_on(run_dir: Path, cfg: Config, sae: BaseSAE, meta: dict, c: Cache, downstream: bool, plots: bool,
                 dashboard: bool, device: str) -> dict:
    ev = cfg.evaluate
    t0 = time.time()
    result = {
        "run": run_dir.name,
        "sae": {"type": sae.cfg.type, "layers": list(sae.cfg.layers), "d_in": sae.cfg.hidden_size,
                "d_sae": sae.cfg.latent_size, "k": sae.cfg.k, "group_sizes": sae.cfg.group_sizes},
        "cache": str(c.path),
        "split": "heldout",
        # the settings the figures depend on, so that a table or plot made later labels them as measured
        SETTINGS_KEY: {"dense_threshold": ev.dense_threshold, "max_tokens": ev.max_tokens,
                       "heldout_rows": c.num_rows("heldout")},
        **heldout_metrics(sae, c, batch_size=ev.batch_size, max_tokens=ev.max_tokens,
                          l1_coefficient=cfg.training.l1_coefficient, dense_threshold=ev.dense_threshold,
                          device=device),
    }
    lm = tok = None
    if downstream and ev.downstream_sequences > 0:
        lm, tok, reason = _load_lm(c, cfg, device)
        result["downstream"] = {"skipped": reason} if lm is None or tok is None else _downstream(lm, tok, sae, c, cfg)
    result["seconds"] = round(time.time() - t0, 2)
    write_json(run_dir / EVAL_FILE, result)
    if plots:
        from evaluate.plots import write_run_plots

        result["plots"] = [str(p) for p in write_run_plots(run_dir, result)]
    if dashboard:
        from evaluate.dashboard import output_directions, write_dashboard

        unembed = output_directions(lm.model) if lm is not None and lm.causal else None
        result["dashboard"] = str(write_dashboard(run_dir / DASHBOARD_FILE, sae, c, result, cfg, tok, unembed))
    write_json(run_dir / EVAL_FILE, result)
    return result


def _load_lm(c: Cache, cfg: Config, device: str) -> tuple[LoadedModel | None, PreTrainedTokenizerBase | None,
                                                          str | None]:
    """The language model the cache came from and its tokenizer; a model that cannot be loaded here
    (no network for a hub id) gives (None, None, reason): downstream metrics are then reported as
    skipped, not as a crash of the whole evaluation."""
    from harvest.model import load_model
    from harvest.tokenization import load_tokenizer

    model_meta, harvest_cfg = c.metadata.get("model"), c.metadata.get("config")
    meta = model_meta if isinstance(model_meta, dict) else {}
    # The folder harvest loaded, if it is still here (a converted GGUF folder may have been cleared from
    # the user cache: then the name harvest was given converts it again).
    resolved = meta.get("resolved")
    path = resolved if resolved and Path(resolved).exists() else meta.get("requested") or cfg.model.language_model_path
    revision = harvest_cfg["model"].get("revision") if isinstance(harvest_cfg, dict) and "model" in harvest_cfg \
        else cfg.model.revision
    try:
        lm = load_model(path, revision=revision, dtype="float32", device=device)
        tok = load_tokenizer(path, revision, cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        warnings.warn(f"downstream metrics skipped: {e}", stacklevel=2)
        return None, None, str(e)
    return lm, tok, None


def _downstream(lm: LoadedModel, tok: PreTrainedTokenizerBase, sae: BaseSAE, c: Cache, cfg: Config) -> dict:
    from evaluate.downstream import downstream_fidelity
    from evaluate.sequences import Specials
    from harvest.tokenization import pad_id, special_layout

    specials = Specials.from_layout(special_layout(tok), pad=pad_id(tok))
    return downstream_fidelity(lm, sae, c, specials, n_sequences=cfg.evaluate.downstream_sequences)


def write_json(path: Path, data: dict) -> None:
    """Atomic write (durable): a crash never leaves half an eval.json. Strict JSON: a metric that
    cannot be computed is `null` with `<name>_reason` beside it."""
    durable.atomic_write_json(path, durable.null_non_finite(data, METRIC_REASON, METRIC_REASONS), indent=1)


METRIC_REASON = ("the held-out split or the downstream sequences gave no usable value (a zero denominator or "
                 "non-finite activations: run `cache verify`)")



_TABLE_ROWS = [
    ("tokens", "held-out tokens", "{:,.0f}"), ("fvu", "FVU", "{:.4f}"),
    ("explained_variance", "explained variance", "{:.4f}"),
    ("explained_variance_legacy", "explained variance (SAELens legacy)", "{:.4f}"),
    ("mse", "MSE (normalised)", "{:.4g}"), ("mse_raw", "MSE (raw)", "{:.4g}"), ("l0", "L0", "{:.2f}"),
    ("l1", "L1", "{:.4g}"), ("dead_fraction", "dead latents", "{:.2%}"), ("dense_fraction", "dense latents", "{:.2%}"),
    ("cosine_similarity", "cosine similarity", "{:.4f}"), ("l2_ratio", "l2 ratio", "{:.4f}"),
    ("relative_reconstruction_bias", "relative reconstruction bias", "{:.4f}"),
]
_DOWNSTREAM_ROWS = [
    ("ce_clean", "CE clean", "{:.4f}"), ("ce_sae", "CE spliced", "{:.4f}"), ("ce_zero", "CE zero-ablated", "{:.4f}"),
    ("ce_loss_score", "CE loss score", "{:.4f}"), ("kl_per_token", "KL(clean||spliced) per token", "{:.4f}"),
    ("embedding_cos_sae", "pooled embedding cos, spliced", "{:.4f}"),
    ("embedding_cos_zero", "pooled embedding cos, zero-ablated", "{:.4f}"),
]


def format_table(result: dict) -> str:
    """The short markdown table printed after an evaluation."""
    sae = result["sae"]
    lines = [f"## {result['run']}: {sae['type']} on block(s) {sae['layers']}, d_sae {sae['d_sae']}", "",
             "| metric | value |", "| --- | --- |"]
    labels = {"tokens": tokens_label(result), "dense_fraction": dense_label(result)}
    lines += _rows(result["metrics"], [(key, labels.get(key, label), fmt) for key, label, fmt in _TABLE_ROWS])
    down = result.get("downstream", {})
    if "skipped" in down:
        lines.append(f"| downstream | skipped: {down['skipped']} |")
    else:
        lines += _rows(down, _DOWNSTREAM_ROWS)
    for g in result.get(PREFIXES_KEY, []):
        lines.append(f"| prefix {g['prefix']}: FVU / L0 | {g['fvu']:.4f} / {g['l0']:.2f} |")
    for row in result.get(ROUTING_KEY, {}).get("per_layer", []):
        lines.append(f"| block {row['layer']}: share / FVU | {row['share']:.2%} / {row.get('fvu', math.nan):.4f} |")
    return "\n".join(lines)


def _rows(values: dict, spec: list[tuple[str, str, str]]) -> list[str]:
    out = []
    for key, label, fmt in spec:
        if key in values:
            v = values[key]
            out.append(f"| {label} | {'undefined' if v is None else fmt.format(v)} |")
    return out
