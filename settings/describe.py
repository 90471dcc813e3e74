"""Every config key with its type, default and comment, for the CLIs' --help.

The comments are the ones written beside each field in settings/schema.py and sae/config.py (the
one description of each key); they are read from that source, so help and schema cannot drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any

from settings.schema import Config


def field_comments(cls: type) -> dict[str, str]:
    """{field: comment} of a dataclass and its bases: the comment on the field's line, else the comment
    lines just above it."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_comments_of(klass))
    return out


def _comments_of(klass: type) -> dict[str, str]:
    try:
        source = inspect.getsource(klass)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(klass)}
    found: dict[str, str] = {}
    above: list[str] = []
    line_name: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and tok.start[0] not in line_name:
            line_name[tok.start[0]] = tok.string
            if above:
                found[tok.string] = " ".join(above)
            above = []
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            row = tok.start[0]
            if row in line_name:
                found[line_name[row]] = text
            elif tok.start[1] == 4:
                above.append(text)
    return found


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """Keeps the key list's lines as written."""
    return argparse.RawDescriptionHelpFormatter(prog, width=120)


def describe(sections: list[str]) -> str:
    """Lines `section.key  type = default  comment` for the named sections of the config."""
    hints = typing.get_type_hints(Config)
    lines = ["config keys (set in a YAML file or as section.key=value):"]
    for section in sections:
        cls = hints[section]
        comments = field_comments(cls)
        types_ = typing.get_type_hints(cls)
        default = cls()
        for f in dataclasses.fields(cls):
            value = getattr(default, f.name)
            head = f"  {section}.{f.name}: {_type(types_[f.name])} = {_show(value)}"
            lines.append(head + (f"  # {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def _type(t: Any) -> str:
    from settings.load import _type_name

    return _type_name(t)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)
