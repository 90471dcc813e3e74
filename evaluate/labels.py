"""Labels of tables and plots built from the settings an evaluation used, as `eval.json` records them
(under `SETTINGS_KEY`): the dense-latent threshold and the held-out size. A label never states a
setting the result does not record (older eval.json files): it then names no threshold."""

from __future__ import annotations

# Where eval.json records the evaluate settings its figures were measured with.
SETTINGS_KEY = "evaluate"


def percent(share: float) -> str:
    """0.1 -> '10%', 0.005 -> '0.5%': a threshold as the user wrote it, without rounding it away."""
    return f"{share * 100:.4g}%"


def dense_threshold(result: dict) -> float | None:
    value = result.get(SETTINGS_KEY, {}).get("dense_threshold")
    return float(value) if isinstance(value, int | float) else None


def dense_label(result: dict) -> str:
    """The dense-latent row's label, with the threshold this result was measured with."""
    threshold = dense_threshold(result)
    return "dense latents" + ("" if threshold is None else f" (firing on >{percent(threshold)} of tokens)")


def tokens_label(result: dict) -> str:
    """The held-out size row's label; says so when evaluate.max_tokens measured only part of the split."""
    rows = result.get(SETTINGS_KEY, {}).get("heldout_rows")
    measured = result.get("metrics", {}).get("tokens")
    if not isinstance(rows, int) or not isinstance(measured, int) or measured >= rows:
        return "held-out tokens"
    return f"held-out tokens (the first {measured:,} of {rows:,}: evaluate.max_tokens)"


def heldout_title(result: dict) -> str:
    """'held-out, 42,608 tokens' for plot titles."""
    measured = result.get("metrics", {}).get("tokens")
    return f"held-out, {measured:,} tokens" if isinstance(measured, int) else "held-out"
