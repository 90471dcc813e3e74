"""YAML files + dotted command-line overrides -> a validated `Config`.

Later files and overrides win. An unknown key is an error with a did-you-mean; a wrong type
names the key and the type it expects; a value outside a `Literal` names the allowed ones. A
section whose dataclass has a `validate()` method (the SAE settings: sae.config) checks its own
values and combinations here, at load, before any stage runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

import durable
from settings.schema import Config


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the fix."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without its surprises: `6:21` stays a string (not the base-60 integer 1281) and
    `1e-4` is a float (not a string)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def load_config(paths: list[str | Path] | str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Merge YAML files in order, then `key.sub=value` overrides, and validate."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    merged: dict[str, Any] = {}
    for p in paths:
        _deep_merge(merged, _read_yaml(Path(p)), source=str(p))
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(merged, key, value)
    return build(merged)


def build(data: dict[str, Any]) -> Config:
    """A nested dict -> Config, checking every key and type."""
    return _build_dataclass(Config, data, prefix="")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
    durable.atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of sections (model:, data:, ...), got {type(data).__name__}")
    return data


def _deep_merge(into: dict[str, Any], new: dict[str, Any], source: str) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value, source)
        else:
            into[key] = value


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (example: training.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if "." not in key:
        raise ConfigError(f"override {item!r} needs a section: section.key=value (example: training.lr=1e-4)")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.strip().startswith("{"):
        value = raw  # `harvest.layers=2:` is an open range, not YAML's mapping {2: null}
    return key, value


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def _build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = _build_dataclass(typing.cast(type, expected), value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, expected, f"{prefix}{key}")
    built = cls(**kwargs)
    validate = getattr(built, "validate", None)
    if callable(validate):
        try:
            validate()
        except (TypeError, ValueError) as e:
            msg = str(e)  # the sections of settings.schema name the full key themselves
            raise ConfigError(msg if prefix and msg.startswith(prefix) else f"{where}: {msg}") from e
    return built


def _coerce(value: Any, expected: Any, key: str) -> Any:
    """Return value as `expected`, allowing only lossless conversions (int -> float,
    '1e-4' -> float, which YAML 1.1 reads as a string)."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        errors = []
        for opt in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, opt, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key {key} must be {_type_name(expected)}, got {value!r}")
    if origin is typing.Literal:
        return _coerce_literal(value, typing.get_args(expected), key)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} must be {_type_name(expected)}, got {value!r}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a revision like 1234 or a range typed without quotes
    raise ConfigError(f"config key {key} must be {_type_name(expected)}, got {value!r} ({type(value).__name__})")


def _coerce_literal(value: Any, allowed: tuple[Any, ...], key: str) -> Any:
    if value in allowed:
        return value
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"config key {key} must be one of {', '.join(map(str, allowed))}, got {value!r}{hint}")


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(t))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(t)[0])}"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(t)))
    if t is type(None):
        return "null"
    return getattr(t, "__name__", str(t))
