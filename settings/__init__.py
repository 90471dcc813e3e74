"""Experiment configuration shared by every stage: typed sections, YAML, dotted overrides."""

from settings.load import ConfigError, build, load_config, save_config, to_dict
from settings.schema import (
    Config,
    DataConfig,
    EvaluateConfig,
    HarvestConfig,
    ModelConfig,
    TrainingConfig,
    WandbConfig,
)

__all__ = [
    "Config", "ConfigError", "DataConfig", "EvaluateConfig", "HarvestConfig", "ModelConfig",
    "TrainingConfig", "WandbConfig", "build", "load_config", "save_config", "to_dict",
]
