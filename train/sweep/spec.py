"""A sweep file -> its members, each with a resolved, validated config.

Format (`configs/sweeps/<name>.yaml`; every key but `grid`/`members` optional):

    name: topk-k-lr              # default: the file's stem. Runs go to <training.output_dir>/<name>/<member>/
    base:
      preset: topk               # configs/sae/<preset>.yaml, as `make train MODEL=topk`
      config: configs/default.yaml   # the base config file (this default when unset)
      overrides:                 # dotted keys applied to every member
        training.num_epochs: 1
    grid:                        # every combination of these values
      model.k: [16, 32, 64, 128]
      training.lr: [1.0e-3, 2.0e-3]
    members:                     # a list of variations; each is combined with every grid point
      - {name: gated-L3, model.type: gated, model.layer: 3}

Members = the list entries (one empty entry if there is no list) x the grid points (one empty point
if there is no grid). A member that sets `model.type` starts from that type's preset (as `make train
MODEL=<type>` does), else from `base.preset`. A member's config is built exactly as `python -m train`
builds one: preset, base config, then `base.overrides`, the command line's overrides, the member's
own keys, and its run folder. Names are the list entry's `name` (else its keys) joined with the grid
point's keys, e.g. `k16-lr0.001`.

One pass reads each batch once for every member, so the members must agree on what a batch is:
SHARED keys differ between members -> refused, naming the key and the members.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from settings import Config, ConfigError, load_config
from settings.load import parse_yaml

# What decides the batches (their rows and order) and where they are read: one value for the sweep.
SHARED = ("training.cache", "training.batch_size", "training.seed", "training.shuffle_buffer_rows",
          "training.device")
# Set by the sweep for each member.
OWNED = ("training.output_dir", "training.run_name", "training.resume", "training.overwrite")
TOP_KEYS = ("name", "base", "grid", "members")
BASE_KEYS = ("preset", "config", "overrides")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


class SweepError(ValueError):
    """A sweep file that cannot be used; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class Member:
    name: str
    variation: dict[str, Any]  # the member's own keys (list entry + grid point), dotted
    config: Config  # built as `python -m train` would, with its run folder runs/<sweep>/<name>


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    output_dir: Path  # <training.output_dir>/<name>
    members: list[Member]

    @property
    def varied_keys(self) -> list[str]:
        return sorted({k for m in self.members for k in m.variation})


def load_sweep(path: str | Path, overrides: list[str] | None = None, *, resume: bool = False,
               overwrite: bool = False, presets: Path | None = None) -> Sweep:
    """Read, expand and validate a sweep file; `overrides` (section.key=value) apply to every member."""
    path = Path(path)
    doc = _read(path)
    name = str(doc.get("name") or path.stem)
    if not _NAME_OK.match(name):
        raise SweepError(f"{path}: name={name!r} must be a plain folder name (letters, digits, . _ - = +)")
    base = _base(doc.get("base"), path)
    points = _grid(doc.get("grid"), path)
    entries = _entries(doc.get("members"), path)
    cli = list(overrides or [])
    varied = {k for e in entries for k in e[1]} | {k for p in points for k in p}
    for key in sorted(varied & set(OWNED)):
        raise SweepError(f"{path}: a member sets {key}, which is set by the sweep for each member "
                         "(runs/<sweep>/<member>, and the command line's --resume / --overwrite)")
    for item in cli:
        key = item.split("=", 1)[0].strip()
        if key in varied:
            raise SweepError(f"{path}: the command line sets {key}, which the sweep varies; drop it, or edit the sweep")
        if key in OWNED and key != "training.output_dir":  # the root: members go to <output_dir>/<sweep>/
            raise SweepError(f"{path}: {key} is set by the sweep for each member (runs/<sweep>/<member>); "
                             "use --resume / --overwrite (RESUME=1 / OVERWRITE=1) for every member")
    members: list[Member] = []
    for (entry_name, entry), point in itertools.product(entries, points):
        variation = {**entry, **point}
        member_name = "-".join(p for p in (entry_name or _label(entry), _label(point)) if p) or "base"
        members.append(_member(path, name, member_name, variation, base, cli, resume, overwrite, presets))
    _check_unique(path, members)
    _check_shared(path, members)
    output_dir = Path(members[0].config.training.output_dir)
    return Sweep(name, path, output_dir, members)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found (sweeps live in configs/sweeps/)")
    try:
        doc = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise SweepError(f"{path} must be a mapping with keys {', '.join(TOP_KEYS)}")
    for key in doc:
        if key not in TOP_KEYS:
            raise SweepError(f"{path}: unknown sweep key {key!r}; a sweep file has {', '.join(TOP_KEYS)}")
    if not doc.get("grid") and not doc.get("members"):
        raise SweepError(f"{path}: a sweep needs `grid:` (keys -> lists of values) and/or `members:` (a list)")
    return doc


def _base(raw: Any, path: Path) -> dict[str, Any]:
    raw = raw or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: base must be a mapping with keys {', '.join(BASE_KEYS)}")
    for key in raw:
        if key not in BASE_KEYS:
            raise SweepError(f"{path}: unknown key base.{key}; base has {', '.join(BASE_KEYS)}")
    overrides = _dotted(raw.get("overrides") or {}, path, "base.overrides")
    for key in overrides:
        if key in OWNED:
            raise SweepError(f"{path}: base.overrides sets {key}, which the sweep sets for each member"
                             + ("; only training.output_dir may be set here" if key != "training.output_dir" else ""))
    config = raw.get("config")
    return {"preset": raw.get("preset"), "config": Path(config) if config else None, "overrides": overrides}


def _dotted(raw: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: {where} must be a mapping of section.key: value")
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise SweepError(f"{path}: {where} key {key!r} must be section.key (e.g. training.lr)")
        out[key] = value
    return out


def _grid(raw: Any, path: Path) -> list[dict[str, Any]]:
    grid = _dotted(raw or {}, path, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list of values, got {values!r}")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _entries(raw: Any, path: Path) -> list[tuple[str | None, dict[str, Any]]]:
    if raw is None:
        return [(None, {})]
    if not isinstance(raw, list) or not raw:
        raise SweepError(f"{path}: members must be a non-empty list of mappings (section.key: value, optional name)")
    out = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise SweepError(f"{path}: members[{i}] must be a mapping, got {entry!r}")
        entry = dict(entry)
        name = entry.pop("name", None)
        out.append((None if name is None else str(name), _dotted(entry, path, f"members[{i}]")))
    return out


def _label(variation: dict[str, Any]) -> str:
    """`{model.k: 16, training.lr: 0.001}` -> `k16-lr0.001`."""
    return "-".join(f"{k.split('.', 1)[1].replace('_', '')}{_fmt(v)}" for k, v in variation.items())


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "_".join(map(_fmt, v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _as_override(key: str, value: Any) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"


def _member(path: Path, sweep: str, name: str, variation: dict[str, Any], base: dict[str, Any], cli: list[str],
            resume: bool, overwrite: bool, presets: Path | None) -> Member:
    from train.__main__ import DEFAULT_CONFIG, PRESETS, config_files

    if not _NAME_OK.match(name):
        raise SweepError(f"{path}: member name {name!r} is not a plain folder name; give the entry a `name:`")
    model = variation.get("model.type", base["preset"])
    if model is None:
        raise SweepError(f"{path}: member {name} has no SAE type: set base.preset (e.g. topk) or model.type")
    config = base["config"] if base["config"] is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    if config is not None and not Path(config).is_file():
        raise SweepError(f"{path}: base.config {config} not found")
    try:
        files, extra = config_files(str(model), config, presets or PRESETS)
        pre = [_as_override(k, v) for k, v in base["overrides"].items()]
        own = [_as_override(k, v) for k, v in variation.items()]
        probe = load_config(files, extra + pre + cli + own)  # the output folder the base and command line say
        out_dir = Path(probe.training.output_dir) / sweep
        flags = [f"training.output_dir={out_dir}", f"training.run_name={name}",
                 f"training.resume={str(resume).lower()}", f"training.overwrite={str(overwrite).lower()}"]
        cfg = load_config(files, extra + pre + cli + own + flags)
    except ConfigError as e:
        raise SweepError(f"{path}: member {name}: {e}") from e
    return Member(name, variation, cfg)


def _check_unique(path: Path, members: list[Member]) -> None:
    seen: dict[str, int] = {}
    for m in members:
        seen[m.name] = seen.get(m.name, 0) + 1
    dup = sorted(n for n, c in seen.items() if c > 1)
    if dup:
        raise SweepError(f"{path}: member names {dup} occur more than once; give the list entries distinct `name:`s")


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _check_shared(path: Path, members: list[Member]) -> None:
    for key in SHARED:
        values = {m.name: _get(m.config, key) for m in members}
        if len(set(map(repr, values.values()))) > 1:
            shown = ", ".join(f"{n}: {v!r}" for n, v in values.items())
            raise SweepError(f"{path}: {key} differs between members ({shown}); the members of a sweep share one "
                             f"pass over the cache, so {', '.join(SHARED)} must be equal: make a second sweep")
