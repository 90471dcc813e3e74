"""Name -> SAE class. The training CLI takes its MODEL choices from here, so they cannot drift."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from sae.base import BaseSAE

SAE = TypeVar("SAE", bound="BaseSAE")
_CLASSES: dict[str, type[BaseSAE]] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, *aliases: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: `@register("TopKSAE", "topk")`. Refuses a name or alias used twice."""

    def wrap(cls: type[SAE]) -> type[SAE]:
        for key in (name, *aliases):
            if key in _CLASSES or key in _ALIASES:
                raise ValueError(f"SAE name {key!r} is registered twice")
        _CLASSES[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        cls.type_name = name
        return cls

    return wrap


def unregister(name: str) -> None:
    """Remove a class and its aliases (a class defined in a test, registered for its duration)."""
    _CLASSES.pop(name, None)
    for alias in [a for a, c in _ALIASES.items() if c == name]:
        del _ALIASES[alias]


def canonical(name: str) -> str:
    """'topk' -> 'TopKSAE'; raises ValueError listing the valid names for an unknown one."""
    _import_all()
    if name in _CLASSES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise ValueError(f"unknown SAE type {name!r}; valid: {', '.join(names())}")


def get(name: str) -> type[BaseSAE]:
    return _CLASSES[canonical(name)]


def names() -> list[str]:
    """Short aliases first (what `make train MODEL=` takes), then the class names."""
    _import_all()
    return sorted(_ALIASES) + sorted(_CLASSES)


def aliases() -> dict[str, str]:
    _import_all()
    return dict(_ALIASES)


def _import_all() -> None:
    # Importing the package registers every architecture module it lists.
    import sae  # noqa: F401
