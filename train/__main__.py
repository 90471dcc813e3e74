"""`python -m train --model gated [--config configs/default.yaml] [--cache PATH] [--resume] [--overwrite]
[section.key=value ...]`: the preset `configs/sae/<model>.yaml`, then the config file, then the overrides.

The preset holds an architecture's tuned defaults; the config file says what the experiment is, so a
key it sets wins over the preset (configs/qwen3-1.7b.yaml's 65,536 latents and lr, say), except the
SAE type, which MODEL decides. configs/default.yaml therefore sets no SAE hyperparameter.

MODEL is a preset name (a file in configs/sae/) or any name the SAE registry knows; an unknown one
is refused with the list of valid names. Exit status: 0 done, 1 a run that could not start or
continue (the message says why), 2 bad command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from settings import Config, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS / "default.yaml"
PRESETS = CONFIGS / "sae"


def preset_names(presets: Path = PRESETS) -> list[str]:
    return sorted(p.stem for p in presets.glob("*.yaml")) if presets.is_dir() else []


def valid_models(presets: Path = PRESETS) -> list[str]:
    import sae

    return sorted(set(preset_names(presets)) | set(sae.registry.aliases()))


def preset_type(preset: Path) -> str:
    """The SAE type a preset file names (`model.type`)."""
    from settings.load import parse_yaml

    doc = parse_yaml(preset.read_text())
    try:
        return str(doc["model"]["type"])
    except (KeyError, TypeError):
        raise ConfigError(f"preset {preset} sets no model.type") from None


def config_files(model: str, base: Path | None, presets: Path = PRESETS) -> tuple[list[str | Path], list[str]]:
    """(YAML files to merge, extra overrides) for MODEL; raises ConfigError for an unknown MODEL."""
    import sae

    files: list[str | Path] = [base] if base is not None else []
    preset = presets / f"{model}.yaml"
    if preset.is_file():
        return [preset, *files], [f"model.type={preset_type(preset)}"]
    try:
        sae.canonical(model)
    except ValueError:
        raise ConfigError(f"unknown MODEL {model!r}; valid: {', '.join(valid_models(presets))}") from None
    return files, [f"model.type={model}"]  # a registered SAE without a preset: the base config's settings


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from settings.describe import describe, help_formatter

    p = argparse.ArgumentParser(prog="python -m train", description="Train an SAE on a cached activation set.",
                                epilog=describe(["model", "training", "wandb", "evaluate"]),
                                formatter_class=help_formatter)
    p.add_argument("--model", required=True, help="preset in configs/sae/ or a registered SAE type (e.g. topk)")
    p.add_argument("--config", type=Path, default=None, help=f"base config (default {DEFAULT_CONFIG})")
    p.add_argument("--cache", default=None, help="cache folder (sets training.cache)")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.lr=1e-4")
    return p.parse_intermixed_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    base = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if args.config is not None and not args.config.is_file():
        raise ConfigError(f"config file {args.config} not found")
    files, extra = config_files(args.model, base)
    overrides = extra + list(args.overrides)
    if args.cache is not None:
        overrides.append(f"training.cache={args.cache}")
    if args.resume:
        overrides.append("training.resume=true")
    if args.overwrite:
        overrides.append("training.overwrite=true")
    return load_config(files, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from train.preempt import Preempted
    from train.run import train as run_training
    from train.run import user_errors

    try:
        run_training(cfg)
    except Preempted as e:  # SIGTERM, SIGINT, SIGUSR1: a checkpoint of the last step is written
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the latest checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    from durable.launcher import exit_process

    exit_process(main())  # under torchrun: os._exit, no interpreter teardown (see exit_process for why)
